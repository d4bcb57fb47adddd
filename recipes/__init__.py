"""Named, reproducible pipelines: a config dataclass (the settings) plus a run function.

Recipes are registered by name, so the CLI (``surgery recipe <name>``) and the docs are generated
from the registry. Built-ins: ``deit`` (FAR's recipe for DeiT-T/S/B on ImageNet-style folders),
``mnist`` (a DeiT-style ViT on the real bundled MNIST digits), ``minilm`` (the real
all-MiniLM-L6-v2 sentence encoder) and ``causal-lm`` (a pretrained causal LM, the real
SmolLM2-135M-Instruct by default).

Example:
    >>> import recipes
    >>> [r.name for r in recipes.list_recipes()]
    ['causal-lm', 'deit', 'minilm', 'mnist']
"""

from __future__ import annotations

if __name__ != "surgery.recipes":  # the old top-level name, from a source checkout: the same modules
    from surgery._compat import alias_package

    alias_package(__name__, "surgery.recipes")

import dataclasses
import fnmatch
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from surgery.errors import SurgeryError, UnknownNameError, close_matches


@dataclass(frozen=True)
class Recipe:
    """A named pipeline: ``run(config, out_dir, log=print) -> dict`` (the report, also written as JSON).

    Attributes:
        name: registry name (``surgery recipe <name>``).
        description: one paragraph shown by ``surgery recipe list`` and ``--help``.
        config_class: the settings dataclass; its field docs come from ``config_class.HELP``.
        run: the pipeline function.
    """

    name: str
    description: str
    config_class: type
    run: Callable[..., dict]

    def settings(self) -> list[tuple[str, Any, str]]:
        """``(name, default, help)`` for every setting of the recipe's config."""
        helps = getattr(self.config_class, "HELP", {})
        rows = []
        for f in dataclasses.fields(self.config_class):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            rows.append((f.name, default, helps.get(f.name, "")))
        return rows

    def make_config(self, **settings: Any) -> Any:
        """Build the config from keyword settings; unknown names or wrong types are one-line errors.

        Example:
            >>> get_recipe("mnist").make_config(replacements="mhlstm").replacements
            'mhlstm'
        """
        return make_config(self.config_class, settings, self.name)


_RECIPES: dict[str, Recipe] = {}
_BUILTINS = tuple(f"{__name__}.{name}" for name in ("deit", "mnist", "minilm", "causal_lm"))


def register_recipe(name: str, description: str, config_class: type, run: Callable[..., dict]) -> Recipe:
    """Register a recipe under ``name`` (replacing any earlier one of that name).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Nothing:
        ...     pass
        >>> register_recipe("nothing", "does nothing", Nothing, lambda config, out, log=print: {}).name
        'nothing'
        >>> _ = _RECIPES.pop("nothing")
    """
    recipe = Recipe(name, description, config_class, run)
    _RECIPES[name] = recipe
    return recipe


def _load_builtins() -> None:
    for module in _BUILTINS:
        importlib.import_module(module)


