"""surgery.distill's regularisers on a tiny timm ViT: soft-label cross-entropy, Mixup/CutMix
(timm.data.Mixup) deterministic per seed and step, train mode (drop-path active in the student, never
in the teacher), the EMA (timm.utils.ModelEmaV3) saved and used, and resume with all of them on."""

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import torch
import timm.models.vision_transformer as vt

import surgery
from surgery.data import Labelled
from surgery.distill import DistillConfig
from surgery.distill.augment import build_mixup, classification_loss, transform_batch
from surgery.errors import DataError
from surgery.progress import NullProgress
from test_distill import _TermAt

REGULARISED = dict(mode="e2e", train="all", site_weight=0.0, train_mode=True, mixup=0.8, cutmix=1.0,
                   label_smoothing=0.1, ema_decay=0.9)


def vit(drop_path=0.0):
    torch.manual_seed(0)
    model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                 num_classes=10, drop_path_rate=drop_path).eval()
    surgery.replace_attention(model, "conv", torch.randn(2, 3, 32, 32))
    return model


def images(batches=4, batch=4, soft=False):
    generator = torch.Generator().manual_seed(5)
    data = []
    for _ in range(batches):
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        data.append(Labelled(x, torch.nn.functional.one_hot(y, 10).float() if soft else y))
    return data


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def differs(a, b):
    return any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --------------------------------------------------------------------------------- soft labels

def test_soft_label_cross_entropy_equals_hard_labels_on_one_hot_rows():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    torch.testing.assert_close(classification_loss(logits, one_hot), classification_loss(logits, labels),
                               rtol=1e-5, atol=1e-6)
    # a mixed row: the loss is the mixture of the two hard losses
    mixed = 0.3 * one_hot + 0.7 * one_hot.flip(0)
    expected = 0.3 * torch.nn.functional.cross_entropy(logits, labels) + \
        0.7 * torch.nn.functional.cross_entropy(logits, labels.flip(0))
    torch.testing.assert_close(classification_loss(logits, mixed), expected, rtol=1e-5, atol=1e-6)
    smoothed = classification_loss(logits, labels, label_smoothing=0.1)
    assert smoothed.item() != pytest.approx(classification_loss(logits, labels).item())
    with pytest.raises(DataError, match="do not fit logits"):
        classification_loss(logits, one_hot[:, :4])


def test_distill_trains_on_soft_labels_as_on_the_equal_hard_ones():
    hard, soft = vit(), vit()
    settings = dict(mode="e2e", train="all", steps=3, lr=3e-3)
    surgery.distill(None, hard, images(), **settings)
    surgery.distill(None, soft, images(soft=True), **settings)
    assert_same(weights(soft), weights(hard))
    with pytest.raises(DataError, match="soft labels of shape"):
        wrong = [Labelled(b.inputs, b.labels[:, :7]) for b in images(soft=True)]
        surgery.distill(None, vit(), wrong, **settings)


# ------------------------------------------------------------------------------------- mixup

