"""Every form of the multi-head recurrence (LSTM and GRU), with the gate formulas written once.

- ``batched_forward``: the batched training form: every head, direction (and, in block-wise
  distillation, every site) advances in ONE recurrence instead of one ``nn.LSTM`` / ``nn.GRU``
  call per head; the weights are the heads' own parameters, so gradients flow back to them.
- ``FastMultiHeadRecurrent``: the inference form: input projections of all heads, directions and
  time steps in one batched matmul, the recurrences of all heads and both directions in one call of
  the native kernel (``csrc/recurrence.cpp``), or of ``_recurrence_torch``, its PyTorch reference.
- the reference form is the heads' own ``nn.LSTM`` / ``nn.GRU`` (``MultiHeadRecurrent.reference_forward``).

Right padding follows ``pack_padded_sequence`` semantics everywhere (the backward direction starts
at the last real token; outputs at pads are zero); forward-only mixers run through zeroed pads.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .native import load_kernel
from surgery.errors import SurgeryError
from surgery.registry import is_exporting, tracing

#: gate blocks per recurrent cell type (PyTorch's order: LSTM i, f, g, o; GRU r, z, n)
GATES = {nn.LSTM: 4, nn.GRU: 3}


# ------------------------------------------------------------------------------- gate formulas

def lstm_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from the input part (incl. biases) and recurrent part of the gates [.., 4H]."""
    i, f, g, o = (x_gates + h_gates).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One GRU step: ``x_gates`` incl. b_ih, ``h_gates`` = W_hh h + b_hh (b_hn stays inside r * .)."""
    x_r, x_z, x_n = x_gates.chunk(3, dim=-1)
    h_r, h_z, h_n = h_gates.chunk(3, dim=-1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h - n)


# ---------------------------------------------------------------------------- padding layout

_is_exporting = is_exporting
_tracing = tracing  # the names the replacements import (surgery.registry.tracing)


def is_right_padded(padding_mask: torch.Tensor) -> bool:
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


# ------------------------------------------------------------------------------ which mixers

def cell_type(mixer: nn.Module) -> type | None:
    """``nn.LSTM`` or ``nn.GRU`` when every head of ``mixer`` (a ``MultiHeadRecurrent``) is a plain
    single-layer cell of that type (batch first, with biases, no projection), else None.

    This is the one place that decides it: the batched training form, the teacher-derived start and
    the batch grouping all ask here.
    """
    heads = mixer.heads
    kinds = {type(h.rnn) for h in heads}
    if len(kinds) != 1 or (kind := kinds.pop()) not in GATES:
        return None
    plain = all(h.rnn.num_layers == 1 and getattr(h.rnn, "proj_size", 0) == 0 and h.rnn.batch_first
                and h.rnn.bias for h in heads)
    return kind if plain else None


def batch_key(mixer: nn.Module) -> Any:
    """Mixers with equal keys run in one batched recurrence; None = not batchable (pruned heads of
    different sizes, stacked layers, other cell types)."""
    kind = cell_type(mixer)
    if kind is None:
        return None
    sizes = {(h.rnn.hidden_size, h.rnn.input_size) for h in mixer.heads}
    if len(sizes) != 1:
        return None
    hidden, inputs = sizes.pop()
    if inputs != mixer.shape.head_dim:
        return None
    return (kind.__name__, bool(mixer.bidirectional), hidden, inputs)


def batch_cost(mixer: nn.Module, x: torch.Tensor) -> int:
    """Gate values per time step of ``mixer`` in a batched recurrence."""
    directions = 2 if mixer.bidirectional else 1
    return len(mixer.heads) * directions * x.shape[0] * GATES[cell_type(mixer)] * mixer.heads[0].rnn.hidden_size


# ------------------------------------------------------------------------- batched training

def batched_forward(mixers: list[nn.Module], inputs: list[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Run several multi-head LSTM (or GRU) mixers (same batch shape) in one recurrence.

    Args:
        mixers: mixers for which ``batch_key`` is not None, of one cell type, all bidirectional or all
            not.
        inputs: their inputs [B, N, D_i].
        mask: the shared padding mask [B, N] (True = real token) or None.

    Returns:
        Their contexts [B, N, C_i], equal to ``mixer(x, mask)``.
    """
    if mask is not None and bool(mask.all()):
        mask = None
    bidirectional = {bool(m.bidirectional) for m in mixers}
    kinds = {cell_type(m) for m in mixers}
    if None in kinds:
        return [m.reference_forward(x, mask) for m, x in zip(mixers, inputs)]
    # pruned mixers may keep different state sizes per head: one recurrence needs one size
    sizes = {(h.rnn.hidden_size, h.rnn.input_size) for m in mixers for h in m.heads}
    if len(bidirectional) != 1 or len(kinds) != 1 or len({m.shape.head_dim for m in mixers}) != 1 \
            or len(sizes) != 1 or any(h.rnn.input_size != m.shape.head_dim for m in mixers for h in m.heads):
        return [m.reference_forward(x, mask) for m, x in zip(mixers, inputs)]
    both, lstm = bidirectional.pop(), kinds.pop() is nn.LSTM
    if mask is not None and both and not is_right_padded(mask):
        return [m.reference_forward(x, mask) for m, x in zip(mixers, inputs)]
    hidden = mixers[0].heads[0].rnn.hidden_size
    head_dim = mixers[0].heads[0].rnn.input_size
    # LSTM: both biases join the input gates; GRU: b_hn must stay inside r * (W_hn h + b_hn)
    chunks, w_ih, w_hh, bias, bias_hh = [], [], [], [], []
    for mixer, x in zip(mixers, inputs):
        x = mixer.pre_proj(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        for k, head in enumerate(mixer.heads):
            part = x[..., k * head_dim:(k + 1) * head_dim]
            rnn = head.rnn
            for suffix, chunk in [("", part)] + ([("_reverse", part.flip(1))] if both else []):
                chunks.append(chunk)
                w_ih.append(getattr(rnn, "weight_ih_l0" + suffix))
                w_hh.append(getattr(rnn, "weight_hh_l0" + suffix))
                b_ih, b_hh = getattr(rnn, "bias_ih_l0" + suffix), getattr(rnn, "bias_hh_l0" + suffix)
                bias.append(b_ih + b_hh if lstm else b_ih)
                bias_hh.append(b_hh)
    groups = len(chunks)
    x = torch.stack(chunks)                                   # [G, B, N, d]
    gates_x = torch.einsum("gbnd,ged->gbne", x, torch.stack(w_ih)) + torch.stack(bias)[:, None, None]
    w_hh_t = torch.stack(w_hh).transpose(1, 2)                # [G, H, gates*H]
    b_hh = None if lstm else torch.stack(bias_hh)[:, None]    # [G, 1, 3H]
    batch, length = x.shape[1], x.shape[2]
    step_mask = None
    # forward-only mixers run through their zeroed pads as the module does; bidirectional ones hold
    # the state at pads (pack_padded_sequence semantics)
    if mask is not None and both:
        forward_mask = mask.to(x.dtype)
        per_group = [forward_mask, forward_mask.flip(1)] if both else [forward_mask]
        step_mask = torch.stack(per_group * (groups // len(per_group)))[..., None]   # [G, B, N, 1]
    h = x.new_zeros(groups, batch, hidden)
    c = x.new_zeros(groups, batch, hidden)
    outputs = []
    # unbind once: slicing gates_x per step would make backward add a full-size zero tensor per step
    gates_steps = gates_x.unbind(2)
    masks = step_mask.unbind(2) if step_mask is not None else None
    for t in range(length):
        if lstm:
            h_new, c_new = lstm_cell(gates_steps[t], torch.bmm(h, w_hh_t), c)
        else:
            h_new, c_new = gru_cell(gates_steps[t], torch.baddbmm(b_hh, h, w_hh_t), h), c  # no cell state
        if step_mask is not None:
            m = masks[t]
            if lstm:
                c = c_new * m + c * (1 - m)
            h = h_new * m + h * (1 - m)
            outputs.append(h_new * m)
        else:
            c, h = c_new, h_new
            outputs.append(h)
    y = torch.stack(outputs, dim=2)                           # [G, B, N, H]
    results, index = [], 0
    for mixer in mixers:
        parts = []
        for head in mixer.heads:
            forward = y[index]
            index += 1
            if both:
                backward = y[index].flip(1)
                index += 1
                forward = torch.cat([forward, backward], dim=-1)
            parts.append(head.out(forward))
        results.append(torch.cat(parts, dim=-1))
    return results


# ------------------------------------------------------------------------------ inference

#: precisions the kernel can hold recurrent weights in (float16: opt-in, see ``FastMultiHeadRecurrent``)
RECURRENT_WEIGHTS = ("float32", "float16")


def check_recurrent_weights(value: str) -> str:
    """``value`` if it names a precision of ``RECURRENT_WEIGHTS``, else a one-line ``SurgeryError``.

    Example:
        >>> check_recurrent_weights("float16")
        'float16'
    """
    if value not in RECURRENT_WEIGHTS:
        raise SurgeryError(f"recurrent_weights={value!r} is not a choice: use one of "
                           f"{', '.join(repr(c) for c in RECURRENT_WEIGHTS)} (float32 is exact, the default)")
    return value


def tile_columns(weight: torch.Tensor) -> torch.Tensor:
    """[U, R, C] -> [U, R * C], the kernel's column-tiled layout: the C columns (a multiple of 8)
    cut into blocks of 64, then 8, each block stored [R rows][width] at offset (first column) * R,
    so one mat-vec streams the matrix front to back instead of striding over rows."""
    units, rows, columns = weight.shape
    widths = [64] * (columns // 64) + [8] * ((columns % 64) // 8)
    if sum(widths) != columns:
        raise ValueError(f"tile_columns needs a multiple of 8 columns, got {columns}")
    return torch.cat([block.reshape(units, -1) for block in weight.split(widths, dim=2)], dim=1).contiguous()


def _recurrence_torch(xg: torch.Tensor, whh: torch.Tensor, bhh: torch.Tensor,
                      lengths: torch.Tensor | None, is_lstm: bool) -> torch.Tensor:
    """The kernel's computation in plain PyTorch: a step loop with all units in one bmm."""
    K, B, T, D, GP = xg.shape
    P = whh.shape[1]
    out = xg.new_zeros(K, B, T, D, P)
    units = K * D
    for b in range(B):
        length = T if lengths is None else int(lengths[b])
        seq = xg[:, b, :length]  # [K, L, D, GP]
        if D == 2:
            seq = torch.stack([seq[:, :, 0], seq[:, :, 1].flip(1)], dim=2)
        seq = seq.permute(1, 0, 2, 3).reshape(length, units, GP)
        h = xg.new_zeros(units, P)
        c = xg.new_zeros(units, P)
        states = []
        for t in range(length):
            a = bhh + torch.bmm(h.unsqueeze(1), whh).squeeze(1)
            if is_lstm:
                h, c = lstm_cell(seq[t], a, c)
            else:
                h = gru_cell(seq[t], a, h)
            states.append(h)
        hs = torch.stack(states).view(length, K, D, P).permute(1, 0, 2, 3)
        if D == 2:
            hs = torch.stack([hs[:, :, 0], hs[:, :, 1].flip(1)], dim=2)
        out[:, b, :length] = hs
    return out


class FastMultiHeadRecurrent(nn.Module):
    """Inference form of a ``MultiHeadRecurrent`` mixer (``mhlstm``/``gru``): same function, batched
    projections, one native call for every head's and direction's recurrence.

    Args:
        source: the trained mixer; its pre-projection is shared, its recurrent and output weights
            are copied into stacked, transposed, zero-padded buffers.
        use_kernel: run the compiled kernel (default when it is available) or the PyTorch loop.
        recurrent_weights: ``"float32"`` (exact) or ``"float16"`` (opt-in: W_hh rounded to float16,
            half the bytes the kernel streams per step; the PyTorch loop then uses the same rounded
            weights, so both forms still agree); None = the source mixer's choice as set by
            ``surgery.fast.optimize(model, recurrent_weights=...)``, else float32.

    Example:
        >>> import surgery
        >>> from surgery.registry import MixerShape, get_replacement
        >>> mixer = get_replacement("mhlstm").build(MixerShape(16, 16, 2, False)).eval()
        >>> fast = FastMultiHeadRecurrent(mixer, use_kernel=False)
        >>> x = torch.randn(1, 5, 16)
        >>> with torch.no_grad():
        ...     torch.allclose(fast(x), mixer(x), atol=1e-5)
        True
    """

    def __init__(self, source: nn.Module, use_kernel: bool | None = None,
                 projection: nn.Linear | None = None, recurrent_weights: str | None = None) -> None:
        super().__init__()
        if recurrent_weights is None:
            recurrent_weights = source.__dict__.get("_recurrent_weights", "float32")
        self.recurrent_weights = check_recurrent_weights(recurrent_weights)
        rnns = [head.rnn for head in source.heads]
        kinds = {type(rnn) for rnn in rnns}
        if len(kinds) != 1 or not issubclass(kinds.pop(), (nn.LSTM, nn.GRU)):
            raise ValueError("every head must be an nn.LSTM or every head an nn.GRU")
        first = rnns[0]
        if any(getattr(rnn, "proj_size", 0) for rnn in rnns):
            raise ValueError("LSTMs with proj_size are not supported by the fast form")
        if any(rnn.num_layers != first.num_layers or rnn.bidirectional != first.bidirectional
               for rnn in rnns):
            raise ValueError("heads must share num_layers and bidirectional")
        self.is_lstm = isinstance(first, nn.LSTM)
        self.gates = 4 if self.is_lstm else 3
        self.directions = 2 if first.bidirectional else 1
        self.num_layers = first.num_layers
        self.bidirectional = source.bidirectional
        self.pre_proj = source.pre_proj
        self.use_kernel = use_kernel
        self.hidden_sizes = [rnn.hidden_size for rnn in rnns]
        self.input_sizes = [rnn.input_size for rnn in rnns]
        self.output_sizes = [head.out.out_features for head in source.heads]
        # a multiple of 8 floats, so the kernel's mat-vec runs in whole vector registers
        self.padded = -(-max(self.hidden_sizes) // 8) * 8
        reference = first.weight_ih_l0
        with torch.no_grad():
            for layer in range(self.num_layers):
                w_in, b_in, w_hh, b_hh = self._layer_weights(rnns, layer)
                if recurrent_weights == "float16":
                    w_hh = w_hh.half().float()  # the rounded weights, for the PyTorch loop as well
                self.register_buffer(f"w_in{layer}", w_in.to(reference))
                self.register_buffer(f"b_in{layer}", b_in.to(reference))
                self.register_buffer(f"w_hh{layer}", w_hh.to(reference))
                self.register_buffer(f"b_hh{layer}", b_hh.to(reference))
                # the kernel's copies: column-tiled (W_hh in the chosen precision); W_in only for
                # forward-only layers, where the decode step multiplies it inside the kernel
                tiled = tile_columns(w_hh)
                self.register_buffer(f"w_hh_tiled{layer}", tiled.half() if recurrent_weights == "float16"
                                     else tiled.to(reference), persistent=False)
                if self.directions == 1:
                    self.register_buffer(f"w_in_tiled{layer}", tile_columns(w_in).to(reference), persistent=False)
            w_out, b_out = self._output_weights(source)
            self.register_buffer("w_out", w_out.to(reference))
            self.register_buffer("b_out", b_out.to(reference))
            self.folded = projection is not None
            if projection is not None:
                # the per-head output Linears and the reused out-projection, multiplied out: one
                # GEMM from every head's hidden states straight to the block's output
                w_fold, b_fold = self._fold(w_out, b_out, projection)
                self.register_buffer("w_fold", w_fold.to(reference))
                self.register_buffer("b_fold", b_fold.to(reference))
        self.register_buffer("sizes", torch.tensor(
            [h for h in self.hidden_sizes for _ in range(self.directions)], dtype=torch.long),
            persistent=False)

    def _layer_weights(self, rnns: list[nn.RNNBase], layer: int) -> tuple[torch.Tensor, ...]:
        K, D, G, P = len(rnns), self.directions, self.gates, self.padded
        inputs = max(self.input_sizes) if layer == 0 else D * P
        w_in = torch.zeros(K, inputs, D * G * P)
        b_in = torch.zeros(K, 1, D * G * P)
        w_hh = torch.zeros(K * D, P, G * P)
        b_hh = torch.zeros(K * D, G * P)
        for k, rnn in enumerate(rnns):
            H = rnn.hidden_size
            for d in range(D):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                weight_ih = getattr(rnn, "weight_ih" + suffix).detach().float().cpu()
                weight_hh = getattr(rnn, "weight_hh" + suffix).detach().float().cpu()
                bias_ih = getattr(rnn, "bias_ih" + suffix, None) if rnn.bias else None
                bias_hh = getattr(rnn, "bias_hh" + suffix, None) if rnn.bias else None
                unit = k * D + d
                for g in range(G):
                    rows = slice(g * H, (g + 1) * H)
                    column = d * G * P + g * P
                    block = weight_ih[rows]  # [H, inputs of this head]
                    if layer == 0:
                        w_in[k, : block.shape[1], column: column + H] = block.T
                    else:  # input = previous layer's [forward H | backward H], padded to P each
                        for dd in range(D):
                            w_in[k, dd * P: dd * P + H, column: column + H] = block[:, dd * H:(dd + 1) * H].T
                    w_hh[unit, :H, g * P: g * P + H] = weight_hh[rows].T
                    if bias_ih is not None:
                        b_in[k, 0, column: column + H] = bias_ih.detach().float().cpu()[rows]
                        b_hh[unit, g * P: g * P + H] = bias_hh.detach().float().cpu()[rows]
        return w_in, b_in, w_hh.contiguous(), b_hh.contiguous()

    def _output_weights(self, source: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        K, D, P = len(source.heads), self.directions, self.padded
        w_out = torch.zeros(K, D * P, max(self.output_sizes))
        b_out = torch.zeros(K, 1, max(self.output_sizes))
        for k, head in enumerate(source.heads):
            H = head.rnn.hidden_size
            weight = head.out.weight.detach().float().cpu()  # [O, D*H]
            for d in range(D):
                w_out[k, d * P: d * P + H, : weight.shape[0]] = weight[:, d * H:(d + 1) * H].T
            if head.out.bias is not None:
                b_out[k, 0, : weight.shape[0]] = head.out.bias.detach().float().cpu()
        return w_out, b_out

    def _fold(self, w_out: torch.Tensor, b_out: torch.Tensor,
              projection: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        weight = projection.weight.detach().double().cpu()  # [D_out, sum O_k]
        if weight.shape[1] != sum(self.output_sizes):
            raise ValueError("the projection does not read the concatenated head outputs")
        blocks, offset = [], 0
        bias = (projection.bias.detach().double().cpu() if projection.bias is not None
                else torch.zeros(weight.shape[0], dtype=torch.float64))
        for k, width in enumerate(self.output_sizes):
            part = weight[:, offset: offset + width]  # [D_out, O_k]
            blocks.append(w_out[k, :, :width].double() @ part.T)  # [D*P, D_out]
            bias = bias + b_out[k, 0, :width].double() @ part.T
            offset += width
        return torch.cat(blocks).float().contiguous(), bias.float()

    def _layer(self, states: torch.Tensor, layer: int, lengths: torch.Tensor | None, batch: int,
               steps: int) -> torch.Tensor:
        """One recurrent layer: states [K, B*T, inputs] -> hidden states [K, B, T, D, P]. The kernel
        adds the input bias b_ih per step itself (a bmm without it, not a baddbmm that first writes
        the bias broadcast over every token: 85 us of a DeiT-T block); the PyTorch loop gets it
        in the batched input projection."""
        K, D, G, P = len(self.hidden_sizes), self.directions, self.gates, self.padded
        w_in, b_in = getattr(self, f"w_in{layer}"), getattr(self, f"b_in{layer}")
        w_hh, b_hh = getattr(self, f"w_hh{layer}"), getattr(self, f"b_hh{layer}")
        kernel = self.kernel(states)
        if kernel is not None:
            xg = torch.bmm(states, w_in)
            empty = torch.empty(0, dtype=torch.long)
            return kernel.recurrence(xg.view(K, batch, steps, D, G * P), getattr(self, f"w_hh_tiled{layer}"),
                                     b_hh, self.sizes.cpu(), empty if lengths is None else lengths.cpu().long(),
                                     self.is_lstm, b_in.view(K * D, G * P))
        xg = torch.baddbmm(b_in, states, w_in)
        return _recurrence_torch(xg.view(K, batch, steps, D, G * P), w_hh, b_hh, lengths, self.is_lstm)

    def kernel(self, x: torch.Tensor) -> Any:
        """The native kernel module if it serves ``x`` (CPU float32, not under a tracer, not pinned
        off, compiled, float16 weights supported where asked), else None (the PyTorch loop)."""
        use_kernel = self.use_kernel if self.use_kernel is not None else True
        # a tracer (FLOP counting, ONNX) cannot see into the native call: it gets the PyTorch loop
        native = use_kernel and x.device.type == "cpu" and x.dtype == torch.float32 and not _tracing()
        kernel = load_kernel() if native else None
        if kernel is not None and self.recurrent_weights == "float16" and not kernel.half_weights:
            return None  # a build without F16C: the loop computes the same rounded weights
        return kernel

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_proj(x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise SurgeryError("the fast recurrent form is inference-only (no gradients); run it under "
                               "torch.inference_mode() or torch.no_grad(), or train the original form")
        lengths = None
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
            if self.bidirectional and is_right_padded(padding_mask):
                lengths = padding_mask.sum(1)
        B, T, _ = x.shape
        K, D, G, P = len(self.hidden_sizes), self.directions, self.gates, self.padded
        flat = x.reshape(B * T, -1)
        if len(set(self.input_sizes)) == 1:
            states = flat.view(B * T, K, self.input_sizes[0]).transpose(0, 1)
        else:
            width = max(self.input_sizes)
            states = torch.stack([F.pad(c, (0, width - c.shape[-1]))
                                  for c in flat.split(self.input_sizes, dim=-1)])
        for layer in range(self.num_layers):
            states = self._layer(states, layer, lengths, B, T).view(K, B * T, D * P)
        if self.folded:
            flat_states = states.transpose(0, 1).reshape(B * T, K * D * P)
            return torch.addmm(self.b_fold, flat_states, self.w_fold).view(B, T, -1)
        y = torch.baddbmm(self.b_out, states, self.w_out)  # [K, B*T, O]
        if len(set(self.output_sizes)) == 1:
            return y.transpose(0, 1).reshape(B, T, -1)
        return torch.cat([y[k, :, :o] for k, o in enumerate(self.output_sizes)], dim=-1).view(B, T, -1)

    def extra_repr(self) -> str:
        kind = "lstm" if self.is_lstm else "gru"
        return (f"{kind}, heads={len(self.hidden_sizes)}, hidden={self.hidden_sizes}, "
                f"directions={self.directions}, layers={self.num_layers}, "
                f"projection_folded={self.folded}, recurrent_weights={self.recurrent_weights}")


# ------------------------------------------------------------------------------- decoding

def _padded(mixer: nn.Module) -> int:
    """State width per head: the largest hidden size, a multiple of 8 (as the inference form pads)."""
    return -(-max(h.rnn.hidden_size for h in mixer.heads) // 8) * 8


_VERSION, _SHAPE = operator.attrgetter("_version"), operator.attrgetter("shape")


class WeightsWatch:
    """What a packed copy of a module's weights was built from, checked in microseconds per call.

    Unchanged means: every ``_parameters`` / ``_modules`` table of the module tree holds the same
    objects under the same names and no others (pruning, ``resize`` and parametrizations replace,
    add or remove them), and every parameter keeps its version counter (an optimiser step or
    ``load_state_dict`` bumps it), storage (``.to()``, ``p.data = ...``) and shape. Writes through
    ``p.data`` bypass the version counter, as they bypass autograd; after those call
    ``weights_token(module, refresh=True)``. Copies and pickles as an empty watch, never unchanged:
    a copied module's packed forms are rebuilt from its own weights.
    """

    __slots__ = ("_tables", "_sizes", "_owners", "_names", "_values", "_params", "_versions",
                 "_pointers", "_shapes", "_storages")

    def __init__(self, module: nn.Module | None = None) -> None:
        modules = [] if module is None else list(module.modules())
        self._tables = [table for m in modules for table in (m._parameters, m._modules)]
        self._sizes = list(map(len, self._tables))
        entries = [(table, name, value) for table in self._tables for name, value in table.items()]
        self._owners = [table for table, _, _ in entries]
        self._names = [name for _, name, _ in entries]
        self._values = [value for _, _, value in entries]
        self._params = [p for m in modules for p in m._parameters.values() if p is not None]
        self._versions = list(map(_VERSION, self._params))
        self._pointers = list(map(torch.Tensor.data_ptr, self._params))
        self._shapes = list(map(_SHAPE, self._params))
        # the storages stay alive, so no later tensor can take their addresses (p.data = x twice
        # between two checks could otherwise land where the first storage was)
        self._storages = [p.data for p in self._params]
        if module is None:
            self._sizes = None  # never unchanged: nothing was watched

    def unchanged(self) -> bool:
        return (list(map(len, self._tables)) == self._sizes
                and all(map(operator.is_, map(dict.get, self._owners, self._names), self._values))
                and list(map(_VERSION, self._params)) == self._versions
                and list(map(torch.Tensor.data_ptr, self._params)) == self._pointers
                and list(map(_SHAPE, self._params)) == self._shapes)

    def __deepcopy__(self, memo: dict) -> "WeightsWatch":
        return WeightsWatch()

    def __reduce__(self):
        return WeightsWatch, ()


def weights_token(module: nn.Module, refresh: bool = False) -> WeightsWatch:
    """An object replaced by a new one whenever ``module``'s weights or structure change (see
    ``WeightsWatch``): the cache key of every packed form built from them (the inference form, the
    decode step's; compared by identity), so one cheap check per call replaces rebuilding a key
    from every parameter.

    Args:
        module: the module whose parameters a cached form was built from.
        refresh: count a change even if none is seen (after in-place writes through ``p.data``).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> first = weights_token(lin)
        >>> weights_token(lin) is first
        True
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(2)
        >>> weights_token(lin) is first
        False
    """
    watch = module.__dict__.get("_weights_watch")
    if watch is None or refresh or not watch.unchanged():
        watch = WeightsWatch(module)
        object.__setattr__(module, "_weights_watch", watch)
    return watch


def _step_form(mixer: nn.Module) -> "FastMultiHeadRecurrent":
    """The packed weights the decode step reads (all heads in one bmm per layer), rebuilt when a
    weight changes (``weights_token``, as ``MultiHeadRecurrent.inference_form``). Not a submodule."""
    key = (weights_token(mixer), mixer.__dict__.get("_recurrent_weights"))
    cached = mixer.__dict__.get("_step_cache")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, FastMultiHeadRecurrent(mixer))
        object.__setattr__(mixer, "_step_cache", cached)
    return cached[1]


class RecurrentDecoding:
    """Decoding form of ``mhlstm`` / ``gru`` at causal sites (forward-only heads).

    The state is ``(h,)`` for GRU and ``(h, c)`` for LSTM, each ``[B, layers, heads, P]`` (batch
    first, so cache reordering indexes dim 0; P = the largest hidden size rounded up to 8, pruned
    heads zero-padded). ``prefill`` runs each head's own recurrent network over the prompt from the
    given state (the reference form: pads are zeroed inputs the recurrence runs through, exactly as
    the sequence form does) and returns its final state; ``step`` advances every head of a layer by
    one token in one native call (both mat-vecs and the gates; the batched PyTorch form where the
    kernel is unavailable), without gradients; with them it takes the per-head networks, so
    gradients reach the weights.
    """

    def _check(self, mixer: nn.Module) -> bool:
        if mixer.bidirectional:
            raise SurgeryError("a bidirectional recurrent mixer has no decoding form (it reads later tokens); "
                               "only causal sites decode token by token")
        return isinstance(mixer.heads[0].rnn, nn.LSTM)

    def init_state(self, mixer: nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
        lstm = self._check(mixer)
        reference = mixer.heads[0].rnn.weight_ih_l0
        shape = (batch, mixer.heads[0].rnn.num_layers, len(mixer.heads), _padded(mixer))
        zeros = reference.new_zeros(shape)
        return (zeros, zeros.clone()) if lstm else (zeros,)

    def prefill(self, mixer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        lstm = self._check(mixer)
        if state is None:
            state = self.init_state(mixer, x.shape[0])
        z = mixer.pre_proj(x)
        if mask is not None:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        new = tuple(torch.zeros_like(s) for s in state)
        outputs = []
        for k, (head, chunk) in enumerate(zip(mixer.heads, z.split(mixer.shape.head_dim, dim=-1))):
            size = head.rnn.hidden_size
            start = tuple(s[:, :, k, :size].transpose(0, 1).contiguous() for s in state)
            y, final = head.rnn(chunk, start if lstm else start[0])
            outputs.append(head.out(y))
            for target, value in zip(new, final if lstm else (final,)):
                target[:, :, k, :size] = value.transpose(0, 1)
        return torch.cat(outputs, dim=-1), new

    def step(self, mixer: nn.Module, x_t: torch.Tensor,
             state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One token ``x_t`` [B, 1, D] -> (output [B, 1, C], new state)."""
        lstm = self._check(mixer)
        if _tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in mixer.parameters())):
            # a tracer (torch.export) records the per-head networks; the packed weights are a cache
            return self.prefill(mixer, x_t, None, state)
        fast = _step_form(mixer)
        x = fast.pre_proj(x_t[:, 0])                                 # [B, width]
        batch, heads = x.shape[0], len(fast.hidden_sizes)
        if len(set(fast.input_sizes)) == 1:
            inputs = x.view(batch, heads, fast.input_sizes[0]).transpose(0, 1)
        else:
            width = max(fast.input_sizes)
            inputs = torch.stack([F.pad(c, (0, width - c.shape[-1])) for c in x.split(fast.input_sizes, dim=-1)])
        h_all = state[0].transpose(0, 2)                             # [K, L, B, P]
        c_all = state[1].transpose(0, 2) if lstm else None
        new_h, new_c = [], []
        kernel = fast.kernel(x)
        for layer in range(fast.num_layers):
            if kernel is not None:
                h, c = kernel.step(inputs.contiguous(), getattr(fast, f"w_in_tiled{layer}"),
                                   getattr(fast, f"b_in{layer}"), getattr(fast, f"w_hh_tiled{layer}"),
                                   getattr(fast, f"b_hh{layer}"), h_all[:, layer],
                                   c_all[:, layer] if lstm else h_all.new_empty(0), fast.sizes, lstm)
                new_h.append(h)
                if lstm:
                    new_c.append(c)
                inputs = h
                continue
            x_gates = torch.baddbmm(getattr(fast, f"b_in{layer}"), inputs, getattr(fast, f"w_in{layer}"))
            h = h_all[:, layer]
            h_gates = torch.baddbmm(getattr(fast, f"b_hh{layer}").unsqueeze(1), h, getattr(fast, f"w_hh{layer}"))
            if lstm:
                h, c = lstm_cell(x_gates, h_gates, c_all[:, layer])
                new_c.append(c)
            else:
                h = gru_cell(x_gates, h_gates, h)
            new_h.append(h)
            inputs = h                                               # [K, B, P]
        y = torch.baddbmm(fast.b_out, inputs, fast.w_out)            # [K, B, O]
        if len(set(fast.output_sizes)) == 1:
            y = y.transpose(0, 1).reshape(batch, 1, -1)
        else:
            y = torch.cat([y[k, :, :o] for k, o in enumerate(fast.output_sizes)], dim=-1).view(batch, 1, -1)
        pack = lambda parts: torch.stack(parts, dim=1).transpose(0, 2).contiguous()  # noqa: E731 -> [B, L, K, P]
        return y, (pack(new_h), pack(new_c)) if lstm else (pack(new_h),)


DECODING = RecurrentDecoding()