def list_recipes(pattern: str = "*") -> list[Recipe]:
    """Registered recipes whose name matches the fnmatch ``pattern``, sorted by name.

    Example:
        >>> [r.name for r in list_recipes("m*")]
        ['minilm', 'mnist']
    """
    _load_builtins()
    return [_RECIPES[name] for name in sorted(_RECIPES) if fnmatch.fnmatch(name, pattern)]


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (UnknownNameError with suggestions otherwise).

    Example:
        >>> get_recipe("deit").name
        'deit'
    """
    _load_builtins()
    if name not in _RECIPES:
        raise UnknownNameError(f"unknown recipe {name!r}; known: {', '.join(sorted(_RECIPES))}."
                               + close_matches(name, _RECIPES))
    return _RECIPES[name]


def replacement_names(value: str) -> list[str]:
    """A comma-separated list of registered replacement names, checked (one-line error otherwise).

    Example:
        >>> replacement_names("mhlstm, conv")
        ['mhlstm', 'conv']
    """
    from surgery.registry import list_replacements

    names = [r.strip() for r in value.split(",") if r.strip()]
    known = list_replacements()
    bad = [r for r in names if r not in known]
    if bad or not names:
        raise SurgeryError(f"unknown replacement(s) {bad or value!r}; known: {', '.join(known)}")
    return names


def replacement_settings(value: str, replacements: list[str]) -> dict[str, dict[str, Any]]:
    """A recipe's ``replacement_settings`` text as each replacement's settings, checked up front.

    ``KEY=VALUE`` pairs separated by commas; ``KEY=VALUE`` applies to every listed replacement,
    ``NAME.KEY=VALUE`` to replacement ``NAME`` only. Values are read as JSON where they can be
    (``8``, ``0.5``, ``true``), else kept as text. Every key is checked against the replacement's
    config (``ReplacementConfig.from_dict``): a typo is a one-line error before any work.

    Example:
        >>> replacement_settings("linear.window=8, feature_dim=16", ["linear"])
        {'linear': {'window': 8, 'feature_dim': 16}}
        >>> replacement_settings("", ["mhlstm", "gru"])
        {'mhlstm': {}, 'gru': {}}
    """
    import json

    from surgery.registry import get_replacement

    settings: dict[str, dict[str, Any]] = {name: {} for name in replacements}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SurgeryError(f"replacement setting {item!r} must look like KEY=VALUE or NAME.KEY=VALUE "
                               "(e.g. linear.window=8)")
        name, dot, key = key.rpartition(".")
        if dot and name not in settings:
            raise SurgeryError(f"replacement setting {item!r} names {name!r}, which this run does not use "
                               f"(replacements: {', '.join(replacements)})")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw.strip()
        for target in ([name] if dot else replacements):
            settings[target][key] = parsed
    for name, values in settings.items():
        config_class = get_replacement(name).config_class
        try:
            config_class.from_dict(values)
        except (SurgeryError, TypeError, ValueError) as error:
            raise SurgeryError(f"replacement_settings for {name}: {error}") from None
    return settings


def claim_settings(path: Path, settings: dict) -> None:
    """Record a replacement's settings in its run folder; a rerun with other settings is refused
    (its phases would resume or reload a student built with the first ones).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> claim_settings(folder, {"window": 8}); claim_settings(folder, {"window": 8})
        >>> claim_settings(folder, {"window": 16})
        Traceback (most recent call last):
        ...
        surgery.errors.SurgeryError: ... was started with replacement settings {'window': 8}, now {'window': 16}; give another --out
    """
    import json

    from surgery.checkpoint import LOCK, atomic_write

    record = path / "replacement_settings.json"
    if record.is_file():
        stored = json.loads(record.read_text())
        if stored != settings:
            raise SurgeryError(f"{path} was started with replacement settings {stored}, now {settings}; "
                               "give another --out")
        return
    started = path.is_dir() and any(p.name not in ("recipe.json", LOCK) and not p.name.startswith(".")
                                    for p in path.iterdir())
    if started and settings:
        raise SurgeryError(f"{path} was started with the replacement's default settings, now {settings}; "
                           "give another --out")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda f: f.write(json.dumps(settings, sort_keys=True).encode()))


def make_config(config_class: type, settings: dict[str, Any], recipe: str = "") -> Any:
    """Instantiate ``config_class`` from ``settings``, checking names and coercing simple types.

    Example:
        >>> from recipes.mnist import MnistConfig
        >>> make_config(MnistConfig, {"seed": "3"}).seed
        3
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise SurgeryError(f"unknown setting(s) {', '.join(unknown)} for recipe {recipe or config_class.__name__}; "
                           f"known: {', '.join(fields)}." + close_matches(unknown[0], fields))
    values = {}
    for key, value in settings.items():
        default = fields[key].default
        values[key] = _coerce(key, value, fields[key].type, None if default is dataclasses.MISSING else default)
    try:
        config = config_class(**values)
    except (TypeError, ValueError) as error:
        raise SurgeryError(f"bad settings for recipe {recipe}: {error}") from None
    check = getattr(config, "check", None)
    if callable(check):
        check()
    return config


def _coerce(key: str, value: Any, annotation: Any, default: Any) -> Any:
    """Strings from the command line to the type of the field's default (int, float, bool)."""
    if not isinstance(value, str):
        return value
    text = str(annotation)
    kind = type(default) if default is not None else None
    try:
        if kind is bool or text == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int or text in ("int", "Optional[int]"):
            return None if value.lower() == "none" else int(value)
        if kind is float or text in ("float", "Optional[float]"):
            return None if value.lower() == "none" else float(value)
    except ValueError:
        raise SurgeryError(f"setting {key}={value!r} is not a valid {text}") from None
    return value
