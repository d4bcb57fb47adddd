"""A faster training path for multi-head LSTM and GRU mixers: every head, direction (and, in
block-wise mode, every site) advances in ONE batched recurrence instead of one ``nn.LSTM`` /
``nn.GRU`` call per head.

The weights are the mixers' own per-head ``nn.LSTM`` / ``nn.GRU`` parameters (gradients flow back to
them); only the schedule of the computation changes. Right padding follows ``pack_padded_sequence``
semantics (the backward direction starts at the last real token; outputs at pads are zero), so
results match ``MultiHeadRecurrent.forward`` (checked in ``tests/test_distill.py``). Mixers that do
not qualify (conv, stacked layers, other padding layouts) use their own forward.
"""

from __future__ import annotations

import torch
from torch import nn


#: gate blocks per recurrent cell type (PyTorch's order: LSTM i, f, g, o; GRU r, z, n)
GATES = {nn.LSTM: 4, nn.GRU: 3}


def cell_type(mixer: nn.Module) -> type | None:
    """``nn.LSTM`` or ``nn.GRU`` when every head of ``mixer`` is a single-layer cell of that type
    this path computes exactly, else None."""
    heads = getattr(mixer, "heads", None)
    if not heads or not hasattr(mixer, "pre_proj") or not hasattr(mixer, "shape"):
        return None
    kinds = {type(h.rnn) for h in heads}
    if len(kinds) != 1 or (kind := kinds.pop()) not in GATES:
        return None
    ok = all(h.rnn.num_layers == 1 and getattr(h.rnn, "proj_size", 0) == 0 and h.rnn.batch_first and h.rnn.bias
             for h in heads)
    return kind if ok else None


def supports(mixer: nn.Module) -> bool:
    """Whether ``mixer`` is a single-layer multi-head LSTM or GRU this path computes exactly."""
    return cell_type(mixer) is not None


def _own_forward(mixer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # the class's forward, never an instance-level override: ``fast_mixers`` points the instance's
    # forward back at ``batched_forward``, so calling ``mixer(x)`` here would recurse forever
    return type(mixer).forward(mixer, x, mask)


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return bool(torch.equal(mask, positions < lengths)) and bool((lengths > 0).all())


def batched_forward(mixers: list[nn.Module], inputs: list[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Run several multi-head LSTM (or GRU) mixers (same batch shape) in one recurrence.

    Args:
        mixers: mixers for which ``supports`` is True, of one cell type, all bidirectional or all
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
    # pruned mixers may keep different state sizes per head: one recurrence needs one size
    sizes = {(h.rnn.hidden_size, h.rnn.input_size) for m in mixers for h in m.heads}
    if len(bidirectional) != 1 or len(kinds) != 1 or len({m.shape.head_dim for m in mixers}) != 1 \
            or len(sizes) != 1 or any(h.rnn.input_size != m.shape.head_dim for m in mixers for h in m.heads):
        return [_own_forward(m, x, mask) for m, x in zip(mixers, inputs)]
    both, lstm = bidirectional.pop(), kinds.pop() is nn.LSTM
    if mask is not None and both and not _right_padded(mask):
        return [_own_forward(m, x, mask) for m, x in zip(mixers, inputs)]
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
            gates = gates_steps[t] + torch.bmm(h, w_hh_t)
            i, f, g, o = gates.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
        else:
            x_r, x_z, x_n = gates_steps[t].chunk(3, dim=-1)
            h_r, h_z, h_n = torch.baddbmm(b_hh, h, w_hh_t).chunk(3, dim=-1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new, c_new = n + z * (h - n), c      # a GRU has no cell state: c stays zeros
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


class fast_mixers:
    """Within this context, every supported mixer of ``model`` computes its forward with
    ``batched_forward`` (one recurrence for all its heads and directions)."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        from surgery.swap import replaced_sites

        self.mixers = [w.mixer for w in replaced_sites(model) if enabled and supports(w.mixer)]

    def __enter__(self) -> "fast_mixers":
        for mixer in self.mixers:
            mixer.forward = lambda x, padding_mask=None, mixer=mixer: batched_forward([mixer], [x], padding_mask)[0]
        return self

    def __exit__(self, *exc) -> None:
        for mixer in self.mixers:
            del mixer.forward


def site_forward(mixers: list[nn.Module], inputs: list[torch.Tensor],
                 masks: list[torch.Tensor | None], enabled: bool = True) -> list[torch.Tensor]:
    """Each mixer applied to its input: supported mixers sharing one mask go through one batched
    recurrence; the rest use their own forward."""
    results: list[torch.Tensor | None] = [None] * len(mixers)
    batched = [i for i, m in enumerate(mixers) if enabled and supports(m)
               and _same_mask(masks[i], masks[0])]
    if batched:
        first = mixers[batched[0]]
        batched = [i for i in batched if mixers[i].bidirectional == first.bidirectional
                   and cell_type(mixers[i]) is cell_type(first)]
    # one recurrence per group of sites, each of at most SITE_GROUP_ELEMENTS gate values per step:
    # one huge recurrence over every site stops fitting in cache and gets slower (DeiT-T, batch 32,
    # one thread: 8.9 CPU s per block-wise step with all 12 sites in one recurrence, 4.8 s one by one)
    start = 0
    while start < len(batched):
        chunk = [batched[start]]
        size = _gate_elements(mixers[batched[start]], inputs[batched[start]])
        while start + len(chunk) < len(batched):
            extra = _gate_elements(mixers[batched[start + len(chunk)]], inputs[batched[start + len(chunk)]])
            if size + extra > SITE_GROUP_ELEMENTS:
                break
            chunk.append(batched[start + len(chunk)])
            size += extra
        outputs = batched_forward([mixers[i] for i in chunk], [inputs[i] for i in chunk], masks[chunk[0]])
        for i, out in zip(chunk, outputs):
            results[i] = out
        start += len(chunk)
    for i, mixer in enumerate(mixers):
        if results[i] is None:
            results[i] = mixer(inputs[i], masks[i])
    return results


#: gate values per time step above which sites go to separate recurrences (see ``site_forward``)
SITE_GROUP_ELEMENTS = 1 << 16


def _gate_elements(mixer: nn.Module, x: torch.Tensor) -> int:
    directions = 2 if mixer.bidirectional else 1
    return len(mixer.heads) * directions * x.shape[0] * GATES[cell_type(mixer)] * mixer.heads[0].rnn.hidden_size


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
