"""FAR's recipe for DeiT-T/S/B: replace every attention block, distil, fine-tune, optionally prune.

The stages run through the generic stage runner (``recipes.far.run_far``: each stage a
``surgery.distill`` run directory under ``--out``, so each one resumes after an interruption and a
finished stage is reloaded instead of rerun); this module supplies DeiT's model, data and settings:

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
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from surgery.errors import DataError, ManifestError, SurgeryError, WeightsUnavailableError
# the generic stage runner, also importable from here (its home before the split)
from surgery.recipes.far import DEVIATIONS, StagePlan, StageRunner, batches_accuracy, run_far  # noqa: F401

REFERENCE_BATCH = 512


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


#: DeiT's RandAugment, with magnitudes clipped at 9 (``mmax9``): with ``mstd0.5`` a sampled magnitude
#: of 10 gives PosterizeIncreasing 0 bits, which Pillow >= 11 refuses (ValueError in a loader worker,
#: at random). At 9 posterize keeps at least 1 bit; magnitudes above 9 are drawn ~2% of the time.
RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


def deit_data(config: DeitConfig, model: nn.Module) -> tuple[FolderBatches, FolderBatches, int]:
    """Training and validation batches for ``model`` through timm's pipeline; also the class count."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=model)
    common = {"input_size": data_config["input_size"], "interpolation": data_config["interpolation"],
              "mean": data_config["mean"], "std": data_config["std"]}
    if config.augment:
        train_transform = create_transform(**common, is_training=True, auto_augment=RAND_AUGMENT,
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
