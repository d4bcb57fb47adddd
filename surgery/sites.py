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
        kind: "self" or "cross"; cross-attention cannot be replaced by a sequence mixer.
        found_by: "fx", "export" or "type" (graph capture that found it, or the type fallback).

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
