"""Global structural pruning of replaced models through torch-pruning (see docs/pruning.md)."""

from surgery.prune.engine import PruneReport, build_graph, prune
from surgery.prune.groups import Bundle, ReplacementPruner, UnitSet
from surgery.prune.importance import IMPORTANCES, hoyer_square

__all__ = ["IMPORTANCES", "Bundle", "PruneReport", "ReplacementPruner", "UnitSet", "build_graph",
           "hoyer_square", "prune"]
