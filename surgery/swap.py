"""Swap attention blocks for registered replacements, in place, with every check before any change."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as module_globals  # global forward hooks (_any_hooks)

from surgery.decoding import decoding_form, site_call
from surgery.errors import NoAttentionFoundError, SurgeryError, UnsupportedSiteError
from surgery.inputs import as_args_kwargs, default_example_inputs
from surgery.locate import _Call, _causal_probe, _first_tensor, _hidden_states, find_attention, run_example
from surgery.registry import (MixerShape, Replacement, ReplacementConfig, get_replacement, tracing,
                              using_reference_forms)
from surgery.sites import AttentionSite, SkippedSite

#: plain attributes of the original block copied onto the wrapper, since callers read them
#: (nn.TransformerEncoderLayer reads self_attn.batch_first, HF code reads head counts)
_COPIED_ATTRIBUTE_TYPES = (bool, int, float, str, type(None))


class ReplacedAttention(nn.Module):
    """An attention site after surgery: the replacement mixer, the original's output projection
    (reused, as in FAR) and, until ``finalize``, the original block itself (the distillation teacher).

    Called exactly like the original block and returns the same structure. With
    ``use_original = True`` it runs the original block instead (teacher mode). A causal site whose
    replacement has a decoding form decodes statefully when a cache reaches it (``surgery.decoding``).
    """

    is_replaced_site = True  # how surgery.decoding recognises a site (it does not import this module)

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
        hidden, valid = self.read_inputs(args, kwargs)
        # a cache (or a surgery.decoding.stateful session) and a decoding form: stateful decoding
        context = site_call(self, hidden, valid, kwargs)
        if context is None:
            _refuse_incremental_decoding(self.site.name, kwargs, hidden.shape[1])
            folded = self.folded_form()
            if folded is not None:
                return self.pack_output(folded(hidden, valid))
            context = self.mixer(hidden, valid)
        return self.pack_output(self.project(context))

    def folded_form(self) -> nn.Module | None:
        """The replacement's inference form with the reused output projection multiplied in (its
        ``folded_form`` hook; ``conv`` has one), for a call that may use it: eval mode without
        gradients, no tracer or compiler, not inside ``reference_forms()``, a plain ``nn.Linear``
        projection, no active dropout after it, and no hooks on the mixer, the projection or their
        submodules (a hook expects its module to run). None = run the mixer, then the projection."""
        if self.training or torch.is_grad_enabled() or not self.out_proj_attribute or using_reference_forms():
            return None
        hook = self.__dict__.get("_folded_hook", False)
        if hook is False:
            hook = get_replacement(self.replacement).folded_form
            object.__setattr__(self, "_folded_hook", hook)
        if hook is None or tracing():
            return None
        projection = getattr(self, self.out_proj_attribute)
        dropout = getattr(self, self.out_dropout_attribute) if self.out_dropout_attribute else None
        if type(projection) is not nn.Linear or (dropout is not None and dropout.training) or projection.training:
            return None
        if _any_hooks(self.mixer) or _any_hooks(projection):
            return None
        return hook(self.mixer, projection)

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


def _any_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has forward (pre-)hooks, or global module hooks are set."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_POSITION_KWARGS = ("cache_position", "position_ids")
_SEEN_BY = "_surgery_seen_by"  # attribute marking a cache object with the replaced sites it reached


def _refuse_incremental_decoding(site: str, kwargs: dict, tokens: int) -> None:
    """Refuse a call that feeds only the newest tokens next to a cache (incremental decoding).

    A sequence mixer sees only the tokens it is given and writes nothing to the cache, so the
    cache's length stays 0 and a length check alone never fires: the same cache object reaching
    the site a second time, or positions beyond the tokens given, show it too.
    """
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        length = getattr(cache, "get_seq_length", None)
        seen = getattr(cache, _SEEN_BY, None)
        reason = None
        if callable(length) and length() > 0:
            reason = "got a filled KV cache"
        elif isinstance(seen, set) and site in seen:
            reason = "got the same cache a second time"
        else:
            for name in _POSITION_KWARGS:
                position = kwargs.get(name)
                if isinstance(position, torch.Tensor) and position.numel() and int(position.max()) >= tokens:
                    reason = f"got {tokens} token(s) at {name} up to {int(position.max())}"
                    break
        if reason:
            raise SurgeryError(
                f"site {site!r} {reason}: incremental decoding is not supported with replaced "
                "attention (it keeps no cache); call generate(..., use_cache=False) or the model "
                "on the full sequence with use_cache=False"
            )
        try:
            setattr(cache, _SEEN_BY, (seen if isinstance(seen, set) else set()) | {site})
        except (AttributeError, TypeError):  # a cache type without attributes: the checks above remain
            pass


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
    """What ``replace_attention`` did: the replacement, the sites and parameter counts, and the
    attention sites left alone with the reason (``skipped``, a ``SkippedSite`` each)."""

    replacement: str
    config: dict
    sites: tuple[SiteReport, ...]
    params_before: int
    params_after: int
    skipped: tuple[SkippedSite, ...] = ()

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


#: what each kind is, for the reason a site is skipped
_KIND_TEXT = {
    "cross": "cross-attention: its keys and values come from another sequence",
    "query-subset": "query-subset attention (class or pooling queries): it returns another number of tokens than it reads",
    "windowed": ("windowed (grid) attention: its hidden states are 4-D (Swin's [B, H, W, C] windows, or a "
                 "[B, C, H, W] feature map), not [B, N, D] tokens"),
}


def _kind_reason(site: AttentionSite, spec: Replacement) -> str:
    detail = f" ({site.note})" if site.note else ""
    return (f"{_KIND_TEXT.get(site.kind, site.kind + ' attention')}{detail}; {spec.name!r} serves "
            f"{', '.join(_serves(spec))} sites only")


def _serves(spec: Replacement) -> tuple[str, ...]:
    return tuple(getattr(spec, "serves", None) or ("self",))  # the registry's kinds hook


def unserved_sites(sites: list[AttentionSite], replacement: str) -> list[SkippedSite]:
    """The sites ``replace_attention(..., replacement, on_unsupported="skip")`` would leave alone
    for their kind, with the reason, plus those the locator could not describe (``sites.skipped``).

    Example:
        >>> import timm, surgery
        >>> sites = surgery.find_attention(timm.create_model("deit_tiny_patch16_224"))
        >>> unserved_sites(sites, "mhlstm")
        []
    """
    spec = get_replacement(replacement)
    return list(getattr(sites, "skipped", ())) + [
        SkippedSite(s.name, s.module_type, s.kind, _kind_reason(s, spec)) for s in sites if s.kind not in _serves(spec)]


def _layout(output: Any) -> tuple:
    """What the rest of the model sees of a site's output: container, length, main tensor's shape and dtype."""
    first = _first_tensor(output)
    main = (tuple(first.shape), first.dtype) if first is not None else None
    if isinstance(output, torch.Tensor):
        return ("tensor", main)
    if isinstance(output, (tuple, list)):
        return (type(output).__name__, len(output), main)
    return (type(output).__name__, main)


def _record_site_calls(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> dict[str, _Call]:
    """Run the model once and keep each named module's first inputs and output."""
    calls: dict[str, _Call] = {}
    handles = []
    for name in names:
        def hook(module, a, kw, out, name=name):
            calls.setdefault(name, _Call(a, kw, out))

        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    run_example(model, args, kwargs, handles)
    return calls


