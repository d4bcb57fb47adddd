"""FAR's recipe for DeiT-T/S/B: replace every attention block, distil, fine-tune, optionally prune.

Stages (each a ``surgery.distill`` run directory under ``--out``, so each one resumes after an
interruption and a finished stage is reloaded instead of rerun):

1. ``stage1``: only the new modules train (the reused output projections and everything else stay
   frozen); loss = per-block MSE of the attention output before the output projection (FAR's
   block-wise objective, "e2e": on the student's own activations) + cross-entropy on the labels.
   AdamW, weight decay 0.05, lr 5e-4 x batch/512, linear warm-up (5 of 200 epochs), cosine decay.
2. ``stage2``: full fine-tuning with cross-entropy, lr 5e-5 x batch/512 (2e-5 for DeiT-S/B).
3. optional ``prune`` (``surgery.prune`` at ``prune_ratio``) and ``recovery`` (full fine-tuning at
   ``recovery_lr`` x batch/512).

Data: an ImageNet-style folder (``train/<class>/*.jpg`` and ``val/<class>/*.jpg``) read with
``timm.data.ImageDataset`` and DeiT's training transform from ``timm.data.create_transform``
(RandAugment m9, random erasing 0.25, bicubic random-resized crops).

DeiT's regularisers, all timm's own implementations through ``surgery.distill`` settings, in stage 2
and recovery (and in stage 1 with ``regularise_stage1``): Mixup 0.8 / CutMix 1.0 (``timm.data.Mixup``,
switch probability 0.5) with label smoothing 0.1 and soft-target cross-entropy, drop-path 0.1 (timm's
linear stochastic-depth rule; the student trains in train mode, the teacher stays in eval mode) and an
EMA of the weights (``timm.utils.ModelEmaV3``, decay 0.99996; the stage's saved model is the EMA). The
remaining deviations from the reference are listed in every report (``deit_deviations``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from surgery.errors import DataError, ManifestError, SurgeryError, WeightsUnavailableError

REFERENCE_BATCH = 512
# run_far with an empty StagePlan.stage1_settings / finetune_settings (the MNIST recipe): none of DeiT's
# regularisers; the DeiT recipe turns them on and reports its own list (deit_deviations)
DEVIATIONS = ("no Mixup/CutMix or label smoothing (StagePlan.finetune_settings does not turn on "
              "surgery.distill's mixup/cutmix/label_smoothing)",
              "no EMA, no drop-path (surgery.distill's ema_decay / train_mode are off)")


# --------------------------------------------------------------------------------- the stages

@dataclass
class StagePlan:
    """The data-independent part of FAR's pipeline: steps and learning rates of every stage.

    Args:
        replacement: registered replacement name ("mhlstm", "gru", "conv").
        replacement_settings: settings of the replacement's config (e.g. ``{"hidden_per_head": 32}``).
        stage1_steps, stage1_lr, stage1_warmup: stage 1 (new modules only; warm-up as a fraction).
        stage2_steps, stage2_lr: stage 2 (all weights, cross-entropy); 0 steps skips it.
        prune_ratio: 0 = no pruning; else ``surgery.prune`` ratio, followed by recovery.
        recovery_steps, recovery_lr: fine-tuning after pruning.
        mode: "e2e" (FAR's reference) or "blockwise" (teacher-forced) for stage 1.
        site_weight, task_weight: weights of the block-wise MSE and of the cross-entropy.
        weight_decay: AdamW weight decay.
        seed: seed of data order and initialisation.
        eval_batches: batches the engine's fidelity reports read.
        stage1_settings: further ``surgery.distill`` settings of stage 1 (e.g. ``{"mixup": 0.8}``).
        finetune_settings: further ``surgery.distill`` settings of stage 2 and recovery (the full
            fine-tuning stages), e.g. DeiT's ``{"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
            "train_mode": True, "ema_decay": 0.99996}``. Empty (the default): none of them.
    """

    replacement: str = "mhlstm"
    replacement_settings: dict = field(default_factory=dict)
    stage1_steps: int = 100
    stage1_lr: float = 5e-4
    stage1_warmup: float = 0.025
    stage2_steps: int = 0
    stage2_lr: float = 5e-5
    stage2_warmup: float = 0.0
    prune_ratio: float = 0.0
    recovery_steps: int = 0
    recovery_lr: float = 5e-6
    mode: str = "e2e"
    site_weight: float = 1.0
    task_weight: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    eval_batches: int = 8
    stage1_settings: dict = field(default_factory=dict)
    finetune_settings: dict = field(default_factory=dict)


def _stage_done(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "fidelity.json").is_file()


def _load_stage(path: Path, build_base: Callable[[], nn.Module]) -> nn.Module:
    import surgery

    return surgery.load(path, model=build_base())


def run_far(build_teacher: Callable[[], nn.Module], example_inputs: Any, train_data: Iterable,
            eval_data: Iterable, plan: StagePlan, out_dir: str | Path, *,
            evaluate: Callable[[nn.Module], dict[str, float]],
            log: Callable[[str], None] = print, progress=None,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run FAR's stages on any model and data; every stage resumes from ``out_dir/<stage>``.

    Args:
        build_teacher: returns a fresh copy of the trained teacher (the base of every stage).
        example_inputs: inputs the model accepts (site location, pruning, FLOPs).
        train_data: re-iterable labelled batches (``surgery.data.Labelled`` or ``(x, y)``).
        eval_data: held-out labelled batches for the engine's fidelity reports.
        plan: steps and learning rates (``StagePlan``).
        out_dir: run directory of this student (``stage1/``, ``stage2/``, ``prune/``, ``recovery/``).
        evaluate: model -> metrics (e.g. ``{"test_accuracy": ...}``) measured after every stage.
        log: one-line progress messages.
        progress: a ``surgery.progress.Progress`` for per-step metrics.
        device: where the stages train ("cpu", "cuda"); models are built and reloaded on the CPU.

    Returns:
        ``{"stages": [{"stage", "steps", "seconds", "params", **evaluate(...)}, ...], "model": student}``.

    Example:
        >>> # see recipes.mnist.run_mnist and tests/test_recipes.py   # doctest: +SKIP
    """
    import surgery

    out_dir = Path(out_dir)
    stages: list[dict[str, Any]] = []

    def record(name: str, model: nn.Module, seconds: float, steps: int, extra: dict | None = None) -> None:
        row = {"stage": name, "steps": steps, "seconds": round(seconds, 1),
               "params": surgery.count_parameters(model), **evaluate(model), **(extra or {})}
        stages.append(row)
        log(f"{out_dir.name} {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items() if k != "stage"))

    def build_student() -> nn.Module:
        model = build_teacher()
        surgery.replace_attention(model, plan.replacement, example_inputs, config=plan.replacement_settings)
        return model.to(device)

    def distill_stage(name: str, model: nn.Module, steps: int, lr: float, warmup: float, train: str,
                      site_weight: float, mode: str, base: Callable[[], nn.Module],
                      settings: dict[str, Any]) -> nn.Module:
        path = out_dir / name
        wanted = {"mode": mode, "steps": steps, "lr": lr, "train": train, "site_weight": site_weight,
                  "task_weight": plan.task_weight, "warmup": warmup, "weight_decay": plan.weight_decay,
                  "seed": plan.seed, **settings}
        _check_same_settings(path, wanted)
        if _stage_done(path):
            model = _load_stage(path, base).to(device)
            info = json.loads((path / "fidelity.json").read_text())
            log(f"{out_dir.name} {name}: already done, reloaded from {path}")
            record(name, model, info.get("seconds", 0.0), info.get("steps", steps),
                   {"site_cosine": _mean([s["cosine_after"] for s in info.get("sites", [])])})
            return model
        began = time.perf_counter()
        # without train_mode surgery.distill trains in eval mode; cuDNN refuses an RNN backward in eval
        # mode, and heads pruned to different sizes train in their per-head form: use the native
        # kernels (with train_mode cuDNN would do, but the native kernels are kept alike)
        cudnn_off = name == "recovery" and next(model.parameters()).is_cuda
        with torch.backends.cudnn.flags(enabled=not cudnn_off):
            result = _distill(surgery, model, name, mode, steps, lr, path, warmup, train, site_weight, settings)
        record(name, model, time.perf_counter() - began, result.steps,
               {"site_cosine": _mean([s.cosine_after for s in result.sites])})
        return model

    def _distill(surgery, model, name, mode, steps, lr, path, warmup, train, site_weight, settings):
        return surgery.distill(
            None, model, train_data, mode=mode, steps=steps, lr=lr, run_dir=path, resume=True,
            eval_data=eval_data, seed=plan.seed, progress=progress, warmup=warmup, train=train,
            site_weight=site_weight, task_weight=plan.task_weight, weight_decay=plan.weight_decay,
            eval_batches=plan.eval_batches, labelled=True, **settings)

    teacher = build_teacher().to(device)
    record("teacher", teacher, 0.0, 0)
    del teacher

    student = build_student()
    student = distill_stage("stage1", student, plan.stage1_steps, plan.stage1_lr, plan.stage1_warmup,
                            "replacements", plan.site_weight, plan.mode, build_teacher, plan.stage1_settings)
    if plan.stage2_steps > 0:
        # stage 2 is plain fine-tuning: cross-entropy only, every weight trains
        student = distill_stage("stage2", student, plan.stage2_steps, plan.stage2_lr, plan.stage2_warmup,
                                "all", 0.0, "e2e", build_teacher, plan.finetune_settings)
    if plan.prune_ratio > 0:
        student = _prune_stage(student, example_inputs, plan, out_dir, log, record, build_teacher).to(device)
        if plan.recovery_steps > 0:
            student = distill_stage("recovery", student, plan.recovery_steps, plan.recovery_lr, 0.0,
                                    "all", 0.0, "e2e", build_teacher, plan.finetune_settings)
    return {"stages": stages, "model": student}


def _check_same_settings(path: Path, wanted: dict[str, Any]) -> None:
    """Refuse to reuse or resume a stage directory that was run with other settings."""
    config = path / "config.json"
    if not config.is_file():
        return
    stored = json.loads(config.read_text())
    changed = [k for k, v in wanted.items() if k in stored and stored[k] != v
               and not (isinstance(v, float) and math.isclose(float(stored[k]), v, rel_tol=1e-9))]
    if changed:
        key = changed[0]
        raise SurgeryError(f"{path} was run with other settings ({key}={stored[key]!r}, now {wanted[key]!r}); "
                           "give a new --out, or delete that stage directory to redo it")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _prune_stage(student: nn.Module, example_inputs: Any, plan: StagePlan, out_dir: Path, log, record,
                 build_teacher) -> nn.Module:
    import surgery

    path = out_dir / "prune"
    if (path / "manifest.json").is_file():
        from surgery.checkpoint import read_manifest

        stored = read_manifest(path).get("extra", {}).get("prune_ratio")
        if stored is not None and not math.isclose(stored, plan.prune_ratio):
            raise SurgeryError(f"{path} was pruned at ratio {stored}, now {plan.prune_ratio}; give a new --out, "
                               "or delete that directory to redo it")
        student = surgery.load(path, model=build_teacher())
        log(f"{out_dir.name} prune: already done, reloaded from {path}")
        record("prune", student, 0.0, 0)
        return student
    if not hasattr(surgery, "prune"):
        raise SurgeryError("pruning needs surgery.prune, which this installation does not have")
    began = time.perf_counter()
    inputs = tuple(x.to(next(student.parameters()).device) for x in example_inputs)
    surgery.prune(student, inputs, ratio=plan.prune_ratio)
    surgery.save(student, path, extra={"prune_ratio": plan.prune_ratio})
    record("prune", student, time.perf_counter() - began, 0)
    return student


# -------------------------------------------------------------------------------- DeiT config

DEIT_MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
               "deit_base": "deit_base_patch16_224"}


