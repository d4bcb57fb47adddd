"""Start multi-head LSTM / GRU replacements close to the attention they replace, from the teacher itself.

Attention's context for head k is a mixture of that head's VALUES. So, per site and head:

1. ``pre_proj`` <- the original value projection (the LSTM of head k then reads head k's values);
2. each head's recurrence is set to an exponential moving average of its input in both directions
   (LSTM: input gate 1/2, a fixed forget gate ``f``, output gate ~1, candidate = tanh(scale * value);
   GRU: a fixed update gate ``z = f``, candidate = tanh(scale * value), no recurrent weights); the
   decay ``f`` is chosen per head and direction among ``decays`` by the fit below (0 = the token
   itself, 0.97 = a long window);
3. the head's output Linear is the least-squares map from the LSTM features [forward, backward]
   to the teacher's context for that head, on a few captured batches.

Token convolutions (``conv``) get step 1, zero depthwise kernels (each token passes through its
residual path unchanged) and the least-squares output map from the token's own values to the
teacher's context: the "decay 0" member of the family above, which training then widens.

Training then starts from this fit instead of a random mixer. Sites whose original has no
recognisable value projection, or mixers of other kinds, are left unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from surgery.data import split_batch, to_device
from surgery.distill.capture import TeacherCapture
from surgery.distill.fidelity import call_model
from surgery.swap import ReplacedAttention, replaced_sites


def value_projection(wrapper: ReplacedAttention) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [C, D], bias [C]) of the original block's value projection, when recognisable."""
    original = wrapper.original
    if original is None:
        return None
    context = wrapper.site.context_dim or wrapper.site.embed_dim
    value = getattr(original, "value", None) or getattr(original, "v", None)
    if isinstance(value, nn.Linear):
        return value.weight, value.bias
    qkv = getattr(original, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features == 3 * context:
        return qkv.weight[2 * context:], None if qkv.bias is None else qkv.bias[2 * context:]
    weight = getattr(original, "in_proj_weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape[0] == 3 * context:
        bias = getattr(original, "in_proj_bias", None)
        return weight[2 * context:], None if bias is None else bias[2 * context:]
    return None


def _run_head(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, mask: torch.Tensor | None, bidirectional: bool) -> torch.Tensor:
    lengths = mask.sum(1) if mask is not None and bidirectional else None
    if lengths is None or bool((lengths == mask.shape[1]).all()):
        return rnn(x)[0]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    y, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])
    return y


def supports_init(mixer: nn.Module) -> bool:
    """Whether ``mixer`` is a multi-head recurrent replacement of single-layer LSTMs or GRUs with biases,
    or a token convolution."""
    if _is_conv(mixer):
        return True
    heads = getattr(mixer, "heads", None)
    if heads is None or not hasattr(mixer, "pre_proj") or not hasattr(mixer, "shape"):
        return False
    return all(isinstance(getattr(h, "rnn", None), (nn.LSTM, nn.GRU)) and h.rnn.num_layers == 1
               and getattr(h.rnn, "proj_size", 0) == 0 and h.rnn.batch_first and h.rnn.bias for h in heads)


def _is_conv(mixer: nn.Module) -> bool:
    convs = getattr(mixer, "convs", None)
    return (isinstance(convs, nn.ModuleList) and all(isinstance(c, nn.Conv1d) for c in convs)
            and isinstance(getattr(mixer, "pre_proj", None), nn.Linear) and isinstance(getattr(mixer, "out", None), nn.Linear))


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


