"""Registry of sequence-mixing replacements for attention, keyed by name ("mhlstm", "gru", "conv")."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from surgery.errors import SurgeryError, UnknownNameError, close_matches


@dataclass(frozen=True)
class MixerShape:
    """What a replacement must serve at one site: [B, N, input_dim] -> [B, N, output_dim].

    Args:
        input_dim: width of the hidden states entering the attention site.
        output_dim: width of the attention output before the output projection (heads * head_dim).
        num_heads: number of attention heads at the site.
        causal: when True, position t of the output may depend on positions <= t only.

    Example:
        >>> MixerShape(input_dim=192, output_dim=192, num_heads=3, causal=False).head_dim
        64
    """

    input_dim: int
    output_dim: int
    num_heads: int
    causal: bool = False

    @property
    def head_dim(self) -> int:
        return self.output_dim // self.num_heads


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
class Replacement:
    """One registered replacement: how to build it and (optionally) how torch-pruning prunes it."""

    name: str
    module_class: type[nn.Module]
    config_class: type[ReplacementConfig]
    description: str
    pruner: Any = None  # a torch_pruning BasePruningFunc subclass, or None when unprunable

    def build(self, shape: MixerShape, config: ReplacementConfig | dict | None = None) -> nn.Module:
        if not isinstance(config, ReplacementConfig):
            config = self.config_class.from_dict(config)
        return self.module_class(shape, config)


#: entry-point group of installed packages that register replacements, e.g. in pyproject.toml:
#: ``[project.entry-points."surgery.replacements"]`` ``my_mixers = "my_package.mixers"``
ENTRY_POINT_GROUP = "surgery.replacements"

_REGISTRY: dict[str, Replacement] = {}
_BUILTINS_LOADED = False
_LOADED_ENTRY_POINTS: set[str] = set()


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import replacements  # noqa: F401  (registers mhlstm, gru, conv)


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

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Replacement(
            name=name,
            module_class=cls,
            config_class=config,
            description=description or (doc[0] if doc else cls.__name__),
            pruner=pruner,
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