def _verify(model: nn.Module, built: list, args: tuple, kwargs: dict) -> dict[str, str]:
    """Run each replacement on the inputs its site got from the example inputs; return
    ``{site name: reason}`` for each one whose output the rest of the model would see differently
    (container, tokens, width, dtype) or that is not causal where the site is."""
    calls = _record_site_calls(model, [site.name for site, _, _ in built], args, kwargs)
    problems: dict[str, str] = {}
    for site, _, wrapper in built:
        call = calls.get(site.name)
        if call is None:
            problems[site.name] = "not called by the model's forward on the example inputs"
            continue
        modes = {module: module.training for module in wrapper.modules()}  # the original's, too
        wrapper.eval()
        try:
            problem = _check_one(site, wrapper, call)
        finally:
            for module, training in modes.items():
                module.training = training
        if problem:
            problems[site.name] = problem
    return problems


def _check_one(site: AttentionSite, wrapper: ReplacedAttention, call: _Call) -> str | None:
    try:
        with torch.no_grad():
            output = wrapper(*call.args, **{k: (None if k in _CACHE_KWARGS else v)
                                            for k, v in call.kwargs.items()})
    except Exception as error:  # noqa: BLE001 - any failure is a reason to leave the site alone
        text = str(error).splitlines()[0][:120] if str(error) else ""
        return f"the replacement failed on the site's inputs ({type(error).__name__}: {text})"
    expected, got = _layout(call.output), _layout(output)
    if expected != got:
        return f"the replacement returns {got}, the original {expected}"
    hidden, _ = _hidden_states(wrapper, call)
    if site.causal and hidden is not None and _causal_probe(
            wrapper, call, hidden, 1 if site.batch_first else 0) is False:
        return "the site is causal but its replacement's first output reads later tokens"
    return None


