"""Training-time regularisers of ``surgery.distill``: Mixup/CutMix, soft-label cross-entropy, an EMA
of the weights, and the student's train mode (drop-path, dropout).

The work is done by timm's own implementations (``timm.data.Mixup``, ``timm.loss.SoftTargetCrossEntropy``,
``timm.utils.ModelEmaV3``); this module makes them reproducible: a batch transform runs under random
number generators seeded from (run seed, step, process), so a resumed run mixes every batch exactly as
an uninterrupted one, and the EMA is saved with the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import DataError, SurgeryError

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on integer labels ``[B]`` or on soft / mixed targets ``[B, C]`` (rows summing to 1).

    Soft targets use ``timm.loss.SoftTargetCrossEntropy`` and are taken as given (Mixup has already
    smoothed them); ``label_smoothing`` applies to integer labels only.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> hard = classification_loss(logits, torch.tensor([0, 1]))
        >>> soft = classification_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> bool(torch.isclose(hard, soft))
        True
    """
    if labels.is_floating_point():
        from timm.loss import SoftTargetCrossEntropy

        if labels.shape != logits.shape:
            raise DataError(f"soft labels of shape {tuple(labels.shape)} do not fit logits of shape "
                            f"{tuple(logits.shape)}; give one probability row per sample and class")
        return SoftTargetCrossEntropy()(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def build_mixup(mixup: float, cutmix: float, probability: float, switch_probability: float,
                label_smoothing: float, classes: int) -> BatchTransform | None:
    """A ``timm.data.Mixup`` (per-batch mode, as DeiT uses), or None when both alphas are 0.

    Example:
        >>> build_mixup(0.8, 1.0, 1.0, 0.5, 0.1, classes=10).cutmix_alpha
        1.0
    """
    if mixup < 0 or cutmix < 0:
        raise SurgeryError(f"mixup and cutmix are Beta-distribution alphas (>= 0), not {mixup} / {cutmix}")
    if mixup == 0 and cutmix == 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=probability, switch_prob=switch_probability,
                 mode="batch", label_smoothing=label_smoothing, num_classes=classes)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit seed for one step of one process (stable across runs and Python versions)."""
    digest = hashlib.sha256(f"surgery-batch-transform/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def check_transformable(args: tuple, kwargs: dict, labels: torch.Tensor | None, even: bool) -> None:
    """Fail in one line unless the batch is labelled images ``[B, C, H, W]`` (an even B for Mixup)."""
    if labels is None:
        raise DataError("mixup/cutmix or a batch_transform needs labelled batches (Labelled(images, labels) "
                        "or (images, labels)); this data has no labels")
    if labels.is_floating_point():
        raise DataError("mixup/cutmix or a batch_transform makes soft labels itself; give integer labels")
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        raise DataError("mixup/cutmix or a batch_transform needs image batches: one [B, C, H, W] tensor "
                        "and its labels")
    if even and args[0].shape[0] % 2:
        raise DataError(f"mixup/cutmix pairs each image with the batch flipped and needs an even batch size, "
                        f"not {args[0].shape[0]}")


def transform_batch(transform: BatchTransform, images: torch.Tensor, labels: torch.Tensor, *,
                    seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``transform(images, labels)`` on a copy of the images, with numpy, Python and torch random
    number generators seeded from (seed, step, rank) and restored afterwards.

    The run's own random streams (data order, drop-path) are therefore untouched, and a resumed run
    transforms step ``step`` exactly as an uninterrupted one.

    Example:
        >>> mix = build_mixup(0.8, 1.0, 1.0, 0.5, 0.1, classes=3)
        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> a = transform_batch(mix, x, y, seed=0, step=5, rank=0)
        >>> b = transform_batch(mix, x, y, seed=0, step=5, rank=0)
        >>> bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])), tuple(a[1].shape)
        (True, (4, 3))
    """
    derived = step_seed(seed, step, rank)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = [images.device] if images.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(derived)
            if devices:
                with torch.cuda.device(images.device):
                    torch.cuda.manual_seed(derived)
            np.random.seed(derived)
            random.seed(derived)
            # timm's Mixup mixes in place: never touch the caller's (possibly reused) batch
            return transform(images.clone(), labels)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside the block; each one's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def build_ema(model: nn.Module, decay: float, warmup: bool) -> Any:
    """A ``timm.utils.ModelEmaV3`` of ``model`` (a deep copy on the same device).

    Example:
        >>> ema = build_ema(nn.Linear(2, 2), 0.999, warmup=False)
        >>> ema.decay
        0.999
    """
    if not 0 < decay < 1:
        raise SurgeryError(f"ema_decay must be in (0, 1) (0 turns the EMA off), not {decay}")
    from timm.utils import ModelEmaV3

    # exclude_buffers: the update walks parameters(), which lists a tied weight once (a replaced site's
    # out-projection is the original's); the default walks state_dict(), which lists it under each name
    # and so averages it twice per step. Buffers are copied from the model instead of averaged.
    return ModelEmaV3(model, decay=decay, use_warmup=warmup, exclude_buffers=True)


def ema_entries(ema: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA's values of the trained parameters ``names`` and of every buffer, cloned to the CPU.

    Frozen parameters are left out: their average equals the parameter exactly (``lerp`` of equal
    values), so a resumed run rebuilds them from the model.
    """
    state = ema.module.state_dict()
    wanted = set(names) | {name for name, _ in ema.module.named_buffers()}
    keep = [n for n in state if n in wanted]
    return {n: state[n].detach().cpu().clone() for n in keep}


@torch.no_grad()
def load_entries(module: nn.Module, entries: dict[str, torch.Tensor]) -> None:
    """Copy ``entries`` (name -> tensor, as from ``ema_entries``) into ``module``'s state in place."""
    state = module.state_dict()
    missing = [n for n in entries if n not in state]
    if missing:
        raise SurgeryError(f"the EMA in the checkpoint does not fit the model ({missing[:2]})")
    for name, value in entries.items():
        state[name].copy_(value)
