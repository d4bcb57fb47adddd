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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fitting import least_squares
from .recurrence import cell_type
from surgery.registry import TeacherEvidence

#: forget-gate values tried per head and direction, and the candidate's input scale
DECAYS = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995)
SCALE = 0.5


def _run_head(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, mask: torch.Tensor | None, bidirectional: bool) -> torch.Tensor:
    lengths = mask.sum(1) if mask is not None and bidirectional else None
    if lengths is None or bool((lengths == mask.shape[1]).all()):
        return rnn(x)[0]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    y, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])
    return y


def _set_moving_average(rnn: nn.LSTM | nn.GRU, decays: tuple[float, ...], scale: float) -> None:
    hidden, inputs = rnn.hidden_size, rnn.input_size
    gru = isinstance(rnn, nn.GRU)
    width = min(hidden, inputs)
    with torch.no_grad():
        for suffix, decay in zip(("", "_reverse"), decays):
            logit = math.log(decay / (1 - decay)) if decay > 0 else -12.0
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
                b_ih[3 * hidden:] = 4.0                                                # output gate ~ 1


def init_from_teacher(mixer: nn.Module, evidence: TeacherEvidence) -> list[list[float]] | None:
    """The ``init_from_teacher`` hook of mhlstm and gru (see the module docstring).

    ``evidence.settings`` may hold ``decays`` (forget-gate values tried per head and direction) and
    ``scale`` (input scale of the candidate). Returns the chosen decays of every head; None (the
    mixer left unchanged) when it is not made of plain single-layer cells: stacked layers have no
    closed-form start.
    """
    if cell_type(mixer) is None:
        return None
    decays = tuple(evidence.settings.get("decays", DECAYS))
    scale = float(evidence.settings.get("scale", SCALE))
    ridge = evidence.ridge
    records = evidence.records
    weight, bias = evidence.value_weight, evidence.value_bias
    if isinstance(mixer.pre_proj, nn.Linear) and mixer.pre_proj.weight.shape == weight.shape:
        mixer.pre_proj.weight.copy_(weight)
        if mixer.pre_proj.bias is not None:
            mixer.pre_proj.bias.copy_(bias if bias is not None else torch.zeros_like(mixer.pre_proj.bias))
    head_dim = mixer.shape.head_dim
    values = []
    for hidden, mask, target in records:
        x = mixer.pre_proj(hidden)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        values.append((x, mask, target))
    picks = []
    directions = 2 if mixer.bidirectional else 1
    for k, head in enumerate(mixer.heads):
        hidden = head.rnn.hidden_size
        by_decay, goal_rows = {}, None
        for decay in decays:
            _set_moving_average(head.rnn, (decay,) * directions, scale)
            features, targets = [], []
            for x, mask, target in values:
                y = _run_head(head.rnn, x[..., k * head_dim:(k + 1) * head_dim], mask, mixer.bidirectional)
                goal = target[..., k * head_dim:(k + 1) * head_dim]
                if mask is not None:
                    y, goal = y[mask.bool()], goal[mask.bool()]
                features.append(y.reshape(-1, y.shape[-1]))
                targets.append(goal.reshape(-1, goal.shape[-1]))
            by_decay[decay] = torch.cat(features).double()
            goal_rows = torch.cat(targets).double()
        # each direction picks its own window: [forward(d1), backward(d2)] for every pair
        best = None
        pairs = [(a, b) for a in decays for b in decays] if directions == 2 else [(a,) for a in decays]
        for pair in pairs:
            parts = [by_decay[d][:, i * hidden:(i + 1) * hidden] for i, d in enumerate(pair)]
            solution, error = least_squares(torch.cat(parts, dim=1), goal_rows, ridge)
            if best is None or error < best[0]:
                best = (error, pair, solution)
        _, pair, solution = best
        _set_moving_average(head.rnn, pair, scale)
        head.out.weight.copy_(solution[:-1].T.to(head.out.weight.dtype))
        head.out.bias.copy_(solution[-1].to(head.out.bias.dtype))
        picks.append(list(pair))
    return picks
