"""Prunable units of replacements, shared by pruning, distillation and the replacements themselves.

A *unit set* is a list of units of one module (e.g. the hidden units of one direction of one LSTM
layer of one head). Each unit owns slices of several tensors: for an LSTM hidden unit, its 4 gate
rows of ``weight_ih``/``weight_hh``/biases, its column of ``weight_hh`` and its column of the
consumer (the next layer's ``weight_ih`` or the head's ``out`` Linear). A *bundle* ties unit sets
that must lose the same number of units (nn.LSTM needs one hidden size for both directions and all
layers); units of a bundle are paired by rank, so each direction and layer drops its own weakest
units. A bundle is the thing the global ranking prunes: one head, one conv mixer, one MLP layer.

This module sits below both ``surgery.prune`` and ``surgery.distill`` (and below the replacements,
whose pruners subclass ``ReplacementPruner``), so none of them imports another through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from surgery.errors import PruningError


@dataclass
class UnitSet:
    """Units of one module and the tensor slices each owns.

    Args:
        name: readable name (e.g. "l0.forward").
        size: number of units.
        parts: (parameter path relative to the bundle's module, dim, index matrix [size, k]):
            unit u owns indices ``index[u]`` of that parameter along ``dim``.
    """

    name: str
    size: int
    parts: list[tuple[str, int, torch.Tensor]]

    def unit_values(self, module: nn.Module, use_grad: bool = False) -> list[torch.Tensor]:
        """Per part, a [size, m] tensor of the values (or w * grad) each unit owns (keeps autograd)."""
        values = []
        for path, dim, index in self.parts:
            tensor = module.get_parameter(path)
            if use_grad:
                if tensor.grad is None:
                    raise PruningError(f"{path} has no gradient; Taylor importance needs a backward pass")
                tensor = tensor.detach() * tensor.grad
            picked = tensor.index_select(dim, index.flatten().to(tensor.device)).movedim(dim, 0)
            values.append(picked.reshape(self.size, -1))
        return values

    def sum_of_squares(self, module: nn.Module) -> torch.Tensor:
        """Per unit, the sum of squared weights it owns (differentiable: used by the Hoyer penalty)."""
        return sum(v.pow(2).sum(1) for v in self.unit_values(module))


@dataclass
class Bundle:
    """Unit sets that lose the same number of units; the unit of the global ranking.

    Args:
        name: qualified name shown in reports (e.g. "blocks.0.attn.mixer.heads.1").
        kind: "recurrent", "conv" or "mlp"; scores are normalised per kind before the global ranking.
        size: units per set (all sets of a bundle have the same size).
        score: ``score(criterion) -> list[Tensor[size]]``, one importance vector per set.
        apply: ``apply(removed: list[list[int]])`` removes these units (per set) for real.
        modules: modules ``apply`` changes (snapshotted so a failure can be undone).
        set_names: names of the sets, for reports.
        owner: the module the unit sets' parameter paths are relative to (None for MLP groups).
        unit_sets: the unit sets (empty for torch-pruning's MLP groups).
    """

    name: str
    kind: str
    size: int
    score: Callable[[str], list[torch.Tensor]]
    apply: Callable[[list[list[int]]], None]
    modules: list[nn.Module] = field(default_factory=list)
    set_names: list[str] = field(default_factory=list)
    owner: nn.Module | None = None
    unit_sets: list[UnitSet] = field(default_factory=list)


def shrink(module: nn.Module, sets: Sequence[UnitSet], removed: Sequence[Sequence[int]]) -> None:
    """Remove units for real: every tensor slice the removed units own is cut out (no masks).

    Gradients of changed parameters are dropped (their shapes no longer match).
    """
    cuts: dict[str, dict[int, set[int]]] = {}
    for unit_set, units in zip(sets, removed):
        if not len(units):
            continue
        for path, dim, index in unit_set.parts:
            cuts.setdefault(path, {}).setdefault(dim, set()).update(index[list(units)].flatten().tolist())
    for path, dims in cuts.items():
        owner_path, _, attribute = path.rpartition(".")
        owner = module.get_submodule(owner_path)
        old = getattr(owner, attribute)
        new = old.detach()
        for dim, drop in dims.items():
            keep = [i for i in range(new.shape[dim]) if i not in drop]
            new = new.index_select(dim, torch.tensor(keep, dtype=torch.long, device=new.device))
        setattr(owner, attribute, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))


def score_units(module: nn.Module, unit_set: UnitSet, criterion: str) -> torch.Tensor:
    """Importance of each unit of ``unit_set`` under ``criterion`` (see ``surgery.prune.importance``)."""
    with torch.no_grad():
        if criterion == "taylor":
            return sum(v.abs().sum(1) for v in unit_set.unit_values(module, use_grad=True)).float()
        squares = unit_set.sum_of_squares(module).float()
        return squares.sqrt() if criterion == "hoyer" else squares


class ReplacementPruner(BasePruningFunc):
    """torch-pruning pruner of a replacement mixer, plus its internal units.

    Toward torch-pruning's dependency graph the mixer is one layer: ``input_dim`` channels in
    (``pre_proj`` columns) and ``output_dim`` channels out (the context that feeds the reused output
    projection). Its internal units (LSTM/GRU hidden units per head and direction, conv channels)
    touch nothing outside the mixer, so they are pruned through ``bundles``.

    Subclasses implement ``unit_bundles`` and the channel functions.
    """

    TARGET_MODULES = None  # replacements are user-registrable classes, checked by the engine

    #: the submodule (a Linear) that reads the mixer's input: the pruner's own declaration of where
    #: its input channels live (None: the mixer cannot lose input channels)
    input_layer: str | None = "pre_proj"

    def _input_linear(self, layer: nn.Module) -> nn.Linear | None:
        found = getattr(layer, self.input_layer, None) if self.input_layer else None
        return found if isinstance(found, nn.Linear) else None

    def get_in_channels(self, layer: nn.Module) -> int:
        linear = self._input_linear(layer)
        return linear.in_features if linear is not None else layer.shape.input_dim

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.shape.output_dim

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        linear = self._input_linear(layer)
        if linear is None:
            raise PruningError(f"{type(layer).__name__} without a pre-projection cannot lose input channels")
        cut_linear(linear, idxs, dim=1)
        return layer

    def unit_bundles(self, layer: nn.Module, name: str) -> list[Bundle]:
        """The bundles of internal units of ``layer`` (called ``name`` in the model); none by default
        (the mixer then joins the dependency graph but the global ranking finds nothing inside)."""
        return []


def cut_linear(linear: nn.Linear, idxs: Sequence[int], dim: int) -> None:
    """Remove output rows (dim 0, bias too) or input columns (dim 1) of a Linear."""
    drop = set(int(i) for i in idxs)
    size = linear.weight.shape[dim]
    keep = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long,
                        device=linear.weight.device)
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach().index_select(dim, keep).contiguous(),
                                 requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.detach()[keep].contiguous(), requires_grad=bias.requires_grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


class OpaqueMixerPruner(ReplacementPruner):
    """Stand-in for a replacement that registered no pruner: it joins the graph but refuses changes."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise PruningError(f"replacement {type(layer).__name__} has no pruner; it cannot be pruned")

    prune_out_channels = prune_in_channels

    def unit_bundles(self, layer: nn.Module, name: str) -> list[Bundle]:
        return []


_cut_linear = cut_linear  # the name replacements of earlier versions imported
