"""Start replacements close to the attention they replace, from the teacher itself.

Attention's context for head k is a mixture of that head's VALUES. This module finds the original's
value projection and captures a few batches of what it computed (hidden states in, context out);
each replacement's own ``init_from_teacher`` hook (``surgery.registry``) turns that into a start:
multi-head LSTM / GRU read the values through moving averages chosen per head and direction, token
convolutions pass each token's values through, both with a least-squares output map.

Sites whose original has no recognisable value projection, and replacements without the hook,
are left unchanged.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from surgery.data import split_batch, to_device
from surgery.distill.capture import TeacherCapture
from surgery.distill.fidelity import call_model
from surgery.registry import TeacherEvidence, get_replacement, replacement_of
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


def supports_init(mixer: nn.Module) -> bool:
    """Whether ``mixer``'s replacement has a teacher-derived start (an ``init_from_teacher`` hook)."""
    spec = replacement_of(mixer)
    return spec is not None and spec.init_from_teacher is not None


def initialise_from_teacher(student: nn.Module, data: Iterable, *, batches: int = 4,
                            decays: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995), scale: float = 0.5,
                            ridge: float = 1e-3, labelled: bool | None = None) -> dict[str, list[float]]:
    """Initialise every replacement that has an ``init_from_teacher`` hook from its original attention
    (in place): the hook gets the original's value projection and a few captured batches.

    Args:
        student: the replaced model (originals still kept).
        data: batches to fit on (the first ``batches`` are used).
        batches: how many batches to capture.
        decays: forget-gate values tried per head and direction by recurrent replacements (each
            direction picks its own).
        scale: input scale of the recurrent candidate (keeps tanh near its linear range).
        ridge: ridge term of the least-squares fit, relative to the feature energy.
        labelled: how to read 2-tuples (see ``surgery.data.split_batch``).

    Returns:
        What each hook chose (recurrences: the decays [forward, backward] of every head), by site name.

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
    hooks = {w.site.name: get_replacement(w.replacement).init_from_teacher for w in wrappers}
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
            weight, bias = value_projection(w)
            evidence = TeacherEvidence(weight, bias, records[w.site.name], ridge=ridge,
                                       settings={"decays": tuple(decays), "scale": scale},
                                       original=w.original, site=w.site)
            summary = hooks[w.site.name](w.mixer, evidence)
            if summary is not None:  # None: the hook found nothing it could start (mixer unchanged)
                chosen[w.site.name] = summary
    return chosen


