"""Batched training forms during distillation: mixers of one replacement that can run together
(same batch, same mask; in block-wise mode every site) go through one call of their replacement's
``training_form`` (``surgery.registry.BatchedTraining``); the rest use their own forward.

A replacement module already runs its batched training form by itself when it trains; what this
adds is batching ACROSS sites. ``fast=False`` (``enabled=False``) runs the reference forms instead
(``surgery.registry.reference_forms``); every form computes the same function.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from surgery.registry import BatchedTraining, reference_forms, replacement_of

#: work per time step (the training form's ``cost``) above which sites go to separate calls: one
#: huge recurrence over every site stops fitting in cache and gets slower (DeiT-T, batch 32, one
#: thread: 8.9 CPU s per block-wise step with all 12 sites in one recurrence, 4.8 s one by one)
SITE_GROUP_ELEMENTS = 1 << 16


def _training_form(mixer: nn.Module) -> tuple[BatchedTraining, object] | None:
    spec = replacement_of(mixer)
    form = spec.training_form if spec is not None else None
    if form is None:
        return None
    key = form.key(mixer)
    return None if key is None else (form, (spec.name, key))


def supports(mixer: nn.Module) -> bool:
    """Whether ``mixer``'s replacement has a batched training form that takes this mixer."""
    return _training_form(mixer) is not None


def batched_forward(mixers: list[nn.Module], inputs: list[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Run several mixers of one replacement (same batch shape) in one call of its training form.

    Args:
        mixers: mixers for which ``supports`` is True, with equal batch keys.
        inputs: their inputs [B, N, D_i].
        mask: the shared padding mask [B, N] (True = real token) or None.

    Returns:
        Their outputs, equal to ``mixer(x, mask)``.
    """
    found = [_training_form(m) for m in mixers]
    if any(f is None for f in found) or len({f[1] for f in found}) != 1:
        return [m(x, mask) for m, x in zip(mixers, inputs)]
    return found[0][0].run(mixers, inputs, mask)


class fast_mixers:
    """Within this context the mixers of ``model`` run their batched training forms (what they do by
    themselves); with ``enabled=False`` they run their reference forms."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.enabled = enabled
        self._context: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> "fast_mixers":
        if not self.enabled:
            self._context = reference_forms()
            self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None


def site_forward(mixers: list[nn.Module], inputs: list[torch.Tensor],
                 masks: list[torch.Tensor | None], enabled: bool = True) -> list[torch.Tensor]:
    """Each mixer applied to its input: mixers with one batch key sharing one mask go through one
    call of their training form; the rest use their own forward."""
    if not enabled:
        with reference_forms():
            return [m(x, mask) for m, x, mask in zip(mixers, inputs, masks)]
    results: list[torch.Tensor | None] = [None] * len(mixers)
    groups: dict[object, list[int]] = {}
    forms: dict[object, BatchedTraining] = {}
    for i, mixer in enumerate(mixers):
        found = _training_form(mixer)
        if found is None or not _same_mask(masks[i], masks[0]):
            continue
        form, key = found
        groups.setdefault(key, []).append(i)
        forms[key] = form
    for key, members in groups.items():
        form = forms[key]
        start = 0
        while start < len(members):
            chunk = [members[start]]
            size = form.cost(mixers[chunk[0]], inputs[chunk[0]]) if form.cost else 0
            while form.cost and start + len(chunk) < len(members):
                nxt = members[start + len(chunk)]
                extra = form.cost(mixers[nxt], inputs[nxt])
                if size + extra > SITE_GROUP_ELEMENTS:
                    break
                chunk.append(nxt)
                size += extra
            if not form.cost:
                chunk = members[start:]
            outputs = form.run([mixers[i] for i in chunk], [inputs[i] for i in chunk], masks[chunk[0]])
            for i, out in zip(chunk, outputs):
                results[i] = out
            start += len(chunk)
    for i, mixer in enumerate(mixers):
        if results[i] is None:
            results[i] = mixer(inputs[i], masks[i])
    return results


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