def _prefer_full_prefix(model: nn.Module) -> None:
    # A replaced causal site without a decoding form keeps no state, so a HuggingFace model must
    # recompute the whole prefix at every generation step: generate() defaults to use_cache=False. An explicit
    # use_cache=True, or a cache fed back by hand, is refused at the site on the next step (see
    # _refuse_incremental_decoding). A plain call still returns its cache object, as before.
    for module in model.modules():
        generation = getattr(module, "generation_config", None)
        if generation is not None and getattr(generation, "use_cache", None):
            generation.use_cache = False
            _TURNED_OFF_CACHES.setdefault(model, []).append(generation)


#: generation configs whose use_cache replace_attention turned off, per model (restore_attention
#: turns them back on); weak, so a model that is dropped is not kept alive
_TURNED_OFF_CACHES: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


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
    on_unsupported: str = "raise",
) -> ReplacementReport:
    """Replace every attention block of ``model`` (in place) with the replacement ``replacement``.

    Stages, all checks first: locate the sites; keep those whose kind the replacement serves
    (``register_replacement(serves=...)``; built-ins serve "self"); build every replacement; run the
    example inputs through each one and compare its output (container, shape, dtype, causality)
    with the original's; only then swap. A failure leaves the model untouched, never half-replaced.
    The originals stay inside the wrappers (the distillation teachers) until ``finalize(model)``.
    Each replacement takes the training mode of the block it replaces. Causal sites whose
    replacement has a decoding form (mhlstm, gru, conv) keep a fixed-size state in the model's
    cache, so ``generate()`` decodes token by token (``surgery.decoding``). A HuggingFace model
    with a causal site whose replacement has none gets ``use_cache=False`` in its generation
    config: ``generate()`` recomputes the full prefix (and refuses ``use_cache=True``).

    Args:
        model: the model to change in place.
        replacement: a registered name (``list_replacements()``), e.g. "mhlstm", "gru", "conv".
        example_inputs: inputs the model accepts (see ``find_attention``); None guesses them.
        config: the replacement's config dataclass, or a dict of its settings.
        targets, exclude, filter_fn: choose sites (see ``find_attention``).
        sites: already located sites (skips locating; ``load`` uses this). Without
            ``example_inputs`` they are not run again (they were checked when first replaced).
        on_unsupported: "raise" (default): a site the replacement cannot serve, or whose
            replacement fails the check, raises ``UnsupportedSiteError`` naming it; "skip": leave
            it alone and list it in the report's ``skipped`` with the reason.

    Returns:
        A ``ReplacementReport`` with per-site parameter counts and the skipped sites.

    Example:
        >>> import timm, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> report = surgery.replace_attention(model, "mhlstm")
        >>> len(report.sites), report.skipped
        (12, ())
    """
    if on_unsupported not in ("raise", "skip"):
        raise SurgeryError(f"unknown on_unsupported {on_unsupported!r}; use 'raise' or 'skip'")
    spec = get_replacement(replacement)
    if not isinstance(config, ReplacementConfig):
        config = spec.config_class.from_dict(config)
    inputs = None
    if sites is None:
        inputs = as_args_kwargs(example_inputs) if example_inputs is not None else default_example_inputs(model)
        done = [n for n, m in model.named_modules() if isinstance(m, ReplacedAttention)]
        chosen = filter_fn
        if done:  # the originals kept inside earlier wrappers are attention, but never a site again
            def chosen(name: str, module: nn.Module) -> bool:
                inside = any(name == d or name.startswith(d + ".") for d in done)
                return not inside and (filter_fn is None or filter_fn(name, module))
        try:
            sites = find_attention(model, inputs, targets=targets, exclude=exclude, filter_fn=chosen,
                                   on_unsupported=on_unsupported)
        except NoAttentionFoundError:
            if not done:
                raise
            raise UnsupportedSiteError(f"the model is already replaced ({len(done)} sites, e.g. {done[0]!r}) and has "
                                       "no other attention; replace the base model, or load a saved run with "
                                       "surgery.load") from None
    elif example_inputs is not None:
        inputs = as_args_kwargs(example_inputs)
    skipped: list[SkippedSite] = list(getattr(sites, "skipped", ()))
    # check everything before the first change
    modules = dict(model.named_modules())
    already = [s.name for s in sites if isinstance(modules.get(s.name), ReplacedAttention)]
    if already:
        raise UnsupportedSiteError(f"sites {already} are already replaced; load or finalize first")
    missing = [s.name for s in sites if s.name not in modules]
    if missing:
        raise UnsupportedSiteError(f"sites {missing} are not modules of {type(model).__name__}")
    served = []
    for site in sites:
        if site.kind in _serves(spec):
            served.append(site)
            continue
        if on_unsupported == "raise":
            raise UnsupportedSiteError(
                f"{replacement!r} cannot serve site {site.name!r}, {_kind_reason(site, spec)}; pass "
                "exclude=[...] or on_unsupported='skip' (CLI: without --strict) to leave it alone"
            )
        skipped.append(SkippedSite(site.name, site.module_type, site.kind, _kind_reason(site, spec)))
    built = []
    for site in served:
        original = modules[site.name]
        shape = MixerShape(site.embed_dim, site.context_dim, site.num_heads, site.causal, kv_heads=site.kv_heads)
        try:
            mixer = spec.build(shape, config)
        except (ValueError, TypeError) as error:
            raise UnsupportedSiteError(f"{replacement!r} cannot serve site {site.name!r}: {error}") from error
        reference = next(original.parameters(), None)
        if reference is not None:
            mixer.to(device=reference.device, dtype=reference.dtype)
        wrapper = ReplacedAttention(site, mixer, original, replacement, config)
        # mode preserved: a replacement runs as its original did (the original's own modules,
        # shared by the wrapper, are left exactly as they are)
        wrapper.training = original.training
        mixer.train(original.training)
        built.append((site, original, wrapper))
    if inputs is not None and built:
        problems = _verify(model, built, *inputs)
        if problems and on_unsupported == "raise":
            name, reason = next(iter(problems.items()))
            raise UnsupportedSiteError(
                f"site {name!r} failed the check before the swap ({reason}); nothing was replaced. "
                "Pass exclude=[...] or on_unsupported='skip' to leave it alone"
            )
        skipped += [SkippedSite(site.name, site.module_type, site.kind, f"failed the check: {problems[site.name]}")
                    for site, _, _ in built if site.name in problems]
        built = [entry for entry in built if entry[0].name not in problems]
    if not built:
        raise UnsupportedSiteError(
            f"{replacement!r} can serve none of the {len(sites)} attention site(s) of "
            f"{type(model).__name__}: " + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        )
    # mutate
    reports = []
    params_before = count_parameters(model)
    for site, original, wrapper in built:
        parent_name, _, child = site.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
        after = count_parameters(wrapper)
        reports.append(SiteReport(site, sum(p.numel() for p in original.parameters()), after))
    if any(site.causal and decoding_form(wrapper) is None for site, _, wrapper in built):
        _prefer_full_prefix(model)  # a causal site that cannot decode: generate() recomputes the prefix
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return ReplacementReport(replacement, config.to_dict(), tuple(reports), params_before,
                             count_parameters(model), tuple(sorted(skipped, key=lambda s: order.get(s.name, 0))))


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
    for generation in _TURNED_OFF_CACHES.pop(model, []):
        generation.use_cache = True
    return model


def use_original_attention(model: nn.Module, enabled: bool = True) -> None:
    """Switch every replaced site to run its original block (teacher) or its replacement."""
    for wrapper in replaced_sites(model):
        if enabled and wrapper.original is None:
            raise SurgeryError(f"site {wrapper.site.name!r} was finalized: no original to run")
        wrapper.use_original = enabled
