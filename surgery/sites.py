"""AttentionSite: the frozen record of one located attention block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: How a site is called and what it returns, which its replacement must keep:
#: "tensor" -> forward(hidden, ...) returns a tensor;
#: "tuple"  -> forward(hidden, ...) returns a tuple whose first item is the hidden states
#:             (HuggingFace: (output, attention_weights));
#: "mha"    -> torch.nn.MultiheadAttention: forward(query, key, value, ...) -> (output, weights).
CONVENTIONS = ("tensor", "tuple", "mha")

#: What a site computes, which decides whether an N-to-N sequence mixer may take its place:
#: "self"         -> queries, keys and values from the same [B, N, D] tokens; N tokens out;
#: "cross"        -> keys/values from another sequence (an encoder's output, a second stream);
#: "query-subset" -> fewer (or more) tokens out than in: class attention, pooled/downsampling queries;
#: "windowed"     -> 4-D hidden states: a grid ([B, H, W, C]) attended window by window, as in
#:                   Swin, or a [B, C, H, W] feature map.
SITE_KINDS = ("self", "cross", "query-subset", "windowed")

#: Where ``AttentionSite.causal`` came from: "graph" (the mask / ``is_causal`` that reached the
#: attention core while the model ran), "probe" (perturbing later tokens moved the first output),
#: "attribute" (the module's ``is_causal``, when nothing else could tell).
CAUSAL_SOURCES = ("graph", "probe", "attribute")


@dataclass(frozen=True)
class AttentionSite:
    """One attention block found in a model, described well enough to replace it.

    Args:
        name: qualified module name (``model.get_submodule(name)``).
        module_type: class name of the attention module.
        embed_dim: width of the hidden states entering and leaving the block.
        num_heads: attention heads.
        head_dim: width of one head.
        causal: True when output position t depends only on positions <= t.
        convention: calling convention to keep (one of ``CONVENTIONS``).
        out_proj: child name of the output projection inside the block, reused by the replacement
            (FAR), or None when the projection lives outside the block (HF ``*SelfAttention``).
        out_dropout: child name of a dropout applied after ``out_proj`` inside the block, or None.
        context_dim: width of the attention output before the output projection (the tensor that
            distillation matches).
        batch_first: layout of the hidden states ([B, N, D] when True, [N, B, D] when False).
        output_len: number of items returned by a "tuple"/"mha" site (1 for "tensor").
        kind: one of ``SITE_KINDS``; a replacement serves the kinds it declares (``serves``),
            the others are skipped with a reason.
        found_by: "fx", "export" or "type" (graph capture that found it, or the type fallback).
        causal_source: one of ``CAUSAL_SOURCES``: what decided ``causal``.
        note: why the kind or causality was decided as it was when the evidence disagreed
            (e.g. the probe and the mask at the core), else "".
        kv_heads: key/value heads under grouped-query attention (Llama's ``num_key_value_heads``),
            or 0 when the site has as many as ``num_heads`` (or does not say).

    Example:
        >>> site = AttentionSite("blocks.0.attn", "Attention", 192, 3, 64, False, "tensor", "proj")
        >>> site.row()[:3]
        ['blocks.0.attn', 'Attention', '192']
    """

    name: str
    module_type: str
    embed_dim: int
    num_heads: int
    head_dim: int
    causal: bool
    convention: str
    out_proj: str | None = None
    out_dropout: str | None = None
    context_dim: int = 0
    batch_first: bool = True
    output_len: int = 1
    kind: str = "self"
    found_by: str = "fx"
    causal_source: str = "attribute"
    note: str = ""
    kv_heads: int = 0

    COLUMNS = ("name", "type", "dim", "heads", "head dim", "causal", "convention", "out proj",
               "kind", "found by")

    def row(self) -> list[str]:
        """The site as strings, in the order of ``AttentionSite.COLUMNS``."""
        return [self.name, self.module_type, str(self.embed_dim), str(self.num_heads),
                str(self.head_dim), "yes" if self.causal else "no", self.convention,
                self.out_proj or "(outside)", self.kind, self.found_by]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AttentionSite":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass(frozen=True)
class SkippedSite:
    """An attention module that was found but is left alone, and why (shown by ``inspect`` and in
    ``ReplacementReport.skipped``).

    Args:
        name: qualified module name.
        module_type: class name of the module.
        kind: its site kind (one of ``SITE_KINDS``), or "unsupported" when it could not be described.
        reason: one line saying why it is skipped and what would change that.
    """

    name: str
    module_type: str
    kind: str
    reason: str

    COLUMNS = ("name", "type", "kind", "reason")

    def row(self) -> list[str]:
        return [self.name, self.module_type, self.kind, self.reason]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SiteList(list):
    """``find_attention``'s result: a plain list of ``AttentionSite`` plus ``skipped``, the modules
    that own an attention core but could not be described (a ``SkippedSite`` each)."""

    def __init__(self, sites=(), skipped=()) -> None:
        super().__init__(sites)
        self.skipped: tuple[SkippedSite, ...] = tuple(skipped)
