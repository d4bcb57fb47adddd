"""Start a multi-head LSTM / GRU close to the attention it replaces, from the teacher itself.

Attention's context for head k is a mixture of that head's VALUES. So, per site and head:

1. ``pre_proj`` <- the original value projection (the LSTM of head k then reads head k's values);
2. each head's recurrence is set to an exponential moving average of its input in both directions
   (LSTM: input gate 1/2, a fixed forget gate ``f``, output gate ~1, candidate = tanh(scale * value);
   GRU: a fixed update gate ``z = f``, candidate = tanh(scale * value), no recurrent weights); the
   decay ``f`` is chosen per head and direction among ``decays`` by the fit below (0 = the token
   itself, 0.97 = a long window);
3. the head's output Linear is the least-squares map from the LSTM features [forward, backward]
   to the teacher's context for that head, on a few captured batches.

With those gates the cells are linear recurrences followed by a pointwise map, so their features
are computed in closed form (``moving_average_features``: every decay, direction and head at once,
chunked over time) instead of running the cells; one Gram matrix per head over [every forward
feature, every backward feature, 1] holds the normal equations of every (forward, backward) decay
pair as a sub-block, so all pairs are solved in one batched ``torch.linalg.solve``. Values are zero
at pads, so a pad adds nothing and a direction that starts on pads keeps its state at zero: the
features of real tokens are right for right and left padding alike, with no packing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .recurrence import cell_type
from surgery.errors import SurgeryError
from surgery.registry import TeacherEvidence

#: forget-gate values tried per head and direction, and the candidate's input scale
DECAYS = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995)
SCALE = 0.5
#: the output gate's pre-activation in the moving-average LSTM (sigmoid(4) ~ 0.982)
OUTPUT_GATE = 4.0
#: time steps per chunk of the closed-form recurrence (work and memory grow with T * CHUNK)
CHUNK = 128
#: feature memory (bytes) one pass over a record may take; more heads are split into groups
FEATURE_BUDGET = 256 * 2**20


def _logit(decay: float) -> float:
    """The gate pre-activation that sets a decay (0 -> -12: sigmoid(-12) ~ 6e-6, the token itself)."""
    if not 0.0 <= decay < 1.0:
        raise SurgeryError(f"recurrent init decays must lie in [0, 1), got {decay}; fix the 'decays' setting")
    return math.log(decay / (1 - decay)) if decay > 0 else -12.0


def _set_moving_average(rnn: nn.LSTM | nn.GRU, decays: tuple[float, ...], scale: float) -> None:
    hidden, inputs = rnn.hidden_size, rnn.input_size
    gru = isinstance(rnn, nn.GRU)
    width = min(hidden, inputs)
    with torch.no_grad():
        for suffix, decay in zip(("", "_reverse"), decays):
            logit = _logit(decay)
            w_ih = getattr(rnn, f"weight_ih_l0{suffix}")
            w_hh = getattr(rnn, f"weight_hh_l0{suffix}")
            b_ih = getattr(rnn, f"bias_ih_l0{suffix}")
            b_hh = getattr(rnn, f"bias_hh_l0{suffix}")
            w_ih.zero_()
            w_hh.zero_()
            b_hh.zero_()
            b_ih.zero_()
            # LSTM gates (i, f, g, o): candidate g, forget f, output ~1, input sigmoid(0) = 1/2.
            # GRU gates (r, z, n): candidate n, update z = the decay (h = z h + (1 - z) n); with
            # W_hn = b_hn = 0 the reset gate has nothing to act on.
            w_ih[2 * hidden:2 * hidden + width, :width] = torch.eye(width) * scale  # candidate
            b_ih[hidden:2 * hidden] = logit                                            # forget / update
            if not gru:
                b_ih[3 * hidden:] = OUTPUT_GATE                                        # output gate ~ 1


def linear_recurrence(u: torch.Tensor, gates: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """s_t = g s_{t-1} + u_t from s_{-1} = 0, for every gate g at once: u [B, T, X], gates [D] ->
    [B, T, D, X]. Within a chunk a [D, L, L] matrix of powers g^(t-s); the state carries across chunks.

    Example:
        >>> s = linear_recurrence(torch.ones(1, 3, 1), torch.tensor([0.5]))
        >>> s[0, :, 0, 0].tolist()
        [1.0, 1.5, 1.75]
    """
    batch, steps, width = u.shape
    out = u.new_empty(batch, steps, gates.shape[0], width)
    state = None
    for start in range(0, steps, chunk):
        piece = u[:, start:start + chunk]
        length = piece.shape[1]
        t = torch.arange(length, device=u.device)
        lag = (t[:, None] - t[None, :]).to(u.dtype)  # t - s
        powers = torch.where(lag >= 0, gates[:, None, None] ** lag.clamp(min=0), u.new_zeros(()))
        block = torch.einsum("dts,bsx->btdx", powers, piece)
        if state is not None:
            carry = gates[None, :] ** (t + 1).to(u.dtype)[:, None]  # [L, D]: g^(t+1) from the last state
            block += carry[None, :, :, None] * state[:, None]
        out[:, start:start + length] = block
        state = block[:, -1]
    return out


def moving_average_features(values: torch.Tensor, decays: tuple[float, ...], scale: float, cell: type,
                            directions: int, chunk: int = CHUNK) -> torch.Tensor:
    """What ``_set_moving_average`` cells output, in closed form: values [B, T, X] (zero at pads) ->
    [B, T, directions, D, X] (forward, then backward; one entry per decay). Channels beyond a cell's
    ``width = min(hidden, inputs)`` are exactly zero and are left out here.

    LSTM: c_t = f c_{t-1} + tanh(scale v_t) / 2 with f = sigmoid(logit), h_t = sigmoid(4) tanh(c_t).
    GRU: h_t = z h_{t-1} + (1 - z) tanh(scale v_t) with z = sigmoid(logit).
    """
    gates = torch.sigmoid(torch.tensor([_logit(d) for d in decays], dtype=values.dtype, device=values.device))
    candidate = torch.tanh(scale * values)
    out = []
    for direction in range(directions):
        u = candidate if direction == 0 else candidate.flip(1)
        if cell is nn.GRU:
            # (1 - z) differs per decay: run the recurrence on the candidate and weight it afterwards
            s = linear_recurrence(u, gates, chunk) * (1 - gates)[None, None, :, None]
        else:
            s = torch.tanh(linear_recurrence(u * 0.5, gates, chunk)) / (1 + math.exp(-OUTPUT_GATE))
        out.append(s if direction == 0 else s.flip(1))
    return torch.stack(out, dim=2)


def _fit_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _head_groups(mixer: nn.Module) -> list[list[int]] | None:
    """Heads grouped by hidden size (each group's features are computed together); None when a head's
    input or output width is not the head dim (pruned): such a mixer keeps its start."""
    head_dim = mixer.shape.head_dim
    groups: dict[int, list[int]] = {}
    for k, head in enumerate(mixer.heads):
        if head.rnn.input_size != head_dim or head.out.out_features != head_dim or head.out.bias is None:
            return None
        groups.setdefault(head.rnn.hidden_size, []).append(k)
    return list(groups.values())


class _Sums:
    """The blocks of one head group's normal equations, summed over the records' real tokens: per
    decay d and direction, the feature Grams F_d^T F_d, B_d^T B_d, the forward-backward cross
    products F_a^T B_b of every pair, feature sums (the bias column), X^T Y and |Y|^2. That is every
    block a (forward, backward) pair's [F_a, B_b, 1] Gram is made of, and no other (forward decays
    never meet each other in one fit)."""

    def __init__(self, groups: int, decays: int, width: int, head_dim: int, directions: int, dtype, device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.gram = zeros(directions, groups, decays, width, width)      # F_d^T F_d, B_d^T B_d
        self.cross = zeros(groups, decays * width, decays * width)       # F_a^T B_b (two directions)
        self.sums = zeros(directions, groups, decays, width)             # 1^T F_d, 1^T B_d
        self.goal = zeros(directions, groups, decays, width, head_dim)   # F_d^T Y, B_d^T Y
        self.goal_sum = zeros(groups, head_dim)                          # 1^T Y
        self.energy = zeros(groups)                                      # |Y|^2
        self.rows = 0

    def add(self, features: torch.Tensor, goal: torch.Tensor, span: slice) -> None:
        """features [rows, directions, D, g, w], goal [rows, g, head_dim] (the fit's dtype) of the heads
        ``span`` of the group (every record passes through the group's first heads once)."""
        rows, directions, decays, groups, width = features.shape
        f = features.permute(1, 3, 2, 0, 4)                               # [dir, g, D, rows, w]
        self.gram[:, span] += f.transpose(-1, -2) @ f
        self.sums[:, span] += f.sum(3)
        y = goal.transpose(0, 1)                                          # [g, rows, hd]
        self.goal[:, span] += f.transpose(-1, -2) @ y[None, :, None]
        if directions == 2:
            flat = f.permute(0, 1, 3, 2, 4).reshape(2, groups, rows, decays * width)
            self.cross[span] += flat[0].transpose(1, 2) @ flat[1]
        self.goal_sum[span] += y.sum(1)
        self.energy[span] += y.pow(2).sum((1, 2))
        if span.start == 0:
            self.rows += rows


def _normal_equations(values: list, heads: list[int], head_dim: int, width: int, decays: tuple[float, ...],
                      scale: float, cell: type, directions: int, dtype: torch.dtype) -> _Sums:
    """The normal-equation blocks (``_Sums``) of the heads ``heads`` over every captured record."""
    device = values[0][0].device
    sums = _Sums(len(heads), len(decays), width, head_dim, directions, dtype, device)
    index = torch.tensor(heads, device=device)
    for x, mask, target in values:
        batch, steps, _ = x.shape
        per_head = batch * steps * directions * len(decays) * width * 8 * 3
        step = max(1, FEATURE_BUDGET // max(1, per_head))
        keep = None if mask is None else mask.bool()
        for first in range(0, len(heads), step):
            group = index[first:first + step]
            g = len(group)
            v = x.view(batch, steps, -1, head_dim)[:, :, group, :width]           # [B, T, g, w]
            y = target.view(batch, steps, -1, head_dim)[:, :, group]             # [B, T, g, hd]
            y = y[keep] if keep is not None else y.reshape(-1, g, head_dim)
            # the cells' own precision for the features; the sums (the fit) in ``dtype``
            compute = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
            f = moving_average_features(v.reshape(batch, steps, g * width).to(compute), decays, scale, cell,
                                        directions)
            f = f.view(batch, steps, directions, len(decays), g, width)
            f = f[keep] if keep is not None else f.reshape(-1, *f.shape[2:])  # [rows, dir, D, g, w]
            sums.add(f.to(dtype), y.to(dtype), slice(first, first + g))
    return sums


def _solve_pairs(sums: _Sums, decays, width: int, hidden: int, directions: int, ridge: float):
    """Every decay pair's ridge fit from the sums: (error [heads, pairs], solutions [heads, pairs,
    directions * width + 1, head_dim], pairs). Same ridge as ``fitting.least_squares`` on the pair's
    [features, 1] with its ``hidden``-wide (zero-padded) decay blocks: ridge * mean diagonal."""
    count = len(decays)
    pairs = [(a, b) for a in range(count) for b in range(count)] if directions == 2 else [(a,) for a in range(count)]
    picks = torch.tensor(pairs, device=sums.gram.device)                          # [P, directions]
    groups, head_dim = sums.gram.shape[1], sums.goal.shape[-1]
    size = directions * width + 1
    g = sums.gram.new_zeros(groups, len(pairs), size, size)
    r = sums.gram.new_zeros(groups, len(pairs), size, head_dim)
    for direction in range(directions):
        block = slice(direction * width, (direction + 1) * width)
        chosen = picks[:, direction]
        g[:, :, block, block] = sums.gram[direction][:, chosen]
        g[:, :, block, -1] = sums.sums[direction][:, chosen]
        g[:, :, -1, block] = sums.sums[direction][:, chosen]
        r[:, :, block] = sums.goal[direction][:, chosen]
    if directions == 2:
        cross = sums.cross.view(groups, count, width, count, width).permute(0, 1, 3, 2, 4)
        cross = cross[:, picks[:, 0], picks[:, 1]]                                # [g, P, w, w]
        g[:, :, :width, width:2 * width] = cross
        g[:, :, width:2 * width, :width] = cross.transpose(-1, -2)
    g[:, :, -1, -1] = sums.rows
    r[:, :, -1] = sums.goal_sum[:, None]
    # the pair's full Gram would also hold (hidden - width) zero columns per direction
    mean_diagonal = g.diagonal(dim1=-2, dim2=-1).sum(-1) / (directions * hidden + 1)
    eye = torch.eye(size, dtype=g.dtype, device=g.device)
    solution = torch.linalg.solve(g + ridge * mean_diagonal[..., None, None] * eye, r)
    error = sums.energy[:, None] - 2 * (solution * r).sum((-2, -1)) + (solution * (g @ solution)).sum((-2, -1))
    return error, solution, pairs


def init_from_teacher(mixer: nn.Module, evidence: TeacherEvidence) -> list[list[float]] | None:
    """The ``init_from_teacher`` hook of mhlstm and gru (see the module docstring).

    ``evidence.settings`` may hold ``decays`` (forget-gate values tried per head and direction) and
    ``scale`` (input scale of the candidate). Returns the chosen decays of every head; None (the
    mixer left unchanged) when it is not made of plain single-layer cells (stacked layers have no
    closed-form start) or its heads were pruned to other input/output widths.
    """
    cell = cell_type(mixer)
    groups = _head_groups(mixer) if cell is not None else None
    if groups is None:
        return None
    decays = tuple(float(d) for d in evidence.settings.get("decays", DECAYS))
    scale = float(evidence.settings.get("scale", SCALE))
    for decay in decays:
        _logit(decay)  # refuse a bad decay before anything changes
    weight, bias = evidence.value_weight, evidence.value_bias
    if isinstance(mixer.pre_proj, nn.Linear) and mixer.pre_proj.weight.shape == weight.shape:
        mixer.pre_proj.weight.copy_(weight)
        if mixer.pre_proj.bias is not None:
            mixer.pre_proj.bias.copy_(bias if bias is not None else torch.zeros_like(mixer.pre_proj.bias))
    head_dim = mixer.shape.head_dim
    values = []
    for hidden, mask, target in evidence.records:
        x = mixer.pre_proj(hidden)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        values.append((x, mask, target))
    directions = 2 if mixer.bidirectional else 1
    dtype = _fit_dtype(values[0][0].device)
    picks: list[list[float] | None] = [None] * len(mixer.heads)
    for heads in groups:
        hidden = mixer.heads[heads[0]].rnn.hidden_size
        width = min(hidden, head_dim)
        sums = _normal_equations(values, heads, head_dim, width, decays, scale, cell, directions, dtype)
        error, solution, pairs = _solve_pairs(sums, decays, width, hidden, directions, evidence.ridge)
        best = error.argmin(dim=1)  # the first of equal errors, as a loop over pairs keeps it
        for slot, k in enumerate(heads):
            pair = tuple(decays[d] for d in pairs[int(best[slot])])
            fit = solution[slot, int(best[slot])]                                    # [p, head_dim]
            head = mixer.heads[k]
            _set_moving_average(head.rnn, pair, scale)
            out = head.out.weight
            out.zero_()
            for direction in range(directions):
                out[:, direction * hidden:direction * hidden + width] = \
                    fit[direction * width:(direction + 1) * width].T.to(out.dtype)
            head.out.bias.copy_(fit[-1].to(head.out.bias.dtype))
            picks[k] = list(pair)
    return picks
