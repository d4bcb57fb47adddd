"""Registry of sequence-mixing replacements for attention, keyed by name ("mhlstm", "gru", "conv")."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from surgery.errors import SurgeryError, UnknownNameError, close_matches
from surgery.sites import SITE_KINDS


@dataclass(frozen=True)
class MixerShape:
    """What a replacement must serve at one site: [B, N, input_dim] -> [B, N, output_dim].

    Args:
        input_dim: width of the hidden states entering the attention site.
        output_dim: width of the attention output before the output projection (heads * head_dim).
        num_heads: number of attention heads at the site.
        causal: when True, position t of the output may depend on positions <= t only.
        kv_heads: the site's key/value heads under grouped-query attention; 0 = as many as
            ``num_heads`` (``key_value_heads`` resolves it).

    Example:
        >>> MixerShape(input_dim=192, output_dim=192, num_heads=3, causal=False).head_dim
        64
        >>> MixerShape(576, 576, 9, True, kv_heads=3).key_value_heads
        3
    """

    input_dim: int
    output_dim: int
    num_heads: int
    causal: bool = False
    kv_heads: int = 0

    @property
    def head_dim(self) -> int:
        return self.output_dim // self.num_heads

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.num_heads


@dataclass(frozen=True)
class ReplacementConfig:
    """Base class of every replacement's hyper-parameters (a frozen dataclass: data, not behaviour)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ReplacementConfig":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SurgeryError(
                f"unknown setting(s) {unknown} for {cls.__name__}; known settings: {sorted(known)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class BatchedTraining:
    """A replacement's batched training form: several of its mixers computed in one call.

    Args:
        key: ``key(mixer) -> hashable or None``: mixers with equal keys can run together; None
            means this mixer takes its own forward.
        run: ``run(mixers, inputs, mask) -> outputs``: equal to ``[m(x, mask) for m, x in ...]``.
        cost: ``cost(mixer, x) -> int``: work per step, to keep one call's working set in cache.
    """

    key: Callable[[nn.Module], Any]
    run: Callable[[list, list, Any], list]
    cost: Callable[[nn.Module, Any], int] | None = None


@dataclass(frozen=True)
class TeacherEvidence:
    """What the original attention of one site computed, for ``init_from_teacher`` hooks.

    Args:
        value_weight: the original's value projection weight [C, D].
        value_bias: its bias [C], or None.
        records: captured (hidden [B, N, D], valid mask [B, N] or None, context target [B, N, C]).
        ridge: ridge term of least-squares fits, relative to the feature energy.
        settings: replacement-specific settings (e.g. ``decays`` and ``scale`` of recurrences).
        original: the original attention block, for hooks that read more than its value
            projection (``linear`` copies its queries and keys), or None.
        site: the site's ``AttentionSite`` (its name for errors), or None.
    """

    value_weight: Any
    value_bias: Any
    records: list
    ridge: float = 1e-3
    settings: dict = dataclasses.field(default_factory=dict)
    original: Any = None
    site: Any = None


