"""Shared machinery of the multi-head recurrent replacements (LSTM and GRU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.registry import MixerShape, ReplacementConfig


@dataclass(frozen=True)
class MultiHeadRecurrentConfig(ReplacementConfig):
    """Hyper-parameters of a multi-head recurrent replacement.

    Args:
        hidden_per_head: recurrent state size per head and direction; None = the head dim.
        num_layers: stacked recurrent layers per head.
        bidirectional: read the sequence both ways (forced off at causal sites).
        pre_projection: a fresh Linear(D, heads * head_dim) in front of the heads (FAR's pre_proj).
    """

    hidden_per_head: int | None = None
    num_layers: int = 1
    bidirectional: bool = True
    pre_projection: bool = True


class RecurrentHead(nn.Module):
    """One head: a recurrent network over its slice of channels and a Linear back to the head dim."""

    def __init__(self, rnn_class: type[nn.RNNBase], head_dim: int, hidden: int, num_layers: int,
                 bidirectional: bool) -> None:
        super().__init__()
        self.rnn = rnn_class(head_dim, hidden, num_layers=num_layers, batch_first=True,
                             bidirectional=bidirectional)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), head_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            y, _ = self.rnn(x)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            y, _ = self.rnn(packed)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return self.out(y)


class MultiHeadRecurrent(nn.Module):
    """Pre-projection, one independent recurrent network per head (real per-head weights), per-head
    output projections, heads concatenated: [B, N, input_dim] -> [B, N, heads * head_dim]."""

    rnn_class: type[nn.RNNBase] = nn.LSTM

    def __init__(self, shape: MixerShape, config: MultiHeadRecurrentConfig) -> None:
        super().__init__()
        self.shape = shape
        self.config = config
        head_dim = shape.head_dim
        hidden = config.hidden_per_head or head_dim
        self.bidirectional = config.bidirectional and not shape.causal
        width = shape.num_heads * head_dim
        self.pre_proj = (nn.Linear(shape.input_dim, width) if config.pre_projection
                         else _check_identity(shape, width))
        self.heads = nn.ModuleList(
            RecurrentHead(self.rnn_class, head_dim, hidden, config.num_layers, self.bidirectional)
            for _ in range(shape.num_heads)
        )

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_proj(x)
        lengths = None
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
            # Right padding (the HF default) is packed so the backward direction starts at the last
            # real token; other layouts keep zeroed pads in the stream.
            if self.bidirectional and _is_right_padded(padding_mask):
                lengths = padding_mask.sum(1)
        chunks = x.split(self.shape.head_dim, dim=-1)
        return torch.cat([head(c, lengths) for head, c in zip(self.heads, chunks)], dim=-1)


def _check_identity(shape: MixerShape, width: int) -> nn.Module:
    if shape.input_dim != width:
        raise ValueError(
            f"pre_projection=False needs input_dim == heads * head_dim ({shape.input_dim} != {width})"
        )
    return nn.Identity()


def _is_right_padded(padding_mask: torch.Tensor) -> bool:
    lengths = padding_mask.sum(1, keepdim=True)
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device).unsqueeze(0)
    return bool(torch.equal(padding_mask, positions < lengths)) and bool((lengths > 0).all())
