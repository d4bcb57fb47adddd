"""How to rebuild the base model of a saved run when the user built it in Python.

``surgery.save`` records a model spec string when the model came from ``surgery.models.load_model``
(``minilm``, a timm name, ``hf:<dir>``). A model built in Python (``timm.create_model(...)``,
``AutoModel.from_config(...)``, a torchvision constructor) carries no spec; ``describe_source``
then writes down what rebuilds it:

- HuggingFace: the model class and its whole config (stored in the manifest); rebuilt from the
  config with the class of that name from ``transformers`` itself, never ``trust_remote_code``.
- timm and torchvision: the registered architecture (timm's ``pretrained_cfg``) or the model class,
  and the constructor arguments that can be read back from the model (``num_classes``,
  ``img_size``, depth, heads, ...).

A description is only recorded after checking it: the model it rebuilds (on the meta device, no
memory) must have the same module types and the same weight names and shapes as the model being
saved (outside the replaced attention sites, and allowing the shapes that pruning changes). When
it cannot be checked, nothing is recorded and ``load`` says what to pass instead. Loading resolves
classes only inside ``transformers``, ``timm`` and ``torchvision.models``: no file can make it
import other code.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable

import torch
from torch import nn

from surgery.errors import ManifestError
from surgery.swap import replaced_sites

KIND_HF, KIND_TIMM, KIND_TORCHVISION = "hf", "timm", "torchvision"
_PACKAGES = {KIND_TIMM: "timm.", KIND_TORCHVISION: "torchvision.models."}
# modules whose weights define their shape: pruning may change it, and load resizes them
_RESIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding, nn.RNNBase)


def describe_source(model: nn.Module) -> dict[str, Any] | None:
    """A checked recipe to rebuild ``model``'s base (HF config, timm or torchvision constructor), or None.

    Args:
        model: a model built in Python, replaced or not.

    Returns:
        A JSON-serialisable description that ``rebuild_from_source`` turns back into the
        untrained base model; None when the model's family is not one surgery can describe or the
        rebuilt model would not match.

    Example:
        >>> import timm
        >>> model = timm.create_model("deit_tiny_patch16_224", num_classes=10, depth=2)
        >>> source = describe_source(model)
        >>> source["architecture"], source["kwargs"]["num_classes"], source["kwargs"]["depth"]
        ('deit_tiny_patch16_224', 10, 2)
    """
    module = type(model).__module__
    try:
        if module.startswith("transformers."):
            return _describe_hf(model)
        for kind, package in _PACKAGES.items():
            if module.startswith(package):
                source = _describe_constructor(model, kind)
                try:
                    candidate = build_source(source, device="meta")  # no memory, no initialisation cost
                except Exception:  # noqa: BLE001 - a constructor that needs real tensors
                    candidate = build_source(source)
                return None if _differences(candidate, model, with_types=True) else source
    except Exception:  # noqa: BLE001 - any failure to describe means: record nothing, load asks for model=
        return None
    return None


def source_text(source: Any) -> str:
    """A short human-readable name of a manifest source (a spec string or a description).

    Example:
        >>> source_text({"kind": "timm", "architecture": "deit_tiny_patch16_224", "class": "x.VisionTransformer"})
        'timm deit_tiny_patch16_224'
    """
    if not isinstance(source, dict):
        return str(source)
    name = source.get("architecture") or source.get("class", "?").rpartition(".")[2]
    return f"{source.get('kind')} {name}"


def rebuild_from_source(manifest: dict[str, Any]) -> nn.Module:
    """Build the untrained base model a manifest's description names (no weights loaded yet).

    Args:
        manifest: a saved run's manifest whose ``source`` is a description from ``describe_source``
            (or missing: the error then says what to pass).

    Returns:
        The base model in eval mode, checked against the saved weight shapes.

    Example:
        >>> import timm, tempfile, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224", depth=2)
        >>> path = surgery.save(model, tempfile.mkdtemp())
        >>> type(surgery.load(path)).__name__
        'VisionTransformer'
    """
    source = manifest.get("source")
    if not isinstance(source, dict):
        raise ManifestError(
            f"the manifest names no model source: the {manifest.get('model_class', 'model')} was built in "
            "Python in a way surgery cannot describe; pass load(directory, model=<a fresh base model built the "
            "same way>), or save(model, directory, source='<model spec>') (a timm name, hf:<dir>, minilm)")
    model = build_source(source)
    shapes = manifest.get("shapes") or {}
    sites = [entry["site"]["name"] for entry in manifest.get("sites", [])]
    problems = _shape_differences(model, shapes, sites)
    if problems:
        raise ManifestError(
            f"the {source_text(source)} rebuilt from the manifest does not match the saved weights "
            f"({'; '.join(problems[:2])}): its constructor arguments were not all recorded; pass "
            "load(directory, model=<the base model built as before>)")
    return model.eval()


def build_source(source: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """Construct the model a description names, with random weights (on ``device``, e.g. meta)."""
    kind = source.get("kind")
    builder: Callable[[], nn.Module]
    if kind == KIND_HF:
        builder = lambda: _build_hf(source)  # noqa: E731
    elif kind in _PACKAGES:
        builder = lambda: _build_constructor(source)  # noqa: E731
    else:
        raise ManifestError(f"the manifest's source has kind {kind!r}; expected hf, timm or torchvision")
    if device is None:
        return builder()
    with torch.device(device):
        return builder()


# --- HuggingFace ---------------------------------------------------------------------------------

def _describe_hf(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = config.to_dict()
    if data.get("auto_map"):  # a config that needs remote code cannot be rebuilt without running it
        return None
    _transformers_class(type(model).__name__)  # only classes transformers ships
    return {"kind": KIND_HF, "class": type(model).__name__, "config": json.loads(json.dumps(data, default=str)),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def _transformers_class(name: str) -> type:
    try:
        import transformers
        from transformers import PreTrainedModel
    except ModuleNotFoundError as error:
        raise ManifestError("the saved model is a HuggingFace model: pip install 'surgery[hf]'") from error
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
            and cls.__module__.startswith("transformers.models.")):
        raise ManifestError(f"the manifest names the model class {name!r}, which transformers does not ship; "
                            "pass load(directory, model=<base model>)")
    return cls


def _build_hf(source: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    data = dict(source["config"])
    model_type = data.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **data)  # built-in config classes only: no remote code
    except (ValueError, KeyError) as error:
        raise ManifestError(f"the manifest's HuggingFace config has model_type {model_type!r}, which this "
                            f"transformers does not know ({str(error).splitlines()[0][:80]}); upgrade "
                            "transformers or pass load(directory, model=<base model>)") from None
    if source.get("attn_implementation"):
        config._attn_implementation = source["attn_implementation"]
    return _transformers_class(source["class"])(config)


# --- timm and torchvision ------------------------------------------------------------------------

def _simple(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value)


def _vit_timm(model: nn.Module) -> dict[str, Any]:
    patch = model.patch_embed
    block = model.blocks[0]
    return {"img_size": list(patch.img_size) if patch.img_size is not None else None,
            "patch_size": list(patch.patch_size), "in_chans": patch.proj.in_channels,
            "depth": len(model.blocks), "num_heads": block.attn.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
            "class_token": model.cls_token is not None, "reg_tokens": model.num_reg_tokens}


def _vit_torchvision(model: nn.Module) -> dict[str, Any]:
    layers = model.encoder.layers
    return {"num_layers": len(layers), "num_heads": layers[0].self_attention.num_heads}


# Constructor arguments that are not stored under their own name on the model.
_READERS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "timm.models.vision_transformer.VisionTransformer": _vit_timm,
    "torchvision.models.vision_transformer.VisionTransformer": _vit_torchvision,
}


def _describe_constructor(model: nn.Module, kind: str) -> dict[str, Any]:
    cls = type(model)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    parameters = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "device", "dtype")]
    kwargs = {p: getattr(model, p) for p in parameters if hasattr(model, p) and _simple(getattr(model, p))}
    reader = _READERS.get(qualified)
    if reader is not None:
        kwargs.update({k: v for k, v in reader(model).items() if k in parameters})
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    architecture = None
    if kind == KIND_TIMM:
        config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        architecture = config.get("architecture")
    return {"kind": kind, "class": qualified, "architecture": architecture, "kwargs": kwargs}


def _constructor_class(source: dict[str, Any]) -> type:
    qualified = str(source.get("class", ""))
    package = _PACKAGES[source["kind"]]
    module_name, _, name = qualified.rpartition(".")
    if not module_name.startswith(package):
        raise ManifestError(f"the manifest names the class {qualified!r}, outside {package.rstrip('.')}; "
                            "pass load(directory, model=<base model>)")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ManifestError(f"this {package.rstrip('.')} has no {qualified}; install the version the run was "
                            "saved with, or pass load(directory, model=<base model>)") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ManifestError(f"{qualified} is not a model class; pass load(directory, model=<base model>)")
    return cls


def _build_constructor(source: dict[str, Any]) -> nn.Module:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in source.get("kwargs", {}).items()}
    cls = _constructor_class(source)
    try:
        if source.get("architecture"):
            import timm

            model = timm.create_model(source["architecture"], pretrained=False, **kwargs)
            if not isinstance(model, cls):
                raise ManifestError(f"timm's {source['architecture']} builds a {type(model).__name__}, not the "
                                    f"saved {cls.__name__}; pass load(directory, model=<base model>)")
            return model
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ManifestError(f"cannot rebuild {source_text(source)} from the manifest "
                            f"({str(error).splitlines()[0][:100]}); pass load(directory, model=<base model>)"
                            ) from None


# --- checking a rebuilt model against the saved one ------------------------------------------------

def _outside(name: str, sites: list[str]) -> bool:
    return not any(name == s or name.startswith(f"{s}.") for s in sites)


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    name = key.rpartition(".")[0]
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _shared_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter or buffer name, the other names of the same tensor (tied weights, e.g. an
    LM head sharing the input embedding): ``save`` writes such a tensor once, under its first name."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return {name: [other for other in group if other != name] for group in groups.values() if len(group) > 1
            for name in group}


def _shape_differences(candidate: nn.Module, shapes: dict[str, list[int]], sites: list[str]) -> list[str]:
    """Weights of ``candidate`` (outside the sites) that the saved ``shapes`` lack or hold in another
    shape that load cannot resize to, and saved weights outside the sites that ``candidate`` lacks."""
    problems = []
    state = {k: tuple(v.shape) for k, v in candidate.state_dict().items() if _outside(k, sites)}
    names = _shared_names(candidate)
    for key, shape in state.items():
        saved = shapes.get(key)
        if saved is None and any(other in shapes for other in names.get(key, ())):
            continue  # a tied weight (an LM head sharing the embedding): saved once, under its other name
        if saved is None:
            problems.append(f"{key} is not in the saved weights")
        elif tuple(saved) != shape and not isinstance(_owner(candidate, key), _RESIZABLE):
            problems.append(f"{key}: saved {list(saved)}, rebuilt {list(shape)}")
    problems += [f"{key} is saved but not rebuilt" for key in shapes if _outside(key, sites) and key not in state]
    return problems


def _differences(candidate: nn.Module, model: nn.Module, with_types: bool) -> list[str]:
    sites = [wrapper.site.name for wrapper in replaced_sites(model)]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems = _shape_differences(candidate, shapes, sites)
    if with_types:
        built = dict(candidate.named_modules())
        for name, module in model.named_modules():
            if not _outside(name, sites):
                continue
            other = built.get(name)
            if type(other) is not type(module):
                problems.append(f"{name or 'the model'} is a {type(module).__name__}, rebuilt "
                                f"{type(other).__name__ if other is not None else 'nothing'}")
            elif getattr(module, "eps", None) != getattr(other, "eps", None) or \
                    getattr(module, "approximate", None) != getattr(other, "approximate", None):
                problems.append(f"{name} has other settings than the rebuilt one")
    return problems