class DecodingForm(Protocol):
    """Single-step (decoding) interface of a causal replacement: state in, state out.

    ``init_state(mixer, batch)`` gives the empty state, ``step(mixer, x_t, state) -> (y_t, state)``
    advances one token (``x_t`` [B, 1, D]), ``prefill(mixer, x, mask, state=None) -> (y, state)``
    runs a prompt (or a chunk after ``state``) and returns the state after its last token, equal to
    what the sequence form computes (pads in ``mask`` treated as the sequence form treats them). A
    state is a tuple of tensors with the batch first (caches reorder and select rows on dim 0).
    ``surgery.decoding`` keeps the states. A replacement without one has ``decoding=None``.
    """

    def init_state(self, mixer: nn.Module, batch: int) -> Any: ...

    def step(self, mixer: nn.Module, x_t: Any, state: Any) -> tuple[Any, Any]: ...

    def prefill(self, mixer: nn.Module, x: Any, mask: Any, state: Any = None) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class Replacement:
    """One registered replacement: its config and module, and (each optional) the hooks through
    which the core reaches it. The core asks the record, never the module's attributes.

    Args:
        name: the registered name.
        module_class: the module, built as ``module_class(shape, config)``.
        config_class: the config dataclass.
        description: the line ``surgery list`` shows.
        pruner: a ``surgery.units.ReplacementPruner`` subclass (or instance); None = unprunable.
        serves: the site kinds it can take the place of (``surgery.sites.SITE_KINDS``).
        training_form: a ``BatchedTraining`` (several mixers in one call), or None.
        inference_form: ``inference_form(mixer, use_kernel=None) -> nn.Module``: a separate
            module computing the same function for inference (``surgery.fast.optimize`` of earlier
            versions swapped it in); the module itself already runs it in eval mode. A hook that
            also names a ``recurrent_weights`` parameter receives ``optimize(model,
            recurrent_weights=...)`` ("float32" exact, "float16" opt-in).
        folded_form: ``folded_form(mixer, projection) -> nn.Module | None``: the inference form
            with the site's reused output projection (an ``nn.Linear``) multiplied in, called as
            ``form(x, padding_mask)`` in place of ``projection(mixer(x, padding_mask))``. The site
            asks for it on every call in eval mode without gradients (no tracer, no hooks on the
            mixer or the projection), so the hook caches it until a weight changes; None = not
            here (the site then runs the mixer and the projection). None = never folded.
        decoding: a ``DecodingForm`` for causal sites, or None.
        init_from_teacher: ``init_from_teacher(mixer, evidence: TeacherEvidence) -> summary`` (a
            JSON-able list), or None when the replacement has no teacher-derived start.
        resize: ``resize(mixer, shapes)``: rebuild the mixer's parts so their tensors have the
            saved shapes (keys relative to the mixer); None = every part is a plain layer that
            ``surgery.checkpoint`` resizes itself.
        flop_handles: fvcore op handles (op name -> handle) for ops the mixer runs.
        export_form: ``export_form(mixer) -> nn.Module`` traced in its place by ``surgery.export``;
            None = the mixer itself.
    """

    name: str
    module_class: type[nn.Module]
    config_class: type[ReplacementConfig]
    description: str
    pruner: Any = None
    serves: tuple[str, ...] = ("self",)
    training_form: BatchedTraining | None = None
    inference_form: Callable[..., nn.Module] | None = None
    folded_form: Callable[[nn.Module, nn.Module], nn.Module | None] | None = None
    decoding: DecodingForm | None = None
    init_from_teacher: Callable[[nn.Module, TeacherEvidence], Any] | None = None
    resize: Callable[[nn.Module, dict], None] | None = None
    flop_handles: dict[str, Callable] = dataclasses.field(default_factory=dict)
    export_form: Callable[[nn.Module], nn.Module] | None = None

    def build(self, shape: MixerShape, config: ReplacementConfig | dict | None = None) -> nn.Module:
        if not isinstance(config, ReplacementConfig):
            config = self.config_class.from_dict(config)
        return self.module_class(shape, config)

    def make_pruner(self) -> Any:
        """An instance of the registered pruner, or None when the replacement is unprunable."""
        if self.pruner is None:
            return None
        return self.pruner() if isinstance(self.pruner, type) else self.pruner


#: optional hooks ``register_replacement`` accepts by keyword
_HOOKS = {f.name for f in dataclasses.fields(Replacement)} - {"name", "module_class", "config_class",
                                                              "description", "pruner", "serves"}

#: entry-point group of installed packages that register replacements, e.g. in pyproject.toml:
#: ``[project.entry-points."surgery.replacements"]`` ``my_mixers = "my_package.mixers"``
ENTRY_POINT_GROUP = "surgery.replacements"

_REGISTRY: dict[str, Replacement] = {}
_BUILTINS_LOADED = False
_LOADED_ENTRY_POINTS: set[str] = set()


#: modules that register the built-in replacements (mhlstm, gru, conv). They import this module;
#: the registry loads them by name, as it loads plugins, so the dependency runs one way only.
BUILTIN_MODULES = ("surgery.replacements",)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def _load_entry_points() -> None:
    """Import every installed ``surgery.replacements`` entry point not imported yet (each once).

    Called only when a name is not registered (or to list every name), so a broken plugin never
    gets in the way of the built-ins; its failure is one ``SurgeryError`` naming it.
    """
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"{entry.name}={entry.value}"
        if key in _LOADED_ENTRY_POINTS:
            continue
        try:
            entry.load()
        except Exception as error:  # noqa: BLE001 - any failure of third-party code at import
            raise SurgeryError(
                f"replacement plugin {entry.name!r} ({entry.value}, entry point group "
                f"{ENTRY_POINT_GROUP!r}) failed to load: {_one_line(error)}"
            ) from error
        _LOADED_ENTRY_POINTS.add(key)


