"""Shared machinery of the multi-head recurrent replacements (LSTM and GRU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.prune.groups import Bundle, ReplacementPruner, UnitSet, _cut_linear, score_units, shrink
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


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6


def _is_right_padded(padding_mask: torch.Tensor) -> bool:
    """True when some row ends in padding and every row is real tokens first, pads last (none empty).

    A mask without padding is not right-padded: it needs no packing, and unpacked is exactly what
    the mixer computes without a mask. This is the one data-dependent decision of the recurrent
    mixers, taken by bidirectional ones only (causal, one-direction mixers never pack).
    """
    if _is_exporting():
        # packing cannot be traced (nn.LSTM sizes its state by the packed batch sizes, a tensor);
        # the exported program serves batches without padding and checks that when it runs
        torch._check(padding_mask.all().item(), lambda: "an exported bidirectional recurrent mixer "
                     "takes batches without padding only")
        return False
    lengths = padding_mask.sum(1, keepdim=True)
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device).unsqueeze(0)
    layout = (padding_mask == (positions < lengths)).all() & (lengths > 0).all()
    return bool(layout & ~padding_mask.all())


# --------------------------------------------------------------------------------------- pruning

def _unit_sets(head: RecurrentHead) -> list[UnitSet]:
    """One unit set per (layer, direction) of a head's recurrent network; see surgery.prune.groups."""
    rnn = head.rnn
    hidden, layers = rnn.hidden_size, rnn.num_layers
    directions = 2 if rnn.bidirectional else 1
    gates = rnn.weight_ih_l0.shape[0] // hidden  # 4 for LSTM (i, f, g, o), 3 for GRU (r, z, n)
    units = torch.arange(hidden)
    gate_rows = torch.stack([g * hidden + units for g in range(gates)], dim=1)  # [H, gates]
    sets = []
    for layer in range(layers):
        for direction in range(directions):
            suffix = f"l{layer}" + ("_reverse" if direction else "")
            parts = [(f"rnn.weight_ih_{suffix}", 0, gate_rows), (f"rnn.weight_hh_{suffix}", 0, gate_rows),
                     (f"rnn.weight_hh_{suffix}", 1, units.unsqueeze(1))]
            if rnn.bias:
                parts += [(f"rnn.bias_ih_{suffix}", 0, gate_rows), (f"rnn.bias_hh_{suffix}", 0, gate_rows)]
            # the unit's output is column direction*H + u of whatever reads this layer's output
            consumer_columns = (direction * hidden + units).unsqueeze(1)
            if layer + 1 < layers:
                parts += [(f"rnn.weight_ih_l{layer + 1}" + ("_reverse" if d else ""), 1, consumer_columns)
                          for d in range(directions)]
            else:
                parts.append(("out.weight", 1, consumer_columns))
            name = f"l{layer}." + ("backward" if direction else "forward")
            sets.append(UnitSet(name, hidden, parts))
    return sets


def _prune_hidden_units(head: RecurrentHead, sets: list[UnitSet], removed: list[list[int]]) -> None:
    counts = {len(r) for r in removed}
    if len(counts) != 1:
        raise ValueError("every layer and direction of a head must lose the same number of units")
    shrink(head, sets, removed)
    rnn = head.rnn
    rnn.hidden_size = rnn.weight_hh_l0.shape[1]
    head.out.in_features = head.out.weight.shape[1]
    rnn._init_flat_weights()  # the cuDNN/flat weight list still points at the old tensors


class MultiHeadRecurrentPruner(ReplacementPruner):
    """Prunes ``MultiHeadRecurrent`` (mhlstm, gru) for torch-pruning and the global ranking.

    Internal units: hidden unit u of head k, per layer and direction: its gate rows (4 for LSTM,
    3 for GRU) in ``weight_ih``/``weight_hh`` and both biases, its column of ``weight_hh``, its
    column of the next layer's ``weight_ih`` or of the head's ``out`` Linear. All layers and
    directions of a head lose the same number of units (nn.LSTM/GRU have one hidden size), each
    its own weakest ones. External channels (torch-pruning's view): inputs = ``pre_proj``
    columns, outputs = rows of the heads' ``out`` Linears (heads concatenated).
    """

    def get_out_channels(self, layer: nn.Module) -> int:
        return sum(head.out.out_features for head in layer.heads)

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        start = 0
        for head in layer.heads:
            width = head.out.out_features
            mine = [i - start for i in idxs if start <= i < start + width]
            if len(mine) == width:
                raise ValueError("pruning would remove every output channel of a head")
            if mine:
                _cut_linear(head.out, mine, dim=0)
            start += width
        return layer

    def unit_bundles(self, layer: nn.Module, name: str) -> list[Bundle]:
        bundles = []
        for k, head in enumerate(layer.heads):
            sets = _unit_sets(head)

            def score(criterion, head=head, sets=sets):
                return [score_units(head, s, criterion) for s in sets]

            def apply(removed, head=head, sets=sets):
                _prune_hidden_units(head, sets, removed)

            bundles.append(Bundle(f"{name}.heads.{k}", "recurrent", head.rnn.hidden_size, score,
                                  apply, modules=[head.rnn, head.out], set_names=[s.name for s in sets],
                              owner=head, unit_sets=sets))
        return bundles
