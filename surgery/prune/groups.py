"""Pruning groups (kept for imports of earlier versions): the definitions live in ``surgery.units``,
below both pruning and distillation."""

from surgery.units import (  # noqa: F401
    Bundle,
    OpaqueMixerPruner,
    ReplacementPruner,
    UnitSet,
    _cut_linear,
    cut_linear,
    score_units,
    shrink,
)

__all__ = ["Bundle", "OpaqueMixerPruner", "ReplacementPruner", "UnitSet", "cut_linear", "score_units", "shrink"]
