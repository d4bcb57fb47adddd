"""Every distill setting is checked in ``distill()`` before the student is touched, data read or a
file written; ``steps=0`` trains nothing; ``max_seconds`` counts training only; the work before the
first step is announced through the progress protocol."""

import dataclasses
import json

import pytest
import torch

import surgery
from models import build
from surgery.distill import DistillConfig
from surgery.distill import engine
from surgery.distill.settings import RULES
from surgery.errors import SurgeryError
from surgery.progress import NullProgress


class Untouchable:
    """Data that fails the test if anything iterates it (the checks must come first)."""

    def __iter__(self):
        raise AssertionError("the data was read before the settings were checked")


def replaced_vit(replacement="mhlstm"):
    model, x = build("timm_vit")
    surgery.replace_attention(model, replacement, x)
    return model


def vit_data(batches=4, batch=4):
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(batches)]


BAD = [
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"lr": 0}, "lr must be a number > 0"),
    ({"lr": -1e-3}, "lr must be a number > 0"),
    ({"lr": float("nan")}, "lr must be a number > 0.*give a finite number"),
    ({"lr": float("inf")}, "lr must be a number > 0.*give a finite number"),
    ({"lr": "1e-3"}, "lr must be a number > 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1 or None"),
    ({"batch_size": 1.5}, "batch_size must be an integer"),
    ({"max_seconds": 0}, "max_seconds must be a number > 0 or None"),
    ({"max_seconds": -5.0}, "max_seconds must be a number > 0"),
    ({"max_seconds": "300"}, "max_seconds must be a number"),
    ({"mode": "endtoend"}, "mode must be one of 'blockwise', 'e2e'"),
    ({"train": "everything"}, "train must be one of 'replacements', 'all'"),
    ({"train": "all"}, "train='all' needs mode='e2e'"),
    ({"init": "teachr"}, "init must be one of 'none', 'teacher'"),
    ({"init_batches": 0}, "init_batches must be an integer >= 1"),
    ({"eval_batches": 0}, "eval_batches must be an integer >= 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
    ({"log_every": -1}, "log_every must be an integer >= 1"),
    ({"seq_len": 0}, "seq_len must be an integer >= 1"),
    ({"warmup": 1.5}, r"warmup must be a number in \[0, 1\]"),
    ({"min_lr": 1.0}, "min_lr .* is above lr"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
    ({"grad_clip": -1}, "grad_clip must be a number >= 0"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"other_lr_scale": -1}, "other_lr_scale must be a number >= 0"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
    ({"ema_decay": 1.0}, r"ema_decay must be a number in \[0, 1\)"),
    ({"mixup_prob": 2}, r"mixup_prob must be a number in \[0, 1\]"),
    ({"cache_megabytes": 0}, "cache_megabytes must be a number > 0"),
    ({"fast": "yes"}, "fast must be True or False"),
    ({"labelled": "true"}, "labelled must be True or False or None"),
    ({"kl_weight": -1}, "kl_weight must be a number >= 0"),
    ({"kl_weight": 0.5}, "kl_weight needs mode='e2e'"),
    ({"hoyer_weight": "1e-4"}, "hoyer_weight must be a number >= 0"),
    ({"freeze": 3}, "freeze must be a string"),
    ({"freeze": "*.nothing_like_this.*"}, "freeze pattern.*match no parameter name"),
    ({"freeze": "*"}, "nothing left to train"),
    ({"mode": "e2e", "mixup": 0.8, "cache": "somewhere"}, "cache never hits with mixup"),
    ({"lrr": 1e-3}, "unknown distill setting 'lrr'. Did you mean 'lr'"),
    ({"max_second": 30}, "unknown distill setting 'max_second'. Did you mean 'max_seconds'"),
]


@pytest.mark.parametrize("settings, message", BAD, ids=[",".join(f"{k}={v!r}" for k, v in s.items()) for s, _ in BAD])
def test_each_bad_setting_is_refused_in_one_line_before_anything_happens(tmp_path, monkeypatch, settings, message):
    student = replaced_vit()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    monkeypatch.setattr(engine, "evaluate_fidelity", lambda *a, **k: pytest.fail("evaluated before the checks"))
    monkeypatch.setattr(engine.copy, "deepcopy", lambda *a, **k: pytest.fail("copied before the checks"))
    monkeypatch.chdir(tmp_path)  # a relative cache directory would land here
    run = tmp_path / "run"
    with pytest.raises(SurgeryError, match=message) as caught:
        surgery.distill(None, student, Untouchable(), run_dir=run, **settings)
    assert "\n" not in str(caught.value)
    assert not run.exists() and not (tmp_path / "somewhere").exists()
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_bad_call_arguments_are_refused_before_anything_happens(tmp_path):
    student = replaced_vit()
    run = tmp_path / "run"
    with pytest.raises(SurgeryError, match="resume=True needs run_dir"):
        surgery.distill(None, student, Untouchable(), resume=True)
    with pytest.raises(SurgeryError, match="cache='run' needs run_dir"):
        surgery.distill(None, student, Untouchable(), cache="run")
    with pytest.raises(SurgeryError, match="data must be an iterable of batches"):
        surgery.distill(None, student, 3, run_dir=run)
    with pytest.raises(SurgeryError, match="teacher must be a torch nn.Module"):
        surgery.distill("teacher", student, Untouchable(), run_dir=run)
    with pytest.raises(SurgeryError, match="no replaced attention sites"):
        surgery.distill(None, build("timm_vit")[0], Untouchable(), run_dir=run)
    with pytest.raises(SurgeryError, match="not both"):
        surgery.distill(None, student, Untouchable(), run_dir=run, mode="e2e", mixup=0.8,
                        batch_transform=lambda x, y: (x, y))
    with pytest.raises(SurgeryError, match="device 'tpu-9' is not a torch device"):
        surgery.distill(None, student, Untouchable(), run_dir=run, device="tpu-9")
    assert not run.exists()


def test_every_config_field_has_a_rule_and_the_defaults_pass():
    assert {f.name for f in dataclasses.fields(DistillConfig)} == set(RULES)
    for field in dataclasses.fields(DistillConfig):
        assert RULES[field.name].accepts(getattr(DistillConfig(), field.name)), field.name


def test_zero_steps_trains_nothing_and_saves_the_model_as_it_is(tmp_path):
    student = replaced_vit()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    result = surgery.distill(None, student, vit_data(), steps=0, run_dir=tmp_path)
    assert result.steps == 0 and not result.stopped_early
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    assert not (tmp_path / "metrics.jsonl").exists() or not [
        line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 0
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "fidelity.json").is_file()
    # the before and after reports are of the same, untrained model
    assert result.sites[0].relative_mse_after == pytest.approx(result.sites[0].relative_mse_before, rel=1e-5)


class FakeClock:
    """``time`` for the engine: monotonic() reads a number the test advances (no real waiting)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


class Recorder(NullProgress):
    def __init__(self):
        self.calls = []

    def start(self, total, description, completed=0):
        self.calls.append(("start", total, description))

    def update(self, step, metrics):
        self.calls.append(("update", step))

    def message(self, text):
        self.calls.append(("message", text))


def test_max_seconds_counts_training_only_and_the_preparation_reports_progress(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(engine, "time", clock)
    real_evaluate, real_initialise = engine._Trainer._evaluate, engine._Trainer._initialise

    def slow(real, seconds):
        def wrapped(self, *args):
            clock.now += seconds  # a slow report / initialisation on a busy machine
            return real(self, *args)
        return wrapped

    def slow_step(self, *args):
        clock.now += 10.0
        return real_step(self, *args)

    real_step = engine._Trainer._train_step
    monkeypatch.setattr(engine._Trainer, "_evaluate", slow(real_evaluate, 500.0))
    monkeypatch.setattr(engine._Trainer, "_initialise", slow(real_initialise, 1000.0))
    monkeypatch.setattr(engine._Trainer, "_train_step", slow_step)
    progress = Recorder()
    result = surgery.distill(None, replaced_vit(), vit_data(), steps=6, max_seconds=25, init="teacher",
                             init_batches=2, progress=progress)
    # 1,500 s of report + initialisation do not count; the third 10-second step passes 25 s
    assert result.steps == 3 and result.stopped_early
    assert result.seconds == pytest.approx(30.0)  # three steps (the final report is not counted)
    assert result.setup_seconds == pytest.approx(1500.0)
    # the preparation is announced in messages (before the training task starts); updates are steps only
    start = progress.calls.index(("start", 6, "distill (blockwise)"))
    before = [c for c in progress.calls[:start]]
    assert before[0][0] == "message" and "untrained student" in before[0][1] and "2 teacher batches" in before[0][1]
    assert any(c[0] == "message" and "initialised 2 sites" in c[1] and "not counted" in c[1] for c in before)
    assert [c[1] for c in progress.calls if c[0] == "update"] == [1, 2, 3]
