"""FAR's multi-head bidirectional LSTM (arXiv 2505.21535), with real per-head weights."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .recurrent import MultiHeadRecurrent, MultiHeadRecurrentConfig, recurrent_hooks
from surgery.registry import register_replacement


@dataclass(frozen=True)
class MultiHeadLSTMConfig(MultiHeadRecurrentConfig):
    """Hyper-parameters of ``mhlstm`` (see ``MultiHeadRecurrentConfig``)."""


@register_replacement("mhlstm", config=MultiHeadLSTMConfig, **recurrent_hooks())
class MultiHeadLSTM(MultiHeadRecurrent):
    """Multi-head bidirectional LSTM (FAR); forward-only at causal sites."""

    rnn_class = nn.LSTM
