"""Batches: the batch forms distillation accepts (``split_batch``), moving them between devices, and
``Batches``, the re-iterable, deterministically shuffled batch source every built-in returns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from surgery.errors import DataError


@dataclass
class Labelled:
    """A labelled batch: model inputs (tensor, tuple or dict) and class labels ``[B]``."""

    inputs: Any
    labels: torch.Tensor


def split_batch(batch: Any, labelled: bool | None = None) -> tuple[tuple, dict, torch.Tensor | None]:
    """Turn a batch into ``(args, kwargs, labels or None)``.

    Args:
        batch: tensor, tuple/list, dict or ``Labelled`` (see the module docstring).
        labelled: True = a 2-tuple is ``(inputs, labels)``; False = never; None = auto-detect.

    Example:
        >>> args, kwargs, labels = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> tuple(args[0].shape), labels.tolist()
        ((2, 3), [0, 1])
    """
    labels = None
    if isinstance(batch, Labelled):
        batch, labels = batch.inputs, batch.labels
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and labelled is not False:
        first, second = batch
        looks_labelled = (isinstance(second, torch.Tensor) and second.dim() == 1
                          and not second.is_floating_point() and _batch_size(first) == len(second))
        if labelled or looks_labelled:
            batch, labels = first, second
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, labels
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return (), dict(batch), labels
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, labels
    raise DataError(f"a batch must be a tensor, a tuple, a dict or Labelled(inputs, labels), not "
                    f"{type(batch).__name__}")


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else None
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        for item in inputs:
            if isinstance(item, torch.Tensor) and item.dim():
                return item.shape[0]
    return None


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """Number of samples in a batch given as (args, kwargs)."""
    size = _batch_size(list(args) + list(kwargs.values()))
    return size or 1


def padding_mask_of(kwargs: dict) -> torch.Tensor | None:
    """The [B, N] real-token mask of a tokenised batch (``attention_mask``), or None."""
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move every tensor in a nested tuple/list/dict to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Labelled):
        return Labelled(to_device(value.inputs, device), value.labels.to(device))
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


#: batches' worth of shuffled samples sorted by length together when ``Batches`` groups by length
#: (HuggingFace's LengthGroupedSampler uses 50): large enough for little padding, small enough that
#: the batches' lengths still mix
GROUP_BATCHES = 50


class Batches:
    """Re-iterable batches over ``size`` samples: ``make(indices) -> batch``, shuffled per epoch.

    Args:
        size: number of samples.
        make: builds one batch from a list of sample indices.
        batch_size: samples per batch.
        shuffle: True: a new permutation of the samples every epoch, from ``seed`` and the epoch
            (deterministic); ``"batches"``: the batches are formed once (from ``seed``) and only their
            order changes per epoch, so every epoch repeats the same batches (what a teacher cache,
            keyed by the batch's content, needs to hit); False: in order.
        seed: base seed of the permutations.
        drop_last: drop a last, smaller batch (keeps every step the same shape).
        lengths: each sample's length (tokens); when given, shuffled batches group samples of similar
            length (``GROUP_BATCHES`` batches' worth of shuffled samples sorted by length, cut into
            batches, the batches shuffled), as HuggingFace's ``group_by_length``: padded to the
            longest in their batch, text batches then carry far less padding. Ignored unshuffled.

    Example:
        >>> data = Batches(10, lambda idx: torch.tensor(idx), batch_size=4, shuffle=False)
        >>> [b.tolist() for b in data]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """

    def __init__(self, size: int, make: Callable[[list[int]], Any], batch_size: int, *,
                 shuffle: bool | str = True, seed: int = 0, drop_last: bool = True, description: str = "",
                 lengths: Sequence[int] | None = None) -> None:
        if shuffle not in (True, False, "batches"):
            raise DataError(f"shuffle must be True, False or 'batches', not {shuffle!r}")
        if size < batch_size and drop_last:
            raise DataError(f"{description or 'the data'} has {size} samples, fewer than one batch of "
                            f"{batch_size}; lower --batch-size")
        self.size, self.make, self.batch_size = size, make, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.description = description
        if lengths is not None and len(lengths) != size:
            raise DataError(f"{len(lengths)} lengths for {size} samples")
        self.lengths = list(lengths) if lengths is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def _permutation(self, size: int, seed: int) -> list[int]:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()

    def _grouped(self, order: list[int]) -> list[int]:
        """``order`` with every run of ``GROUP_BATCHES`` batches' samples sorted by length (longest first)."""
        if self.lengths is None:
            return order
        group = self.batch_size * GROUP_BATCHES
        return [i for start in range(0, len(order), group)
                for i in sorted(order[start:start + group], key=lambda i: -self.lengths[i])]

    def __iter__(self):
        if self.shuffle == "batches":
            order = self._grouped(self._permutation(self.size, self.seed * 100003 - 1))  # the same every epoch
            starts = [order_index * self.batch_size for order_index in range(len(self))]
            starts = [starts[k] for k in self._permutation(len(self), self.seed * 100003 + self.epoch)]
        elif self.shuffle and self.lengths is not None:
            order = self._grouped(self._permutation(self.size, self.seed * 100003 + self.epoch))
            starts = [k * self.batch_size for k in range(len(self))]
            # batches in a random order, or every group would run from its longest to its shortest
            starts = [starts[k] for k in self._permutation(len(self), self.seed * 100003 + self.epoch + 7919)]
        else:
            order = self._permutation(self.size, self.seed * 100003 + self.epoch) if self.shuffle \
                else list(range(self.size))
            starts = list(range(0, len(self) * self.batch_size, self.batch_size))
        for start in starts:
            yield self.make(order[start:start + self.batch_size])

    def __repr__(self) -> str:
        return f"Batches({self.description or self.size}, batch_size={self.batch_size}, batches={len(self)})"


def random_batches(model: nn.Module, *, batches: int = 64, batch_size: int = 8, seq_len: int = 16,
                   seed: int = 0) -> Batches:
    """Random inputs shaped like the model's example inputs (smoke tests, not real distillation)."""
    from surgery.inputs import default_example_inputs

    args, kwargs = default_example_inputs(model, batch=batch_size, seq_len=seq_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)

    def fresh(value: torch.Tensor, generator: torch.Generator, key: str = "") -> torch.Tensor:
        if value.is_floating_point():
            return torch.randn(value.shape, generator=generator)
        if key == "input_ids" and vocab:
            return torch.randint(0, vocab, value.shape, generator=generator)
        return value.clone()

    def make(indices: list[int]) -> Any:
        generator = torch.Generator().manual_seed(seed * 7919 + indices[0])
        if kwargs:
            return {k: fresh(v, generator, k) for k, v in kwargs.items()}
        made = tuple(fresh(a, generator) for a in args)
        return made[0] if len(made) == 1 else made

    # one "sample" per batch: the index seeds the batch
    return Batches(batches, make, 1, shuffle=True, seed=seed, description=f"{batches} random batches")