def test_mixup_changes_the_batch_and_is_deterministic_per_seed_and_step():
    mix = build_mixup(0.8, 1.0, 1.0, 0.5, 0.1, classes=10)
    batch = images(batches=1, batch=8)[0]
    x, y = batch.inputs, batch.labels
    original = x.clone()
    numpy_state = np.random.get_state()[1].copy()
    python_state = random.getstate()
    torch_state = torch.get_rng_state()
    a = transform_batch(mix, x, y, seed=0, step=3, rank=0)
    assert torch.equal(x, original), "the caller's batch must not be mixed in place"
    assert not torch.allclose(a[0], x), "mixup/cutmix must change the images"
    assert a[1].shape == (8, 10) and torch.allclose(a[1].sum(-1), torch.ones(8))
    assert (a[1].max(-1).values < 1).all(), "label smoothing and mixing make every target soft"
    b = transform_batch(mix, x, y, seed=0, step=3, rank=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [transform_batch(mix, x, y, seed=s, step=t, rank=r)[1] for s, t, r in
              [(1, 3, 0), (0, 4, 0), (0, 3, 1)]]
    assert all(not torch.equal(a[1], o) for o in others), "seed, step and process each change the mix"
    # the run's own random streams are untouched
    assert (np.random.get_state()[1] == numpy_state).all() and random.getstate() == python_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_distill_with_mixup_is_reproducible_and_differs_from_without():
    settings = dict(mode="e2e", train="all", steps=4, lr=3e-3, seed=2)
    plain, mixed, again, reseeded = vit(), vit(), vit(), vit()
    surgery.distill(None, plain, images(), **settings)
    surgery.distill(None, mixed, images(), mixup=0.8, cutmix=1.0, **settings)
    surgery.distill(None, again, images(), mixup=0.8, cutmix=1.0, **settings)
    surgery.distill(None, reseeded, images(), mixup=0.8, cutmix=1.0, **{**settings, "seed": 3})
    assert_same(weights(again), weights(mixed))
    assert differs(weights(mixed), weights(plain))
    assert differs(weights(reseeded), weights(mixed))


def test_a_batch_transform_sees_every_training_batch():
    seen = []

    def record(x, y):
        seen.append(x.clone())
        return x.flip(0), torch.nn.functional.one_hot(y.flip(0), 10).float()

    surgery.distill(None, vit(), images(), mode="e2e", train="all", steps=3, batch_transform=record)
    assert [tuple(x.shape) for x in seen] == [(4, 3, 32, 32)] * 3
    assert torch.equal(seen[1], images()[1].inputs)


def test_mixup_refuses_unusable_batches_in_one_line():
    settings = dict(mode="e2e", train="all", steps=2, mixup=0.8)
    with pytest.raises(DataError, match="even batch size"):
        surgery.distill(None, vit(), images(batch=3), **settings)
    with pytest.raises(DataError, match="needs labelled batches"):
        surgery.distill(None, vit(), [b.inputs for b in images()], **settings)
    with pytest.raises(surgery.SurgeryError, match="not both"):
        surgery.distill(None, vit(), images(), batch_transform=lambda x, y: (x, y), **settings)


# -------------------------------------------------------------------------------- train mode

def _drop_path_calls(model):
    """(module in training mode, output differs from input) for every call of the last DropPath."""
    calls = []

    def hook(module, inputs, output):
        calls.append((module.training, not torch.equal(inputs[0], output)))

    model.blocks[1].drop_path1.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("train", ["replacements", "all"])
def test_train_mode_makes_drop_path_act_in_the_student_only(train):
    model = vit(drop_path=0.5)
    calls = _drop_path_calls(model)
    surgery.distill(None, model, images(), mode="e2e", train=train, steps=3, train_mode=True, eval_batches=1)
    trained = [changed for training, changed in calls if training]
    assert len(trained) == 3 and any(trained), "the student's drop-path must be on in its 3 training forwards"
    assert not any(changed for training, changed in calls if not training), "the teacher never drops paths"
    assert not model.training and not any(m.training for m in model.modules())

    calls.clear()
    model = vit(drop_path=0.5)
    calls = _drop_path_calls(model)
    surgery.distill(None, model, images(), mode="e2e", train=train, steps=3, eval_batches=1)
    assert calls and not any(training for training, _ in calls), "by default everything runs in eval mode"


def test_train_mode_changes_training_only_through_drop_path():
    settings = dict(mode="e2e", train="all", steps=3, lr=3e-3)
    results = {}
    for drop_path in (0.0, 0.5):
        for train_mode in (False, True):
            model = vit(drop_path)
            surgery.distill(None, model, images(), train_mode=train_mode, **settings)
            results[drop_path, train_mode] = weights(model)
    assert_same(results[0.0, True], results[0.0, False])
    assert differs(results[0.5, True], results[0.5, False])
    assert_same(results[0.5, False], results[0.0, False])


# ---------------------------------------------------------------------------------------- EMA

class _Snapshots(NullProgress):
    def __init__(self, model):
        self.model, self.raw = model, []

    def update(self, step, metrics):
        self.raw.append(weights(self.model))


def test_ema_is_the_average_of_the_trained_weights_and_is_what_gets_saved(tmp_path):
    model = vit()
    progress = _Snapshots(model)
    surgery.distill(None, model, images(), mode="e2e", train="all", steps=5, lr=3e-3, ema_decay=0.7,
                    run_dir=tmp_path, progress=progress)
    expected = progress.raw[0]  # timm's ModelEmaV3 copies the weights at the first update
    for raw in progress.raw[1:]:
        expected = {k: 0.7 * expected[k] + 0.3 * raw[k] if raw[k].is_floating_point() else raw[k] for k in raw}
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    trained = checkpoint["params"]
    assert checkpoint["ema"].keys() >= trained.keys()
    for name, value in trained.items():
        torch.testing.assert_close(value, progress.raw[-1][name], rtol=0, atol=0)  # the checkpoint keeps raw
        # timm updates with lerp, the expectation with 0.7 * a + 0.3 * b: a few ulp apart, not bit for bit
        torch.testing.assert_close(checkpoint["ema"][name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(checkpoint["ema"][n], trained[n], atol=1e-5) for n in trained)
    saved = surgery.load(tmp_path, model=vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, mlp_ratio=2, num_classes=10))
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(model.state_dict()[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------- resume

def test_resume_with_mixup_ema_and_drop_path_equals_uninterrupted(tmp_path):
    settings = dict(steps=8, lr=3e-3, checkpoint_every=3, log_every=1, **REGULARISED)
    straight = vit(drop_path=0.2)
    surgery.distill(None, straight, images(), run_dir=tmp_path / "a", **settings)

    interrupted = vit(drop_path=0.2)
    with pytest.raises(KeyboardInterrupt):
        surgery.distill(None, interrupted, images(), run_dir=tmp_path / "b", progress=_TermAt(5), **settings)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 5
    torch.manual_seed(123)  # a fresh process: the global generator is wherever it happens to be
    resumed = vit(drop_path=0.2)
    result = surgery.distill(None, resumed, images(), run_dir=tmp_path / "b", resume=True, **settings)
    assert result.resumed_from == 5 and result.steps == 8
    assert_same(weights(resumed), weights(straight))
    finals = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("a", "b")]
    for part in ("params", "ema"):
        assert_same(finals[1][part], finals[0][part])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_regularisers_at_their_defaults_keep_the_stage_key_of_earlier_runs():
    config = DistillConfig(mode="e2e", steps=7)
    added = {"train_mode", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "label_smoothing", "ema_decay",
             "ema_warmup", "kl_weight", "hoyer_weight",  # these two: tests/test_distill_terms.py
             "freeze",  # tests/test_distill.py
             "group_by_length"}  # tests/test_group_by_length.py
    skipped = {"checkpoint_every", "log_every", "max_seconds", "eval_batches", "eval_data", "fast", "cache",
               "cache_megabytes"}
    earlier = {k: v for k, v in dataclasses.asdict(config).items() if k not in skipped | added}
    assert config.key() == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]
    assert DistillConfig(mode="e2e", steps=7, mixup=0.8).key() != config.key()
    assert DistillConfig(mode="e2e", steps=7, group_by_length=True).key() != config.key()


# ------------------------------------------------------------------------------- DeiT recipe

def test_run_far_applies_the_finetune_settings_in_stage2_only(tmp_path):
    from recipes.deit import DeitConfig, StagePlan, run_far

    torch.manual_seed(0)
    state = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                 num_classes=10).state_dict()

    def build_teacher():
        model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                     num_classes=10, drop_path_rate=0.1)
        model.load_state_dict(state)
        return model.eval()

    finetune = {**DeitConfig().regularisers(), "ema_decay": 0.9}
    plan = StagePlan(replacement="conv", stage1_steps=2, stage2_steps=3, finetune_settings=finetune, eval_batches=1)
    run_far(build_teacher, (torch.randn(1, 3, 32, 32),), images(), images(batches=1), plan, tmp_path,
            evaluate=lambda model: {}, log=lambda message: None)
    configs = {stage: json.loads((tmp_path / stage / "config.json").read_text()) for stage in ("stage1", "stage2")}
    assert configs["stage2"]["mixup"] == 0.8 and configs["stage2"]["cutmix"] == 1.0
    assert configs["stage2"]["label_smoothing"] == 0.1 and configs["stage2"]["train_mode"] is True
    assert configs["stage2"]["ema_decay"] == 0.9
    assert configs["stage1"]["mixup"] == 0.0 and configs["stage1"]["train_mode"] is False
    assert configs["stage1"]["ema_decay"] == 0.0
    checkpoints = {stage: torch.load(tmp_path / stage / "checkpoint.pt", weights_only=True)
                   for stage in ("stage1", "stage2")}
    assert "ema" in checkpoints["stage2"] and "ema" not in checkpoints["stage1"]
    messages = []
    run_far(build_teacher, (torch.randn(1, 3, 32, 32),), images(), images(batches=1), plan, tmp_path,
            evaluate=lambda model: {}, log=messages.append)
    assert sum("already done" in m for m in messages) == 2, "finished stages reload with the same settings"


def test_deit_config_carries_deits_regularisers():
    from recipes.deit import DeitConfig, _load_deit, deit_deviations

    config = DeitConfig(model="deit_tiny")
    assert config.regularisers() == {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "train_mode": True,
                                     "ema_decay": 0.99996, "ema_warmup": False}
    assert len(deit_deviations(config)) == 1 and "stage 1" in deit_deviations(config)[0]
    assert deit_deviations(DeitConfig(regularise_stage1=True)) == []
    model = _load_deit(config, weights=False, drop_path=0.1)
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # timm's rule: 0 at the first block
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.surgery_source == "deit_tiny_patch16_224" and not model.training
    with pytest.raises(surgery.SurgeryError, match="batch_size must be even"):
        DeitConfig(model="deit_tiny", batch_size=3).check()
