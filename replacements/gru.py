"""Multi-head bidirectional GRU: FAR's layout with GRU cells (3 gates instead of 4)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .recurrent import MultiHeadRecurrent, MultiHeadRecurrentConfig, recurrent_hooks
from surgery.registry import register_replacement


@dataclass(frozen=True)
class MultiHeadGRUConfig(MultiHeadRecurrentConfig):
    """Hyper-parameters of ``gru`` (see ``MultiHeadRecurrentConfig``)."""


@register_replacement("gru", config=MultiHeadGRUConfig, **recurrent_hooks())
class MultiHeadGRU(MultiHeadRecurrent):
    """Multi-head bidirectional GRU; forward-only at causal sites."""

    rnn_class = nn.GRU