def load_plugin(module: str) -> None:
    """Import ``module`` so the replacements it registers (``register_replacement``) can be used.

    The module is looked up as ``python -m`` would: the working directory first, then
    ``sys.path``. This is what ``--plugin MODULE`` does on the command line; installed packages
    can instead declare an entry point in the group ``surgery.replacements`` (found on demand).

    Args:
        module: a dotted module name, e.g. ``my_mixers`` for ``./my_mixers.py``.

    Example:
        >>> load_plugin("replacements.conv")
        >>> "conv" in list_replacements()
        True
    """
    from surgery.models import import_user_module

    try:
        import_user_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of the plugin's own code
        raise SurgeryError(f"replacement plugin {module!r} failed to load: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def register_replacement(
    name: str,
    *,
    config: type[ReplacementConfig] = ReplacementConfig,
    description: str | None = None,
    pruner: Any = None,
    serves: tuple[str, ...] = ("self",),
    **hooks: Any,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a replacement module class under ``name`` (use as a class decorator).

    The class is built as ``cls(shape: MixerShape, config)`` and maps ``x [B, N, shape.input_dim]``
    (plus an optional ``padding_mask [B, N]``, True = real token; all True when nothing is padded,
    which must give exactly what ``None`` gives) to ``[B, N, shape.output_dim]``.

    Args:
        name: the name used by ``replace_attention`` and ``surgery replace --with``.
        config: the replacement's config dataclass (a ``ReplacementConfig`` subclass).
        description: one line for ``surgery list``; defaults to the class docstring's first line.
        pruner: optional torch-pruning ``BasePruningFunc`` subclass that prunes this module.
        serves: the site kinds it can take the place of (``surgery.sites.SITE_KINDS``); an N-to-N
            sequence mixer serves "self" only.
        **hooks: the record's optional hooks (``training_form``, ``inference_form``, ``decoding``,
            ``init_from_teacher``, ``resize``, ``flop_handles``, ``export_form``; see
            ``Replacement``). Unknown names are refused.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from surgery import register_replacement
        >>> @register_replacement("mean_mixer_doc")
        ... class MeanMixer(nn.Module):
        ...     '''Running mean over the sequence.'''
        ...     def __init__(self, shape, config):
        ...         super().__init__()
        ...         self.proj = nn.Linear(shape.input_dim, shape.output_dim)
        ...     def forward(self, x, padding_mask=None):
        ...         return self.proj(x).cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
    """

    unknown = sorted(set(serves) - set(SITE_KINDS))
    if unknown:
        raise SurgeryError(f"replacement {name!r} serves unknown site kinds {unknown}; use {list(SITE_KINDS)}")

    unknown_hooks = sorted(set(hooks) - _HOOKS)
    if unknown_hooks:
        raise SurgeryError(f"register_replacement({name!r}) got unknown hook(s) {unknown_hooks}; known "
                           f"hooks: {sorted(_HOOKS)}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Replacement(
            name=name,
            module_class=cls,
            config_class=config,
            description=description or (doc[0] if doc else cls.__name__),
            pruner=pruner,
            serves=tuple(serves),
            **hooks,
        )
        cls.replacement_name = name
        return cls

    return decorate


def get_replacement(name: str) -> Replacement:
    """Return the registered replacement called ``name`` (UnknownNameError with suggestions)."""
    _load_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise UnknownNameError(
            f"unknown replacement {name!r}; choose one of {sorted(_REGISTRY)}."
            + close_matches(name, _REGISTRY)
            + f" Replacements of your own: import their module first (CLI: --plugin MODULE) or "
            f"install them with an entry point in the group {ENTRY_POINT_GROUP!r}."
        )
    return _REGISTRY[name]


def list_replacements(pattern: str = "*") -> list[str]:
    """Names of the registered replacements matching an fnmatch ``pattern`` (built-in, imported
    plugins and installed ``surgery.replacements`` entry points).

    Example:
        >>> from surgery import list_replacements
        >>> {"mhlstm", "gru", "conv"} <= set(list_replacements())
        True
    """
    _load_builtins()
    _load_entry_points()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def replacement_of(module: nn.Module) -> Replacement | None:
    """The registered record whose module class ``module`` is an instance of (None if none is)."""
    _load_builtins()
    name = getattr(type(module), "replacement_name", None)
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    return spec if spec is not None and isinstance(module, spec.module_class) else None


def traced_sizes(value: Any) -> list[int] | None:
    """Sizes of a traced JIT value (what an fvcore op handle of ``flop_handles`` receives), or None
    when the tracer did not record them."""
    try:
        if value.isCompleteTensor():
            return list(value.type().sizes())
    except RuntimeError:
        pass
    return None


def registered_flop_handles() -> dict[str, Callable]:
    """fvcore op handles declared by every registered replacement (``flop_handles`` hooks)."""
    _load_builtins()
    handles: dict[str, Callable] = {}
    for spec in _REGISTRY.values():
        handles.update(spec.flop_handles)
    return handles


_REFERENCE_FORMS: contextvars.ContextVar[bool] = contextvars.ContextVar("surgery_reference_forms",
                                                                         default=False)


@contextlib.contextmanager
def reference_forms(enabled: bool = True) -> Iterator[None]:
    """Within this context, replacements run their reference form (the plain per-part modules),
    neither the batched training form nor the inference form; the three compute the same function.

    Example:
        >>> with reference_forms():
        ...     using_reference_forms()
        True
    """
    token = _REFERENCE_FORMS.set(enabled)
    try:
        yield
    finally:
        _REFERENCE_FORMS.reset(token)


def using_reference_forms() -> bool:
    """Whether a ``reference_forms`` context is active (asked by replacement modules' forward)."""
    return _REFERENCE_FORMS.get()


is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6


def tracing() -> bool:
    """True under a tracer or compiler (JIT trace for FLOP counting, torch.export, dynamo): packed
    and native inference forms step aside there, so the tracer records the reference form.

    Example:
        >>> tracing()
        False
    """
    return bool(torch.jit.is_tracing() or is_exporting() or torch.compiler.is_compiling())
