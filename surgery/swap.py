"""Swap attention blocks for registered replacements, in place, with every check before any change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from surgery.errors import SurgeryError, UnsupportedSiteError
from surgery.locate import find_attention
from surgery.registry import MixerShape, ReplacementConfig, get_replacement
from surgery.sites import AttentionSite

#: plain attributes of the original block copied onto the wrapper, since callers read them
#: (nn.TransformerEncoderLayer reads self_attn.batch_first, HF code reads head counts)
_COPIED_ATTRIBUTE_TYPES = (bool, int, float, str, type(None))


class ReplacedAttention(nn.Module):
    """An attention site after surgery: the replacement mixer, the original's output projection
    (reused, as in FAR) and, until ``finalize``, the original block itself (the distillation teacher).

    Called exactly like the original block and returns the same structure. With
    ``use_original = True`` it runs the original block instead (teacher mode).
    """

    def __init__(self, site: AttentionSite, mixer: nn.Module, original: nn.Module,
                 replacement: str, config: ReplacementConfig) -> None:
        super().__init__()
        for key, value in vars(original).items():
            if not key.startswith("_") and isinstance(value, _COPIED_ATTRIBUTE_TYPES):
                object.__setattr__(self, key, value)
        self.site = site
        self.replacement = replacement
        self.config = config
        self.use_original = False
        self.mixer = mixer
        self.original = original
        if site.convention == "mha":
            # disables nn.TransformerEncoderLayer's fused fast path, which reads MHA weights directly
            self.in_proj_bias = None
            self._qkv_same_embed_dim = False
        self.out_proj_attribute = _attribute_name(site.out_proj)
        self.out_dropout_attribute = _attribute_name(site.out_dropout)
        if site.out_proj:
            # same attribute name as in the original, so the reused weights keep their keys
            setattr(self, self.out_proj_attribute, original.get_submodule(site.out_proj))
        if site.out_dropout:
            setattr(self, self.out_dropout_attribute, original.get_submodule(site.out_dropout))

    @property
    def finalized(self) -> bool:
        return self.original is None

    @property
    def out_projection(self) -> nn.Module | None:
        return getattr(self, self.out_proj_attribute) if self.out_proj_attribute else None

    def read_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states as [B, N, D] and a padding mask [B, N] (True = real token) or None."""
        site = self.site
        if site.convention == "mha":
            names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            hidden = bound["query"]
            if not site.batch_first:
                hidden = hidden.transpose(0, 1)
            return hidden, _valid_from_key_padding(bound.get("key_padding_mask"))
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        mask = kwargs.get("attention_mask", kwargs.get("attn_mask"))
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        return hidden, _valid_from_attention_mask(mask, hidden.shape[1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.use_original:
            if self.original is None:
                raise SurgeryError(f"site {self.site.name!r} was finalized: its original is gone")
            return self.original(*args, **kwargs)
        _refuse_filled_cache(self.site.name, kwargs)
        hidden, valid = self.read_inputs(args, kwargs)
        output = self.project(self.mixer(hidden, valid))
        return self.pack_output(output)

    def project(self, context: torch.Tensor) -> torch.Tensor:
        """Apply the reused output projection (and its dropout) to the mixer's context output."""
        if self.out_proj_attribute:
            context = getattr(self, self.out_proj_attribute)(context)
        if self.out_dropout_attribute:
            context = getattr(self, self.out_dropout_attribute)(context)
        return context

    def pack_output(self, output: torch.Tensor) -> Any:
        site = self.site
        if site.convention == "mha":
            if not site.batch_first:
                output = output.transpose(0, 1)
            return output, None
        if site.convention == "tuple":
            return (output,) + (None,) * (site.output_len - 1)
        return output

    def extra_repr(self) -> str:
        return f"site={self.site.name!r}, replacement={self.replacement!r}, finalized={self.finalized}"


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _refuse_filled_cache(site: str, kwargs: dict) -> None:
    # A sequence mixer sees only the tokens it is given: with earlier tokens held in a KV cache
    # (incremental decoding) its output would silently be wrong.
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        length = getattr(cache, "get_seq_length", None)
        if cache is not None and callable(length) and length() > 0:
            raise SurgeryError(
                f"site {site!r} got a filled KV cache: incremental decoding is not supported with "
                "replaced attention; call the model on the full sequence with use_cache=False"
            )


def _attribute_name(path: str | None) -> str | None:
    return path.replace(".", "_") if path else None


# A mask is passed on even when it has no padding: deciding "no padding, pass None" would be a
# data-dependent Python branch, which stops torch.export / dynamo from tracing a masked call. An
# all-True mask gives the same result as None (mixers multiply by it: x * 1 == x exactly).
def _valid_from_key_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask == 0


def _valid_from_attention_mask(mask: Any, seq_len: int) -> torch.Tensor | None:
    """Key validity from a 2-D [B, N] (1 = keep) or 4-D [B, 1, Q, N] (bool allowed / additive) mask."""
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != seq_len:
        return None
    if mask.dim() == 2:
        valid = mask.bool()
    elif mask.dim() == 4:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        valid = allowed.any(dim=-2)[:, 0]
    else:
        return None
    return valid


@dataclass(frozen=True)
class SiteReport:
    """Parameters of one site before (original block) and after (mixer + reused projection)."""

    site: AttentionSite
    params_before: int
    params_after: int


@dataclass(frozen=True)
class ReplacementReport:
    """What ``replace_attention`` did: the replacement, the sites and parameter counts."""

    replacement: str
    config: dict
    sites: tuple[SiteReport, ...]
    params_before: int
    params_after: int

    COLUMNS = ("site", "params before", "params after", "ratio")

    def rows(self) -> list[list[str]]:
        return [[s.site.name, f"{s.params_before:,}", f"{s.params_after:,}",
                 f"{s.params_after / max(s.params_before, 1):.2f}"] for s in self.sites]


def count_parameters(module: nn.Module, include_originals: bool = False) -> int:
    """Distinct parameters of ``module``; originals kept for distillation are left out by default.

    Example:
        >>> count_parameters(nn.Linear(4, 2))
        10
    """
    skip = set()
    if not include_originals:
        for wrapper in replaced_sites(module):
            if wrapper.original is not None:
                skip |= {id(p) for p in wrapper.original.parameters()} - _projection_ids(wrapper)
    seen = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _projection_ids(wrapper: ReplacedAttention) -> set[int]:
    ids = set()
    for attribute in (wrapper.out_proj_attribute, wrapper.out_dropout_attribute):
        if attribute:
            ids |= {id(p) for p in getattr(wrapper, attribute).parameters()}
    return ids


def replaced_sites(model: nn.Module) -> Iterator[ReplacedAttention]:
    """Every ``ReplacedAttention`` in ``model``, in module order."""
    return (m for m in model.modules() if isinstance(m, ReplacedAttention))


def replace_attention(
    model: nn.Module,
    replacement: str = "mhlstm",
    example_inputs: Any = None,
    *,
    config: ReplacementConfig | dict | None = None,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    sites: list[AttentionSite] | None = None,
) -> ReplacementReport:
    """Replace every attention block of ``model`` (in place) with the replacement ``replacement``.

    All sites are located and checked, and every replacement module is built, before the first
    change, so a failure leaves the model untouched. The originals stay inside the wrappers (they
    are the distillation teachers) until ``finalize(model)``.

    Args:
        model: the model to change in place.
        replacement: a registered name (``list_replacements()``), e.g. "mhlstm", "gru", "conv".
        example_inputs: inputs the model accepts (see ``find_attention``); None guesses them.
        config: the replacement's config dataclass, or a dict of its settings.
        targets, exclude, filter_fn: choose sites (see ``find_attention``).
        sites: already located sites (skips locating; ``load`` uses this).

    Returns:
        A ``ReplacementReport`` with per-site parameter counts.

    Example:
        >>> import timm, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> report = surgery.replace_attention(model, "mhlstm")
        >>> len(report.sites)
        12
    """
    spec = get_replacement(replacement)
    if not isinstance(config, ReplacementConfig):
        config = spec.config_class.from_dict(config)
    if sites is None:
        sites = find_attention(model, example_inputs, targets=targets, exclude=exclude,
                               filter_fn=filter_fn)
    # check everything before the first change
    modules = dict(model.named_modules())
    cross = [s.name for s in sites if s.kind != "self"]
    if cross:
        raise UnsupportedSiteError(
            f"{replacement!r} cannot serve cross-attention sites {cross}: a sequence mixer reads one "
            "sequence only; pass exclude=[...] to leave them"
        )
    already = [s.name for s in sites if isinstance(modules.get(s.name), ReplacedAttention)]
    if already:
        raise UnsupportedSiteError(f"sites {already} are already replaced; load or finalize first")
    missing = [s.name for s in sites if s.name not in modules]
    if missing:
        raise UnsupportedSiteError(f"sites {missing} are not modules of {type(model).__name__}")
    built = []
    for site in sites:
        original = modules[site.name]
        shape = MixerShape(site.embed_dim, site.context_dim, site.num_heads, site.causal)
        try:
            mixer = spec.build(shape, config)
        except (ValueError, TypeError) as error:
            raise UnsupportedSiteError(f"{replacement!r} cannot serve site {site.name!r}: {error}") from error
        reference = next(original.parameters(), None)
        if reference is not None:
            mixer.to(device=reference.device, dtype=reference.dtype)
        built.append((site, original, ReplacedAttention(site, mixer, original, replacement, config)))
    # mutate
    reports = []
    params_before = count_parameters(model)
    for site, original, wrapper in built:
        parent_name, _, child = site.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
        after = count_parameters(wrapper)
        reports.append(SiteReport(site, sum(p.numel() for p in original.parameters()), after))
    return ReplacementReport(replacement, config.to_dict(), tuple(reports), params_before,
                             count_parameters(model))


def finalize(model: nn.Module) -> nn.Module:
    """Drop the original attention blocks kept for distillation; the model keeps only replacements.

    Example:
        >>> import timm, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "conv")
        >>> surgery.finalize(model) is model
        True
    """
    for wrapper in replaced_sites(model):
        wrapper.original = None
        wrapper.use_original = False
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo ``replace_attention``: put the original blocks back (only before ``finalize``)."""
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, ReplacedAttention)]
    gone = [name for name, m in wrappers if m.original is None]
    if gone:
        raise SurgeryError(f"cannot restore finalized sites {gone}: their originals were dropped")
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper.original)
    return model


def use_original_attention(model: nn.Module, enabled: bool = True) -> None:
    """Switch every replaced site to run its original block (teacher) or its replacement."""
    for wrapper in replaced_sites(model):
        if enabled and wrapper.original is None:
            raise SurgeryError(f"site {wrapper.site.name!r} was finalized: no original to run")
        wrapper.use_original = enabled