def initialise_from_teacher(student: nn.Module, data: Iterable, *, batches: int = 4,
                            decays: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995), scale: float = 0.5,
                            ridge: float = 1e-3, labelled: bool | None = None) -> dict[str, list[float]]:
    """Initialise every multi-head LSTM / GRU replacement from its original attention (in place).

    Args:
        student: the replaced model (originals still kept).
        data: batches to fit on (the first ``batches`` are used).
        batches: how many batches to capture.
        decays: forget-gate values tried per head and direction (each direction picks its own).
        scale: input scale of the LSTM candidate (keeps tanh near its linear range).
        ridge: ridge term of the least-squares fit, relative to the feature energy.
        labelled: how to read 2-tuples (see ``surgery.data.split_batch``).

    Returns:
        The chosen decays ([forward, backward]) of every head, by site name.

    Example:
        >>> import torch, surgery
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).eval()
        >>> _ = surgery.replace_attention(bert, "mhlstm")
        >>> chosen = initialise_from_teacher(bert, [{"input_ids": torch.randint(0, 50, (2, 8))}])
        >>> len(chosen["encoder.layer.0.attention.self"])
        2
    """
    wrappers = [w for w in replaced_sites(student) if supports_init(w.mixer) and value_projection(w) is not None]
    if not wrappers:
        return {}
    device = next(student.parameters()).device
    capture = TeacherCapture(student)
    records: dict[str, list] = {w.site.name: [] for w in wrappers}
    with capture:
        for index, batch in enumerate(data):
            if index >= batches:
                break
            args, kwargs, _ = split_batch(to_device(batch, device), labelled)
            capture.run(lambda: call_model(student, args, kwargs))
            for w in wrappers:
                record = capture.records[w.site.name]
                records[w.site.name].append((record.hidden, record.mask, record.target))
    chosen: dict[str, list[float]] = {}
    with torch.no_grad():
        for w in wrappers:
            fit = _fit_conv if _is_conv(w.mixer) else _fit_site
            chosen[w.site.name] = fit(w, records[w.site.name], decays, scale, ridge)
    return chosen


def _least_squares(features: torch.Tensor, goal: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """[weights; bias] minimising |[features, 1] @ solution - goal|^2 (+ ridge), and the error."""
    a = torch.cat([features, torch.ones(features.shape[0], 1, dtype=features.dtype)], dim=1)
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, a.T @ goal)
    return solution, float((a @ solution - goal).pow(2).sum())


def _fit_conv(wrapper: ReplacedAttention, records: list, decays, scale: float, ridge: float) -> list[float]:
    mixer = wrapper.mixer
    weight, bias = value_projection(wrapper)
    if mixer.pre_proj.weight.shape != weight.shape or mixer.out.weight.shape[0] != weight.shape[0]:
        return []
    mixer.pre_proj.weight.copy_(weight)
    mixer.pre_proj.bias.copy_(bias if bias is not None else torch.zeros_like(mixer.pre_proj.bias))
    for conv in mixer.convs:
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
    features, goals = [], []
    for hidden, mask, target in records:
        x = mixer.pre_proj(hidden)
        if mask is not None:
            x, target = x[mask.bool()], target[mask.bool()]
        features.append(x.reshape(-1, x.shape[-1]))
        goals.append(target.reshape(-1, target.shape[-1]))
    solution, _ = _least_squares(torch.cat(features).double(), torch.cat(goals).double(), ridge)
    mixer.out.weight.copy_(solution[:-1].T.to(mixer.out.weight.dtype))
    mixer.out.bias.copy_(solution[-1].to(mixer.out.bias.dtype))
    return [0.0]


def _fit_site(wrapper: ReplacedAttention, records: list, decays, scale: float, ridge: float) -> list[float]:
    mixer = wrapper.mixer
    weight, bias = value_projection(wrapper)
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
            solution, error = _least_squares(torch.cat(parts, dim=1), goal_rows, ridge)
            if best is None or error < best[0]:
                best = (error, pair, solution)
        _, pair, solution = best
        _set_moving_average(head.rnn, pair, scale)
        head.out.weight.copy_(solution[:-1].T.to(head.out.weight.dtype))
        head.out.bias.copy_(solution[-1].to(head.out.bias.dtype))
        picks.append(list(pair))
    return picks
