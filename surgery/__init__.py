"""surgery: architecture surgery on pretrained transformers.

Find every attention block, replace it with a cheaper learnable sequence mixer (multi-head LSTM,
GRU, convolution), distill the replacements against the original attention, then prune.
"""

from surgery.checkpoint import load, save
from surgery.distill import DistillResult, distill, evaluate_fidelity
from surgery.errors import (
    DataError,
    ManifestError,
    NoAttentionFoundError,
    PruningError,
    SurgeryError,
    UnknownNameError,
    UnsupportedSiteError,
    WeightsUnavailableError,
)
from surgery.locate import find_attention
from surgery.prune import PruneReport, prune
from surgery.registry import MixerShape, ReplacementConfig, list_replacements, register_replacement
from surgery.sites import AttentionSite, SiteList, SkippedSite
from surgery.swap import (
    ReplacedAttention,
    ReplacementReport,
    count_parameters,
    finalize,
    replace_attention,
    restore_attention,
    use_original_attention,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "DataError",
    "DistillResult",
    "ManifestError",
    "PruneReport",
    "MixerShape",
    "NoAttentionFoundError",
    "PruningError",
    "ReplacedAttention",
    "ReplacementConfig",
    "ReplacementReport",
    "SiteList",
    "SkippedSite",
    "SurgeryError",
    "UnknownNameError",
    "UnsupportedSiteError",
    "WeightsUnavailableError",
    "count_parameters",
    "distill",
    "evaluate_fidelity",
    "finalize",
    "find_attention",
    "list_replacements",
    "prune",
    "load",
    "register_replacement",
    "replace_attention",
    "restore_attention",
    "save",
    "use_original_attention",
]