@dataclass
class DeitConfig:
    """FAR's DeiT recipe settings; learning rates are per 512 images and scaled by ``batch_size``.

    Example:
        >>> config = DeitConfig(model="deit_small", batch_size=256)
        >>> config.lr_stage1, config.lr_stage2
        (0.00025, 1e-05)
    """

    model: str = "deit_small"
    data: str = ""
    checkpoint: Optional[str] = None
    random_init: bool = False
    replacement: str = "mhlstm"
    batch_size: int = 128
    stage1_epochs: float = 200.0
    stage2_epochs: float = 100.0
    recovery_epochs: float = 100.0
    stage1_steps: Optional[int] = None
    stage2_steps: Optional[int] = None
    recovery_steps: Optional[int] = None
    base_lr_stage1: float = 5e-4
    base_lr_stage2: Optional[float] = None
    base_lr_recovery: float = 5e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    mode: str = "e2e"
    prune_ratio: float = 0.0
    augment: bool = True
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    ema_decay: float = 0.99996
    ema_warmup: bool = False
    regularise_stage1: bool = False
    workers: int = 4
    eval_images: Optional[int] = None
    limit_images: Optional[int] = None
    seed: int = 0

    HELP = {
        "model": "deit_tiny, deit_small or deit_base (or a full timm DeiT name).",
        "data": "ImageNet-style folder with train/<class>/*.jpg and val/<class>/*.jpg (val/ optional: "
                "every 10th training image is held out instead).",
        "checkpoint": "local DeiT weights (.pth/.safetensors); default: timm's pretrained weights if cached offline.",
        "random_init": "start from random weights (smoke tests only; FAR needs a trained teacher).",
        "replacement": "the replacement for every attention block: mhlstm (FAR), gru or conv.",
        "batch_size": "images per step; learning rates are scaled by batch_size/512.",
        "stage1_epochs": "stage 1 length in epochs (FAR: 200); stage1_steps overrides.",
        "stage2_epochs": "stage 2 length in epochs (FAR: 100); 0 skips stage 2.",
        "recovery_epochs": "fine-tuning after pruning, epochs (FAR: 100).",
        "stage1_steps": "stage 1 length in steps (overrides stage1_epochs).",
        "stage2_steps": "stage 2 length in steps (overrides stage2_epochs).",
        "recovery_steps": "recovery length in steps (overrides recovery_epochs).",
        "base_lr_stage1": "stage 1 peak lr per 512 images (FAR: 5e-4).",
        "base_lr_stage2": "stage 2 peak lr per 512 images (FAR: 5e-5 for DeiT-T, 2e-5 for S/B; default).",
        "base_lr_recovery": "recovery peak lr per 512 images (FAR: 5e-6).",
        "warmup_epochs": "linear warm-up of stage 1 in epochs (FAR: 5).",
        "weight_decay": "AdamW weight decay (FAR: 0.05).",
        "mode": "stage 1 objective: e2e (FAR reference, student's own activations) or blockwise (teacher-forced).",
        "prune_ratio": "global pruning ratio after stage 2 (0 = no pruning), then recovery.",
        "augment": "DeiT training augmentation (RandAugment m9, random erasing 0.25).",
        "mixup": "Mixup alpha in stage 2 and recovery (timm.data.Mixup; DeiT/FAR: 0.8; 0 = off). Needs an "
                 "even batch_size.",
        "cutmix": "CutMix alpha in stage 2 and recovery (DeiT/FAR: 1.0; 0 = off); with both on, each batch "
                  "is mixed one way or the other with probability 0.5.",
        "label_smoothing": "label smoothing of the cross-entropy targets in stage 2 and recovery (DeiT: 0.1).",
        "drop_path": "stochastic depth (drop-path) rate of the last block, timm's linear rule (DeiT/FAR: 0.1); "
                     "the student trains in train mode in stage 2 and recovery so it acts.",
        "ema_decay": "EMA of the weights in stage 2 and recovery (timm ModelEmaV3; DeiT: 0.99996, a horizon of "
                     "25k steps; 0 = off); the stage's saved and evaluated model is the EMA. For short runs use "
                     "0 or ema_warmup.",
        "ema_warmup": "timm's EMA decay warm-up (decay grows from 0 towards ema_decay; not in DeiT).",
        "regularise_stage1": "also apply mixup/cutmix/label smoothing/drop-path/EMA in stage 1 (FAR's reference "
                             "does; off by default: stage 1 matches the teacher's blocks, and drop-path moves "
                             "the student's block inputs away from the teacher's).",
        "workers": "DataLoader worker processes.",
        "eval_images": "validation images for the accuracy report (default: all).",
        "limit_images": "use only this many training images (smoke tests).",
        "seed": "seed of data order and new-module initialisation.",
    }

    @property
    def timm_name(self) -> str:
        return DEIT_MODELS.get(self.model, self.model)

    @property
    def lr_stage1(self) -> float:
        return self.base_lr_stage1 * self.batch_size / REFERENCE_BATCH

    @property
    def lr_stage2(self) -> float:
        base = self.base_lr_stage2
        if base is None:
            base = 5e-5 if "tiny" in self.timm_name else 2e-5
        return base * self.batch_size / REFERENCE_BATCH

    @property
    def lr_recovery(self) -> float:
        return self.base_lr_recovery * self.batch_size / REFERENCE_BATCH

    def regularisers(self) -> dict[str, Any]:
        """``surgery.distill`` settings of DeiT's regularisers (stage 2 and recovery; stage 1 with
        ``regularise_stage1``); drop-path itself is built into the model (``drop_path``).

        Example:
            >>> DeitConfig().regularisers()["mixup"], DeitConfig(ema_decay=0).regularisers().get("ema_decay")
            (0.8, None)
        """
        settings: dict[str, Any] = {"mixup": self.mixup, "cutmix": self.cutmix,
                                    "label_smoothing": self.label_smoothing, "train_mode": self.drop_path > 0}
        if self.ema_decay:
            settings.update(ema_decay=self.ema_decay, ema_warmup=self.ema_warmup)
        return settings

    def check(self) -> None:
        """Every check that can fail before work starts (one-line errors)."""
        import timm

        from surgery.registry import list_replacements

        if "deit" not in self.timm_name or self.timm_name not in timm.list_models("deit*"):
            raise SurgeryError(f"model {self.model!r} is not a DeiT; use deit_tiny, deit_small or deit_base")
        if self.replacement not in list_replacements():
            raise SurgeryError(f"unknown replacement {self.replacement!r}; known: {', '.join(list_replacements())}")
        if self.mode not in ("e2e", "blockwise"):
            raise SurgeryError(f"mode must be e2e or blockwise, not {self.mode!r}")
        if self.batch_size < 1:
            raise SurgeryError(f"batch_size must be positive, not {self.batch_size}")
        if not 0 <= self.prune_ratio < 1:
            raise SurgeryError(f"prune_ratio must be in [0, 1), not {self.prune_ratio}")
        if self.mixup < 0 or self.cutmix < 0:
            raise SurgeryError(f"mixup and cutmix are alphas (>= 0, 0 = off), not {self.mixup} / {self.cutmix}")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise SurgeryError(f"mixup/cutmix pair each image with the batch flipped: batch_size must be even, "
                               f"not {self.batch_size}")
        if not 0 <= self.label_smoothing < 1:
            raise SurgeryError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if not 0 <= self.drop_path < 1:
            raise SurgeryError(f"drop_path must be in [0, 1), not {self.drop_path}")
        if not 0 <= self.ema_decay < 1:
            raise SurgeryError(f"ema_decay must be in [0, 1) (0 = off), not {self.ema_decay}")
        check_image_folder(self.data)
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise SurgeryError(f"checkpoint {self.checkpoint!r} does not exist; give a local weights file")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def check_image_folder(root: str) -> None:
    """Fail in one line unless ``root`` holds ``train/<class>/<image>`` (and a same-classes ``val/``).

    Example:
        >>> check_image_folder("/no/such/folder")
        Traceback (most recent call last):
        ...
        surgery.errors.DataError: dataset folder '/no/such/folder' does not exist; give --data ROOT with train/<class>/*.jpg
    """
    if not root:
        raise DataError("no dataset given; pass --data ROOT (an ImageNet-style folder with train/<class>/*.jpg)")
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset folder {root!r} does not exist; give --data ROOT with train/<class>/*.jpg")
    train = path / "train"
    if not train.is_dir():
        raise DataError(f"dataset folder {root!r} has no train/ sub-folder; expected train/<class>/*.jpg")
    classes = _classes(train)
    if not classes:
        raise DataError(f"{train} has no class sub-folders with images; expected train/<class>/*.jpg")
    val = path / "val"
    if val.is_dir():
        val_classes = _classes(val)
        if not val_classes:
            raise DataError(f"{val} has no class sub-folders with images; expected val/<class>/*.jpg")
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f"{val} has classes missing from train/ (e.g. {extra[0]!r}); the folders do not match")


def _classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir()
                  and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file()))


# ---------------------------------------------------------------------------------- DeiT data

class FolderBatches:
    """Re-iterable labelled batches from an image folder through a DataLoader; ``set_epoch``
    reseeds the shuffle so a resumed run sees the same order (what ``surgery.distill`` expects)."""

    def __init__(self, dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int,
                 drop_last: bool) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.workers, self.drop_last, self.epoch = workers, drop_last, 0
        if drop_last and len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}; "
                            "lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        from surgery.data import Labelled

        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator,
            num_workers=self.workers, drop_last=self.drop_last, persistent_workers=False)
        for images, labels in loader:
            yield Labelled(images, labels)


def deit_data(config: DeitConfig, model: nn.Module) -> tuple[FolderBatches, FolderBatches, int]:
    """Training and validation batches for ``model`` through timm's pipeline; also the class count."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=model)
    common = {"input_size": data_config["input_size"], "interpolation": data_config["interpolation"],
              "mean": data_config["mean"], "std": data_config["std"]}
    if config.augment:
        train_transform = create_transform(**common, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                           re_prob=0.25, re_mode="pixel", re_count=1, color_jitter=0.4)
    else:
        train_transform = create_transform(**common, is_training=False, crop_pct=data_config["crop_pct"])
    eval_transform = create_transform(**common, is_training=False, crop_pct=data_config["crop_pct"])
    root = Path(config.data)
    try:
        train = ImageDataset(str(root / "train"), transform=train_transform)
        if (root / "val").is_dir():
            val = ImageDataset(str(root / "val"), transform=eval_transform,
                               class_map={c: i for i, c in enumerate(_classes(root / "train"))})
        else:
            val = ImageDataset(str(root / "train"), transform=eval_transform)
            keep = list(range(9, len(val), 10))
            train = torch.utils.data.Subset(train, [i for i in range(len(train)) if i % 10 != 9])
            val = torch.utils.data.Subset(val, keep)
    except Exception as error:  # noqa: BLE001 - timm raises plain exceptions for unreadable folders
        raise DataError(f"cannot read dataset {config.data!r}: {str(error).splitlines()[0][:160]}") from None
    if config.limit_images is not None:
        train = torch.utils.data.Subset(train, list(range(min(config.limit_images, len(train)))))
    if config.eval_images is not None:
        val = torch.utils.data.Subset(val, list(range(min(config.eval_images, len(val)))))
    classes = len(_classes(root / "train"))
    batch = min(config.batch_size, len(train))
    return (FolderBatches(train, batch, shuffle=True, seed=config.seed, workers=config.workers, drop_last=True),
            FolderBatches(val, batch, shuffle=False, seed=0, workers=config.workers, drop_last=False),
            classes)


@torch.inference_mode()
def batches_accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy (percent) of ``model`` over labelled batches."""
    from surgery.data import split_batch

    model.eval()
    correct = total = 0
    for batch in data:
        args, kwargs, labels = split_batch(batch, labelled=True)
        logits = model(*args, **kwargs)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(1, total)


def _steps(epochs: float, steps: Optional[int], per_epoch: int) -> int:
    return steps if steps is not None else max(1, math.ceil(epochs * per_epoch)) if epochs > 0 else 0


def run_deit(config: DeitConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run FAR's DeiT recipe: stage 1, stage 2, optional pruning + recovery; write report.json/.md.

    Args:
        config: the settings (``DeitConfig``); checked before any work.
        out_dir: run directory; running again with the same directory resumes.
        log: one-line progress messages.

    Returns:
        The report dict (also written to ``out_dir/report.json``).

    Example:
        >>> run_deit(DeitConfig(model="deit_tiny", data="/data/imagenet"), "runs/far-deit-t")  # doctest: +SKIP
    """
    import surgery
    from surgery.models import load_model
    from surgery.progress import PrintProgress

    from surgery.recipes.report import write_report

    config.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = _load_deit(config)
    train, val, classes = deit_data(config, teacher)
    if teacher.num_classes != classes:
        if config.checkpoint is not None or not config.random_init:
            log(f"the dataset has {classes} classes, the model {teacher.num_classes}: a fresh head is trained "
                "in stage 2 (FAR's downstream-task protocol)")
        teacher.reset_classifier(classes)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}

    def build_teacher() -> nn.Module:
        # the base of every stage carries drop-path; it acts only where a stage trains in train mode
        model = _load_deit(config, weights=False, drop_path=config.drop_path)
        model.reset_classifier(classes)
        model.load_state_dict(state)
        return model.eval()

    per_epoch = len(train)
    plan = StagePlan(
        replacement=config.replacement,
        stage1_steps=_steps(config.stage1_epochs, config.stage1_steps, per_epoch), stage1_lr=config.lr_stage1,
        stage1_warmup=min(0.5, config.warmup_epochs / max(config.stage1_epochs, 1e-9)),
        stage2_steps=_steps(config.stage2_epochs, config.stage2_steps, per_epoch), stage2_lr=config.lr_stage2,
        prune_ratio=config.prune_ratio,
        recovery_steps=_steps(config.recovery_epochs, config.recovery_steps, per_epoch) if config.prune_ratio else 0,
        recovery_lr=config.lr_recovery, mode=config.mode, weight_decay=config.weight_decay, seed=config.seed,
        stage1_settings=config.regularisers() if config.regularise_stage1 else {},
        finetune_settings=config.regularisers())
    example = (torch.randn(1, *teacher.pretrained_cfg["input_size"]),)
    result = run_far(build_teacher, example, train, val, plan, out_dir / config.replacement,
                     evaluate=lambda m: {"val_accuracy": batches_accuracy(m, val)}, log=log,
                     progress=PrintProgress(every=50))
    surgery.save(result["model"], out_dir / "final", source=config.timm_name,
                 extra={"recipe": "deit", "config": _config_dict(config)})
    report = {"recipe": "deit", "model": config.timm_name, "replacement": config.replacement,
              "columns": ["stage", "steps", "seconds", "params", "val_accuracy", "site_cosine"],
              "rows": result["stages"], "config": _config_dict(config),
              "plan": asdict(plan), "notes": deit_deviations(config), "final": str(out_dir / "final")}
    write_report(out_dir, report)
    return report


def deit_deviations(config: DeitConfig) -> list[str]:
    """How this run departs from FAR's DeiT reference (written into every report).

    Example:
        >>> deit_deviations(DeitConfig(mixup=0.5))[1]
        'regularisers differ from DeiT/FAR: mixup=0.5 (reference 0.8)'
    """
    notes = []
    if not config.regularise_stage1:
        notes.append("Mixup/CutMix, label smoothing, drop-path and EMA in stage 2 and recovery only (FAR also uses "
                     "them in stage 1; regularise_stage1=true)")
    reference = {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "drop_path": 0.1, "ema_decay": 0.99996}
    changed = [f"{k}={getattr(config, k)} (reference {v})" for k, v in reference.items() if getattr(config, k) != v]
    if changed:
        notes.append("regularisers differ from DeiT/FAR: " + ", ".join(changed))
    if config.ema_warmup:
        notes.append("EMA with timm's decay warm-up (DeiT: a fixed decay)")
    if not config.augment:
        notes.append("no RandAugment / random erasing (augment=false)")
    return notes


def _config_dict(config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _load_deit(config: DeitConfig, weights: bool = True, drop_path: float = 0.0) -> nn.Module:
    from surgery.models import load_model

    if not weights:
        if not drop_path:
            return load_model(config.timm_name, random_init=True)
        import timm

        from surgery.models import parse_model_spec

        # timm's own stochastic depth: rates rising linearly over the blocks up to drop_path
        model = timm.create_model(config.timm_name, pretrained=False, drop_path_rate=drop_path)
        model.surgery_source = str(parse_model_spec(config.timm_name))  # as load_model records it
        return model.eval()
    try:
        return load_model(config.timm_name, random_init=config.random_init, checkpoint=config.checkpoint)
    except ManifestError:
        raise
    except WeightsUnavailableError:
        raise
    except (RuntimeError, KeyError, ValueError) as error:
        # a checkpoint of another model: load_state_dict names missing/unexpected keys or shapes
        first = str(error).strip().splitlines()[0][:160]
        raise SurgeryError(f"checkpoint {config.checkpoint!r} does not fit {config.timm_name}: {first}") from None


def _register() -> None:
    from surgery.recipes import register_recipe

    register_recipe("deit", "FAR's recipe for DeiT-T/S/B on an ImageNet-style folder: replace every attention "
                    "block, stage 1 distillation (new modules only, block-wise MSE + CE), stage 2 full "
                    "fine-tuning with DeiT's Mixup 0.8 / CutMix 1.0, label smoothing 0.1, drop-path 0.1 and "
                    "EMA (timm's implementations), optional global pruning + recovery; lr scaled by batch/512.",
                    DeitConfig, run_deit)


_register()
