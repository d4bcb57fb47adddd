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

import torch_pruning as tp

from surgery.sparsity import hoyer_square  # noqa: F401  (defined below both prune and distill)

IMPORTANCES = ("magnitude", "taylor", "hoyer")


def torch_pruning_importance(criterion: str) -> tp.importance.Importance:
    """The torch-pruning importance that scores MLP channel groups exactly like our unit scores."""
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, bias=True)
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)
