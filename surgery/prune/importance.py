"""Importance criteria (one formula for replacement units and MLP channels) and FAR's Hoyer-Square
group regulariser.

- ``magnitude``: sum of squared weights a unit owns (torch-pruning's group magnitude, p=2, summed
  over the group, biases included).
- ``taylor``: sum of |w * dL/dw| over the weights a unit owns (first-order Taylor; needs a
  backward pass on a few batches).
- ``hoyer``: the L2 norm of the weights a unit owns (FAR: train with the Hoyer-Square penalty so
  unneeded groups shrink, then cut with one global threshold on group norms, never a signed sum).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

IMPORTANCES = ("magnitude", "taylor", "hoyer")


def torch_pruning_importance(criterion: str) -> tp.importance.Importance:
    """The torch-pruning importance that scores MLP channel groups exactly like our unit scores."""
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, bias=True)
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)


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
    from surgery.prune.engine import replacement_bundles_sets

    norms = []
    for module, unit_set in replacement_bundles_sets(model):
        norms.append(unit_set.sum_of_squares(module).clamp_min(1e-12).sqrt())
    if not norms:
        return torch.zeros(())
    norms = torch.cat(norms)
    return norms.sum().pow(2) / norms.pow(2).sum()
