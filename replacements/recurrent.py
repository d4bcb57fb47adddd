"""Shared machinery of the multi-head recurrent replacements (LSTM and GRU): config, module with its
three forms (reference, batched training, inference; see ``replacements.recurrence``), pruner,
resize on load, FLOP handles, and the hooks that register all of it (``recurrent_hooks``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .native import load_kernel
from .recurrent_init import init_from_teacher
from .recurrence import (
    DECODING,
    FastMultiHeadRecurrent,
    _tracing,
    batch_cost,
    batch_key,
    batched_forward,
    cell_type,
    check_recurrent_weights,
    is_right_padded,
    weights_token,
)
from surgery.registry import BatchedTraining, MixerShape, ReplacementConfig, traced_sizes, using_reference_forms
from surgery.units import Bundle, ReplacementPruner, UnitSet, cut_linear, score_units, shrink

_is_right_padded = is_right_padded  # the name of earlier versions

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
        """The same function in the form that fits the moment: the inference form in eval mode without
        gradients (CPU float32), the batched training form otherwise, the per-head reference form
        under a tracer, inside ``surgery.registry.reference_forms()`` and where the others do not
        apply (stacked layers, heads pruned to different sizes)."""
        if not using_reference_forms() and not _tracing():
            if not self.training and not torch.is_grad_enabled():
                fast = self.inference_form(x)
                if fast is not None:
                    return fast(x, padding_mask)
            elif batch_key(self) is not None:
                return batched_forward([self], [x], padding_mask)[0]
        return self.reference_forward(x, padding_mask)

    def reference_forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reference form: each head's own ``nn.LSTM`` / ``nn.GRU`` (any layers, any sizes)."""
        x = self.pre_proj(x)
        lengths = None
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
            # Right padding (the HF default) is packed so the backward direction starts at the last
            # real token; other layouts keep zeroed pads in the stream.
            if self.bidirectional and is_right_padded(padding_mask):
                lengths = padding_mask.sum(1)
        chunks = x.split(self.shape.head_dim, dim=-1)
        return torch.cat([head(c, lengths) for head, c in zip(self.heads, chunks)], dim=-1)

    def inference_form(self, x: torch.Tensor | None = None, use_kernel: bool | None = None,
                       recurrent_weights: str | None = None) -> nn.Module | None:
        """The inference form of this mixer (``FastMultiHeadRecurrent``), packed once and kept until a
        weight changes (an optimiser step, pruning, ``load_state_dict``: each changes a tensor's
        version or storage). None where it does not apply: not CPU float32 (on GPUs cuDNN's fused
        recurrence is the fast one), or no native kernel (the reference form is then faster). Not a
        submodule: nothing of it is saved.

        Args:
            x: an input about to be served (its device and dtype decide); None = the weights'.
            use_kernel: pin the native kernel on (True) or off (False); None = keep the choice.
            recurrent_weights: the precision of W_hh in the inference and decode-step forms:
                ``"float32"`` (exact, the default) or ``"float16"`` (opt-in, rounded; see
                ``surgery.fast.optimize``); None = keep the choice. Kept on the mixer, not saved.
        """
        if recurrent_weights is not None and check_recurrent_weights(recurrent_weights) != \
                self.__dict__.get("_recurrent_weights", "float32"):
            object.__setattr__(self, "_recurrent_weights", recurrent_weights)  # the decode step's key reads it too
        precision = self.__dict__.get("_recurrent_weights", "float32")
        reference = self.heads[0].rnn.weight_ih_l0
        probe = reference if x is None else x
        if probe.device.type != "cpu" or probe.dtype != torch.float32 or reference.dtype != torch.float32:
            return None
        if use_kernel is not None:
            object.__setattr__(self, "_use_kernel", use_kernel)
        choice = self.__dict__.get("_use_kernel")
        if choice is None and precision == "float32" and load_kernel() is None:
            # without the native kernel the per-head nn.LSTM is the faster form (the PyTorch loop is
            # the kernel's reference, ~3x slower at batch 1); use_kernel=False still asks for the loop
            return None
        key = (choice, weights_token(self))
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key or cached[1].recurrent_weights != precision:
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, FastMultiHeadRecurrent(self, use_kernel=choice, recurrent_weights=precision))
            object.__setattr__(self, "_inference_cache", cached)
        return cached[1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_inference_cache", None)  # rebuilt on demand; holds no information of its own
        return state


def _check_identity(shape: MixerShape, width: int) -> nn.Module:
    if shape.input_dim != width:
        raise ValueError(
            f"pre_projection=False needs input_dim == heads * head_dim ({shape.input_dim} != {width})"
        )
    return nn.Identity()



# --------------------------------------------------------------------------------------- pruning

def _unit_sets(head: RecurrentHead) -> list[UnitSet]:
    """One unit set per (layer, direction) of a head's recurrent network; see surgery.units."""
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
                cut_linear(head.out, mine, dim=0)
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


# ------------------------------------------------------------------------------- load (resize)

def resize(mixer: MultiHeadRecurrent, shapes: dict[str, tuple]) -> None:
    """Rebuild ``mixer``'s parts with the saved shapes (a pruned checkpoint): the pre-projection, each
    head's recurrent network (its hidden size per head) and output Linear. Weights load afterwards."""
    reference = mixer.heads[0].rnn.weight_ih_l0
    if "pre_proj.weight" in shapes:
        out_features, in_features = shapes["pre_proj.weight"]
        mixer.pre_proj = nn.Linear(in_features, out_features, bias="pre_proj.bias" in shapes).to(reference)
    for k, head in enumerate(mixer.heads):
        prefix = f"heads.{k}."
        rnn = head.rnn
        hidden = shapes[prefix + "rnn.weight_hh_l0"][1]
        inputs = shapes[prefix + "rnn.weight_ih_l0"][1]
        proj = shapes.get(prefix + "rnn.weight_hr_l0", (0,))[0]
        extra = {"proj_size": proj} if proj else {}
        head.rnn = type(rnn)(inputs, hidden, num_layers=rnn.num_layers, bias=rnn.bias, batch_first=True,
                             bidirectional=rnn.bidirectional, **extra).to(reference)
        out_features, in_features = shapes[prefix + "out.weight"]
        head.out = nn.Linear(in_features, out_features, bias=prefix + "out.bias" in shapes).to(reference)


# ----------------------------------------------------------------------------------------- FLOPs

def recurrent_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of ``aten::lstm`` / ``aten::gru`` (both the padded ``.input`` and the packed ``.data``
    overloads): every 2-D weight matrix (weight_ih, weight_hh, weight_hr) is applied once per token
    and direction, so MACs = tokens * sum(weight.numel()). Gate nonlinearities are elementwise and
    left out, as fvcore leaves out elementwise ops everywhere."""
    sequence = traced_sizes(inputs[0])
    if sequence is None:
        return 0
    # padded input: [B, T, F] (or [T, B, F]); packed data: [total tokens, F]
    tokens = math.prod(sequence[:-1])
    for value in inputs[1:]:
        node = value.node()
        if node.kind() != "prim::ListConstruct":
            continue
        shapes = [traced_sizes(v) for v in node.inputs()]
        if shapes and all(s is not None for s in shapes) and any(len(s) == 2 for s in shapes):
            return tokens * sum(math.prod(s) for s in shapes if len(s) == 2)
    return 0


#: fvcore counts these as 0; the reference form (what tracers see) runs them
FLOP_HANDLES: dict[str, Callable] = {
    "aten::lstm": recurrent_flop_jit,
    "aten::gru": recurrent_flop_jit,
    "aten::rnn_tanh": recurrent_flop_jit,
    "aten::rnn_relu": recurrent_flop_jit,
}


# ------------------------------------------------------------------------------------ the record

def inference_form(mixer: MultiHeadRecurrent, *, use_kernel: bool | None = None,
                   recurrent_weights: str | None = None) -> nn.Module | None:
    """The registry's ``inference_form`` hook: the mixer's own (cached) inference form."""
    return mixer.inference_form(use_kernel=use_kernel, recurrent_weights=recurrent_weights)


def recurrent_hooks() -> dict[str, Any]:
    """Everything ``register_replacement`` needs to know about a multi-head recurrent replacement."""
    return {
        "pruner": MultiHeadRecurrentPruner,
        "training_form": BatchedTraining(key=batch_key, run=batched_forward, cost=batch_cost),
        "inference_form": inference_form,
        "init_from_teacher": init_from_teacher,
        "resize": resize,
        "flop_handles": FLOP_HANDLES,
        "decoding": DECODING,
    }
