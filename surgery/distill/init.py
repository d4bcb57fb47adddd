"""Start replacements close to the attention they replace, from the teacher itself.

Attention's context for head k is a mixture of that head's VALUES. This module finds the original's
value projection and captures a few batches of what it computed (hidden states in, context out);
each replacement's own ``init_from_teacher`` hook (``surgery.registry``) turns that into a start:
multi-head LSTM / GRU read the values through moving averages chosen per head and direction, token
convolutions pass each token's values through, both with a least-squares output map.

Sites whose original has no recognisable value projection, and replacements without the hook,
keep their default start; the result names them (``TeacherStart.kept_default``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from surgery.data import split_batch, to_device
from surgery.distill.capture import TeacherCapture
from surgery.distill.fidelity import call_model
from surgery.errors import SurgeryError
from surgery.progress import NullProgress, Progress
from surgery.registry import TeacherEvidence, get_replacement, replacement_of
from surgery.swap import ReplacedAttention, replaced_sites


def _is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a Linear stored transposed, weight [in, out]."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and getattr(module, "nf", None) == module.weight.shape[1]


def value_projection(wrapper: ReplacedAttention) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [C, D], bias [C]) of the original block's value projection, when recognisable, rows in
    query-head order: ``value`` / ``v`` / ``v_proj`` Linears (grouped-query ``v_proj`` with fewer rows
    has each key/value head repeated for its group of query heads, as transformers' ``repeat_kv``),
    a fused ``qkv`` Linear, GPT-2's fused ``c_attn`` Conv1D, ``nn.MultiheadAttention``'s
    ``in_proj_weight``."""
    original = wrapper.original
    if original is None:
        return None
    context = wrapper.site.context_dim or wrapper.site.embed_dim
    for name in ("value", "v", "v_proj"):
        value = getattr(original, name, None)
        if isinstance(value, nn.Linear):
            return _query_head_order(value.weight, value.bias, context, wrapper.site.num_heads)
    qkv = getattr(original, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features == 3 * context:
        return qkv.weight[2 * context:], None if qkv.bias is None else qkv.bias[2 * context:]
    fused = getattr(original, "c_attn", None)
    if _is_conv1d(fused) and fused.weight.shape[1] == 3 * context:
        return fused.weight[:, 2 * context:].T, None if fused.bias is None else fused.bias[2 * context:]
    weight = getattr(original, "in_proj_weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape[0] == 3 * context:
        bias = getattr(original, "in_proj_bias", None)
        return weight[2 * context:], None if bias is None else bias[2 * context:]
    return None


def _query_head_order(weight: torch.Tensor, bias: torch.Tensor | None, context: int,
                      heads: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A value projection as [context, D]: as it is, or (grouped-query attention, ``kv_heads * head_dim``
    rows) key/value head g repeated for query heads g * repeat .. g * repeat + repeat - 1; None when
    its rows fit neither."""
    rows = weight.shape[0]
    if rows == context:
        return weight, bias
    head_dim = context // heads if heads else 0
    if not head_dim or context % heads or rows % head_dim or heads % (rows // head_dim):
        return None
    repeat = heads // (rows // head_dim)
    weight = weight.reshape(-1, 1, head_dim, weight.shape[1]).expand(-1, repeat, -1, -1).reshape(context, -1)
    if bias is not None:
        bias = bias.reshape(-1, 1, head_dim).expand(-1, repeat, -1).reshape(context)
    return weight, bias


def supports_init(mixer: nn.Module) -> bool:
    """Whether ``mixer``'s replacement has a teacher-derived start (an ``init_from_teacher`` hook)."""
    spec = replacement_of(mixer)
    return spec is not None and spec.init_from_teacher is not None


class TeacherStart(dict):
    """What ``initialise_from_teacher`` chose, by site name (a plain dict of the hooks' summaries),
    plus ``kept_default``: every other replaced site and why it kept its default start.

    Example:
        >>> start = TeacherStart({"a": [[0.5, 0.9]]}, kept_default={"b": "no readable value projection"})
        >>> start.kept_default_line()
        'kept their default start (1 of 2 sites): b (no readable value projection)'
    """

    def __init__(self, chosen=(), kept_default: dict[str, str] | None = None) -> None:
        super().__init__(chosen)
        self.kept_default = dict(kept_default or {})

    def kept_default_line(self) -> str:
        """One line naming the sites that kept their default start ('' when every site was started)."""
        if not self.kept_default:
            return ""
        listed = ", ".join(f"{name} ({why})" for name, why in self.kept_default.items())
        return f"kept their default start ({len(self.kept_default)} of {len(self) + len(self.kept_default)} " \
               f"sites): {listed}"


def _why_not(wrapper: ReplacedAttention) -> str | None:
    """Why a site gets no teacher-derived start before anything runs, or None when it can get one."""
    if not supports_init(wrapper.mixer):
        return f"{wrapper.replacement} has no teacher start"
    if wrapper.original is None:
        return "finalized: its original is gone"
    if value_projection(wrapper) is None:
        return f"no readable value projection in {type(wrapper.original).__name__}"
    return None


def initialise_from_teacher(student: nn.Module, data: Iterable, *, batches: int = 4,
                            decays: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.97, 0.995), scale: float = 0.5,
                            ridge: float = 1e-3, labelled: bool | None = None, progress: Progress | None = None,
                            required: bool = False) -> TeacherStart:
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
        progress: a ``surgery.progress.Progress`` told "initialising site k/N" per site and, in one
            line, which sites kept their default start; None = quiet.
        required: the caller asked for the teacher start (``init="teacher"``): a model where NO site
            can be started raises instead of returning an empty result.

    Returns:
        What each hook chose (recurrences: the decays [forward, backward] of every head), by site name;
        its ``kept_default`` names the other sites and why.

    Raises:
        SurgeryError: ``required`` and no site could be started.

    Example:
        >>> import torch, surgery
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).eval()
        >>> _ = surgery.replace_attention(bert, "mhlstm")
        >>> chosen = initialise_from_teacher(bert, [{"input_ids": torch.randint(0, 50, (2, 8))}])
        >>> len(chosen["encoder.layer.0.attention.self"]), chosen.kept_default
        (2, {})
    """
    progress = progress or NullProgress()
    kept: dict[str, str] = {}
    wrappers = []
    for w in replaced_sites(student):
        why = _why_not(w)
        if why is None:
            wrappers.append(w)
        else:
            kept[w.site.name] = why
    chosen: dict[str, list[float]] = {}
    if wrappers:
        hooks = {w.site.name: get_replacement(w.replacement).init_from_teacher for w in wrappers}
        device = next(student.parameters()).device
        progress.message(f"initialising {len(wrappers)} sites from the teacher: capturing {batches} batches")
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
        with torch.no_grad():
            for number, w in enumerate(wrappers, 1):
                progress.message(f"initialising site {number}/{len(wrappers)}: {w.site.name}")
                weight, bias = value_projection(w)
                evidence = TeacherEvidence(weight, bias, records.pop(w.site.name), ridge=ridge,
                                           settings={"decays": tuple(decays), "scale": scale},
                                           original=w.original, site=w.site)
                summary = hooks[w.site.name](w.mixer, evidence)
                if summary is None:  # the hook found nothing it could start (mixer unchanged)
                    kept[w.site.name] = f"{w.replacement}'s hook cannot start this mixer"
                else:
                    chosen[w.site.name] = summary
    result = TeacherStart(chosen, kept)
    if kept:
        if required and not chosen:
            raise SurgeryError(f"init='teacher' could start no site: {result.kept_default_line()}; "
                               "distill with init='none' (--distill-set init=none)")
        progress.message(result.kept_default_line())
    return result
