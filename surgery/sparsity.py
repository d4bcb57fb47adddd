"""The prunable units of a replaced model and FAR's Hoyer-Square penalty over them.

Distillation adds the penalty to its loss and pruning ranks the same units afterwards; both import
this module, neither imports the other.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from surgery.registry import get_replacement
from surgery.swap import replaced_sites
from surgery.units import UnitSet


def replacement_unit_sets(model: nn.Module) -> Iterator[tuple[nn.Module, UnitSet]]:
    """(owner module, unit set) for every unit set of every prunable replacement of ``model``."""
    for wrapper in replaced_sites(model):
        pruner = get_replacement(wrapper.replacement).make_pruner()
        if pruner is None:
            continue
        for bundle in pruner.unit_bundles(wrapper.mixer, wrapper.site.name):
            for unit_set in bundle.unit_sets:
                yield bundle.owner, unit_set


#: the name ``surgery.prune.engine`` used for it
replacement_bundles_sets = replacement_unit_sets


def hoyer_square(model: nn.Module) -> torch.Tensor:
    """FAR's Hoyer-Square group regulariser over every prunable unit of the replacements.

    (sum_g ||w_g||)^2 / sum_g ||w_g||^2 with g running over the units (hidden unit of a head and
    direction, conv channel). It is scale-invariant and smallest when few groups carry the weight:
    add ``weight * hoyer_square(model)`` (FAR: weight 5e-5) to the distillation loss, then prune
    with ``importance="hoyer"`` (a global threshold on group L2 norms).

    Args:
        model: a model with replaced sites whose replacements have pruners.

    Returns:
        A differentiable scalar (0 when the model has no prunable replacement units).

    Example:
        >>> import torch, surgery
        >>> from surgery.prune import hoyer_square
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> float(hoyer_square(model))
        0.0
    """
    norms = []
    for module, unit_set in replacement_unit_sets(model):
        norms.append(unit_set.sum_of_squares(module).clamp_min(1e-12).sqrt())
    if not norms:
        return torch.zeros(())
    norms = torch.cat(norms)
    return norms.sum().pow(2) / norms.pow(2).sum()
