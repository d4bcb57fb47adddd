"""surgery.distill on tiny models: both modes lower every site's loss, NaN handling, interruption and
resume, data checks, fidelity report, and the batched LSTM path's exactness."""

import json
import os
import signal

import pytest
import torch

import surgery
from models import build
from surgery.distill import DistillConfig, evaluate_fidelity
from surgery.distill.fastpath import batched_forward, site_forward, supports
from surgery.errors import DataError, SurgeryError, TrainingDivergedError
from surgery.progress import NullProgress
from surgery.swap import replaced_sites


def vit_data(batches=6, batch=4, labels=False):
    generator = torch.Generator().manual_seed(3)
    data = []
    for _ in range(batches):
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        data.append((x, torch.randint(0, 10, (batch,), generator=generator)) if labels else x)
    return data


def bert_data(batches=6, batch=4, length=12):
    generator = torch.Generator().manual_seed(3)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, 100, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - 4:] = 0  # right padding, as HF tokenizers produce
        data.append({"input_ids": ids, "attention_mask": mask})
    return data


def replaced(case, replacement="mhlstm"):
    model, x = build(case)
    surgery.replace_attention(model, replacement, x)
    return model


@pytest.mark.parametrize("mode", ["blockwise", "e2e"])
@pytest.mark.parametrize("case", ["timm_vit", "hf_bert"])
def test_fifty_steps_lower_every_site_loss(case, mode):
    model = replaced(case)
    data = vit_data(labels=(mode == "e2e")) if case == "timm_vit" else bert_data()
    result = surgery.distill(None, model, data, mode=mode, steps=50, lr=3e-3)
    assert [s.name for s in result.sites] == [w.site.name for w in replaced_sites(model)]
    for site in result.sites:
        assert site.relative_mse_after < site.relative_mse_before, site
        assert site.cosine_after > site.cosine_before, site
    assert result.steps == 50 and result.mode == mode
    assert result.fidelity.kind == ("classifier" if case == "timm_vit" else "encoder")


def test_only_replacement_parameters_train_in_blockwise_mode():
    model = replaced("timm_vit")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mixer." not in n}
    mixers = {n: p.detach().clone() for n, p in model.named_parameters() if ".mixer." in n}
    surgery.distill(None, model, vit_data(), steps=5, lr=1e-2)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in mixers.items())


def test_e2e_train_all_trains_everything_but_the_kept_originals():
    model = replaced("hf_bert")
    originals = {id(p) for w in replaced_sites(model) for p in w.original.parameters()}
    start = {n: (p.detach().clone(), id(p) in originals) for n, p in model.named_parameters()}
    result = surgery.distill(None, model, bert_data(), mode="e2e", train="all", steps=5, lr=1e-3)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, (v, original) in start.items() if original)
    assert not torch.equal(now["embeddings.word_embeddings.weight"], start["embeddings.word_embeddings.weight"][0])
    assert result.fidelity.embedding_cosine is not None and all(p.requires_grad for p in model.parameters())


def test_freeze_keeps_matching_parameters_out_of_training():
    model = replaced("hf_bert")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgery.distill(None, model, bert_data(), mode="e2e", train="all", steps=3, lr=1e-3,
                    freeze="*.word_embeddings.*, *.LayerNorm.*")
    now = dict(model.named_parameters())
    assert torch.equal(now["embeddings.word_embeddings.weight"], start["embeddings.word_embeddings.weight"])
    assert all(torch.equal(now[n], start[n]) for n in start if ".LayerNorm." in n)
    assert not torch.equal(now["embeddings.position_embeddings.weight"], start["embeddings.position_embeddings.weight"])
    assert all(p.requires_grad for p in model.parameters())  # flags restored afterwards
    with pytest.raises(SurgeryError, match="match no parameter"):
        surgery.distill(None, model, bert_data(), mode="e2e", train="all", steps=1, freeze="*.no_such.*")


@pytest.mark.parametrize("case, replacement", [("timm_vit", "mhlstm"), ("hf_bert", "mhlstm"), ("hf_bert", "gru"),
                                                ("hf_gpt2", "gru"), ("hf_gpt2", "mhlstm")])
def test_batched_recurrent_path_equals_module_forward(case, replacement):
    """One batched recurrence (bidirectional, or forward-only at causal sites) = the per-head modules,
    outputs and input gradients, with and without right padding."""
    model = replaced(case, replacement)
    mixers = [w.mixer for w in replaced_sites(model)]
    assert all(supports(m) for m in mixers)
    dim = mixers[0].shape.input_dim
    inputs = [torch.randn(3, 9, dim, requires_grad=True) for _ in mixers]
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    for padding in (None, mask):
        expected = [m(x, padding) for m, x in zip(mixers, inputs)]
        grads_expected = torch.autograd.grad(sum(e.square().sum() for e in expected), inputs)
        got = batched_forward(mixers, inputs, padding)
        grads_got = torch.autograd.grad(sum(g.square().sum() for g in got), inputs)
        for e, g in zip(expected + list(grads_expected), got + list(grads_got)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_site_forward_keeps_lstm_and_gru_mixers_in_separate_recurrences():
    lstm = [w.mixer for w in replaced_sites(replaced("hf_bert", "mhlstm"))]
    gru = [w.mixer for w in replaced_sites(replaced("hf_bert", "gru"))]
    mixers = [lstm[0], gru[0], lstm[1], gru[1]]
    inputs = [torch.randn(2, 7, m.shape.input_dim) for m in mixers]
    got = site_forward(mixers, inputs, [None] * 4)
    for m, x, g in zip(mixers, inputs, got):
        torch.testing.assert_close(g, type(m).forward(m, x, None), rtol=1e-5, atol=1e-6)


def test_nan_loss_names_site_and_step_and_keeps_last_good_checkpoint(tmp_path):
    model = replaced("timm_vit")
    data = vit_data(batches=8)
    data[5] = data[5].clone()
    data[5][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError) as caught:
        surgery.distill(None, model, data, steps=20, lr=1e-3, run_dir=tmp_path, checkpoint_every=2)
    message = str(caught.value)
    assert "blocks.0.attn" in message and "step 6" in message and "step 4" in message
    assert "\n" not in message
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["params"].values())


class _TermAt(NullProgress):
    """Sends this process SIGTERM after a given step, as a scheduler or `kill` would."""

    def __init__(self, step):
        self.step = step

    def update(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("mode", ["blockwise", "e2e"])
def test_sigterm_checkpoints_then_resume_equals_uninterrupted(tmp_path, mode):
    settings = dict(mode=mode, steps=12, lr=3e-3, checkpoint_every=5, log_every=1)
    torch.manual_seed(0)
    straight = replaced("hf_bert")
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    surgery.distill(None, straight, bert_data(batches=5), run_dir=tmp_path / "a", **settings)

    interrupted = replaced("hf_bert")
    interrupted.load_state_dict(initial)
    with pytest.raises(KeyboardInterrupt):
        surgery.distill(None, interrupted, bert_data(batches=5), run_dir=tmp_path / "b",
                        progress=_TermAt(7), **settings)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 7
    resumed = replaced("hf_bert")
    resumed.load_state_dict(initial)  # a fresh process starts from the saved start state
    result = surgery.distill(None, resumed, bert_data(batches=5), run_dir=tmp_path / "b", resume=True, **settings)
    assert result.resumed_from == 7 and result.steps == 12
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))


def test_run_directory_layout(tmp_path):
    model = replaced("timm_vit")
    surgery.distill(None, model, vit_data(), steps=4, lr=1e-3, run_dir=tmp_path, log_every=2)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "manifest.json", "model.safetensors",
            "fidelity.json"} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mode"] == "blockwise" and config["steps"] == 4
    again = surgery.load(tmp_path, model=build("timm_vit")[0])
    x = vit_data()[0]
    torch.testing.assert_close(again(x), model.eval()(x))


def test_resume_with_other_settings_is_refused(tmp_path):
    model = replaced("timm_vit")
    surgery.distill(None, model, vit_data(), steps=3, lr=1e-3, run_dir=tmp_path)
    with pytest.raises(surgery.SurgeryError, match="other settings"):
        surgery.distill(None, model, vit_data(), steps=3, lr=5e-3, run_dir=tmp_path, resume=True)


def test_data_that_does_not_fit_fails_in_one_line_before_training(tmp_path):
    bert = replaced("hf_bert")
    too_big = [{"input_ids": torch.full((2, 8), 5000), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    with pytest.raises(DataError, match="vocabulary of 100") as caught:
        surgery.distill(None, bert, too_big, steps=3, run_dir=tmp_path / "a")
    assert "\n" not in str(caught.value)
    vit = replaced("timm_vit")
    with pytest.raises(DataError, match="does not fit VisionTransformer") as caught:
        surgery.distill(None, vit, [torch.randn(2, 3, 64, 64)], steps=3, run_dir=tmp_path / "b")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(DataError, match="10 classes"):
        surgery.distill(None, vit, [(torch.randn(2, 3, 32, 32), torch.tensor([3, 42]))], steps=3)


def test_fidelity_report_classifier_and_encoder():
    vit = replaced("timm_vit")
    report = evaluate_fidelity(None, vit, vit_data(batches=2, labels=True))
    assert report.kind == "classifier" and report.samples == 8
    assert 0 <= report.top1_agreement <= 1 and report.kl >= 0
    assert report.student_accuracy is not None and report.teacher_accuracy is not None
    assert len(report.sites) == 2 and all(s.relative_mse > 0 for s in report.sites)
    # a separate, unreplaced teacher gives the same numbers as the originals kept in the wrappers
    teacher, _ = build("timm_vit")
    separate = evaluate_fidelity(teacher, vit, vit_data(batches=2, labels=True))
    assert separate.top1_agreement == report.top1_agreement
    assert separate.sites[0].relative_mse == pytest.approx(report.sites[0].relative_mse, rel=1e-5)

    bert = replaced("hf_bert")
    encoded = evaluate_fidelity(None, bert, bert_data(batches=2))
    assert encoded.kind == "encoder" and -1 <= encoded.embedding_cosine <= 1
    assert encoded.top1_agreement is None
    # the teacher judged against itself is perfect
    surgery.use_original_attention(bert, True)
    assert evaluate_fidelity(None, bert, bert_data(batches=2)).embedding_cosine == pytest.approx(1.0, abs=1e-5)


def test_config_knows_every_setting():
    with pytest.raises(surgery.SurgeryError, match="unknown distill setting"):
        surgery.distill(None, replaced("timm_vit"), vit_data(), steps=2, learning_rate=1)
    assert DistillConfig(mode="e2e").key() != DistillConfig().key()


@pytest.mark.parametrize("mode, extra", [("blockwise", {}), ("e2e", {"train": "all", "other_lr_scale": 0.3})])
def test_teacher_cache_gives_the_same_result_and_skips_the_teacher(tmp_path, mode, extra, monkeypatch):
    from surgery.distill import engine
    from surgery.distill.cache import TeacherCache

    teacher_calls = []
    real_forward = engine._Trainer._teacher_forward
    monkeypatch.setattr(engine._Trainer, "_teacher_forward",
                        lambda self, args, kwargs: teacher_calls.append(1) or real_forward(self, args, kwargs))
    plain = replaced("hf_bert")
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    expected = surgery.distill(None, plain, bert_data(batches=3), mode=mode, steps=9, lr=3e-3, **extra)
    assert len(teacher_calls) == 1 + 9  # the data check, then every step
    teacher_calls.clear()
    cached = replaced("hf_bert")
    cached.load_state_dict(initial)
    got = surgery.distill(None, cached, bert_data(batches=3), mode=mode, steps=9, lr=3e-3,
                          cache=str(tmp_path / "cache"), cache_megabytes=0.001, **extra)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=0, atol=1e-6)
    assert got.sites[0].relative_mse_after == pytest.approx(expected.sites[0].relative_mse_after, rel=1e-5)
    assert len(teacher_calls) == 1 + 3  # the data check, then epoch 1 only: the other 6 steps read the cache
    cache = TeacherCache(tmp_path / "cache" / "rank0", writer=False)
    assert len(cache.index) == 3 and len(list((tmp_path / "cache" / "rank0").glob("shard_*.safetensors"))) >= 3


@pytest.mark.parametrize("shuffle", [True, "batches"])
def test_teacher_cache_hits_only_when_epochs_repeat_their_batches(tmp_path, shuffle):
    """Reshuffled samples make new batches every epoch, which a content-keyed cache cannot serve: the
    run says so once; with fixed batches (shuffle="batches") later epochs read the cache."""
    from surgery.data import Batches

    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = Batches(12, lambda idx: images[idx], batch_size=4, shuffle=shuffle, seed=0)
    messages = []

    class Messages(NullProgress):
        def message(self, text):
            messages.append(text)

    model = replaced("timm_vit")
    surgery.distill(None, model, data, steps=12, lr=1e-3, cache=str(tmp_path / str(shuffle)),
                    progress=Messages())
    warned = [m for m in messages if m.startswith("teacher cache: batches of this epoch are not in the cache")]
    assert len(warned) == (1 if shuffle is True else 0)


def test_spec_data_keeps_its_batches_fixed_when_cached(tmp_path, monkeypatch):
    from surgery.distill import engine

    seen = []
    real = engine.data_from_spec
    monkeypatch.setattr(engine, "data_from_spec", lambda *a, **k: seen.append(k["fixed_batches"]) or real(*a, **k))
    surgery.distill(None, replaced("timm_vit"), "mnist", steps=1, eval_batches=1, cache=str(tmp_path / "c"))
    surgery.distill(None, replaced("timm_vit"), "mnist", steps=1, eval_batches=1)
    assert seen[0] is True and seen[-1] is False


def test_teacher_cache_refuses_batches_mixed_anew_every_step(tmp_path):
    with pytest.raises(surgery.SurgeryError, match="cache never hits with mixup"):
        surgery.distill(None, replaced("timm_vit"), vit_data(labels=True), mode="e2e", steps=2, mixup=0.8,
                        cache=str(tmp_path / "c"))


def test_fast_path_falls_back_without_recursing_on_pruned_mixers():
    """Pruned heads with unequal state sizes leave the batched path; the fallback must not loop."""
    from surgery.distill.fastpath import fast_mixers

    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    wrapper = next(replaced_sites(model))
    reference = wrapper.mixer(torch.randn(2, 17, 32))
    head = wrapper.mixer.heads[0]
    smaller = torch.nn.LSTM(head.rnn.input_size, head.rnn.hidden_size - 2, batch_first=True, bidirectional=True)
    head.rnn, head.out = smaller, torch.nn.Linear(2 * smaller.hidden_size, head.out.out_features)
    x = torch.randn(2, 17, 32)
    expected = type(wrapper.mixer).forward(wrapper.mixer, x, None)
    with fast_mixers(model):
        torch.testing.assert_close(wrapper.mixer(x, None), expected, rtol=1e-5, atol=1e-6)
    assert reference.shape == expected.shape
