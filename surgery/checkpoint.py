"""Save and load replaced models: safetensors weights + a JSON manifest, written atomically.

Loading never unpickles and never imports code named by the files: the manifest's replacement
names resolve only through the replacement registry, and its model source only through
``surgery.models`` (timm / HuggingFace / bundled MiniLM; ``py:`` sources need ``allow_code=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from surgery.errors import ManifestError, SurgeryError
from surgery.registry import get_replacement
from surgery.sites import AttentionSite
from surgery.sources import describe_source, rebuild_from_source
from surgery.swap import ReplacedAttention, finalize, replace_attention, replaced_sites

FORMAT = "surgery/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SOURCE_ATTRIBUTE = "surgery_source"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file through ``write(file_object)`` to a temp file, fsync, then rename over ``path``:
    a crash or a full disk leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of shared tensors (a reused out-projection is reachable
    both inside the kept original and on the wrapper)."""
    state, seen = {}, {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ident = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state


def save(model: nn.Module, directory: str | os.PathLike, *, source: str | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (replaced, distilled or pruned) to ``directory``: weights + manifest.

    Args:
        model: the model to save.
        directory: created if needed; existing files are replaced atomically.
        source: model spec to rebuild the base model on load (defaults to the spec the model was
            loaded from by ``surgery.models.load_model``, if any).
        extra: JSON-serialisable metadata stored in the manifest.

    Example:
        >>> import timm, tempfile, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "conv")
        >>> path = surgery.save(model, tempfile.mkdtemp(), source="deit_tiny_patch16_224")
        >>> sorted(p.name for p in path.iterdir())
        ['manifest.json', 'model.safetensors']
    """
    from safetensors.torch import save

    directory = Path(directory)
    state = _unique_state(model)
    atomic_write(directory / WEIGHTS, lambda f: f.write(save(state)))
    manifest = {
        "format": FORMAT,
        # a model built in Python has no spec: record a checked description of its constructor
        "source": source or getattr(model, SOURCE_ATTRIBUTE, None) or describe_source(model),
        "model_class": type(model).__name__,
        "sites": [
            {"site": w.site.to_dict(), "replacement": w.replacement, "config": w.config.to_dict(),
             "finalized": w.finalized}
            for w in replaced_sites(model)
        ],
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "module_attributes": {},  # read on load (run directories of earlier versions); nothing sets it now
        "weights": {"file": WEIGHTS, "sha256": _sha256(directory / WEIGHTS)},
        "extra": extra or {},
    }
    atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved model directory (ManifestError when missing or damaged)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}; is it a directory written by surgery.save?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); the file is damaged") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, allow_code: bool = False,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by ``save``: rebuild the structure, then load the weights strictly.

    Args:
        directory: a directory written by ``save``.
        model: the base (unreplaced) model to rebuild on; None rebuilds it from the manifest's source.
        allow_code: permit a ``py:<module>:<factory>`` source to be imported and called.
        map_location: device for the loaded weights.

    Example:
        >>> import timm, tempfile, torch, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "conv")
        >>> path = surgery.save(model, tempfile.mkdtemp(), source="deit_tiny_patch16_224")
        >>> again = surgery.load(path)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> bool(torch.equal(model.eval()(x), again(x)))
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]["file"]
    if not weights.is_file():
        raise ManifestError(f"{weights} is missing; the saved model is incomplete")
    if _sha256(weights) != manifest["weights"]["sha256"]:
        raise ManifestError(f"{weights} does not match its checksum in the manifest: it was changed "
                            "or truncated; save the model again")
    if model is None:
        model = _build_source(manifest, allow_code)
    _rebuild(model, manifest)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ManifestError(f"cannot read {weights}: {error}") from None
    _fit_shapes(model, state)
    _set_module_attributes(model, manifest.get("module_attributes", {}))
    current = model.state_dict()
    missing = [k for k in current if k not in state and not _is_alias(model, k, state)]
    unexpected = [k for k in state if k not in current]
    if missing or unexpected:
        raise ManifestError(
            f"weights in {directory} do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "was it saved from another model?"
        )
    mismatched = [k for k in state if tuple(state[k].shape) != tuple(current[k].shape)]
    if mismatched:
        raise ManifestError(f"weights in {directory} have other shapes than the model: {mismatched[:3]}")
    model.load_state_dict(state, strict=False)
    if source := manifest.get("source"):
        setattr(model, SOURCE_ATTRIBUTE, source)
    return model.eval()


def _is_alias(model: nn.Module, key: str, state: dict) -> bool:
    """A key absent from the file because it names a tensor saved under another (shared) name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    tensor = params.get(key)
    if tensor is None:
        return False
    return any(other is tensor and k in state for k, other in params.items() if k != key)


def _build_source(manifest: dict, allow_code: bool) -> nn.Module:
    from surgery.models import load_model, parse_model_spec

    source = manifest.get("source")
    if not isinstance(source, str) or not source:
        return rebuild_from_source(manifest)  # a description (HF config, timm/torchvision constructor) or none
    spec = parse_model_spec(source)
    if spec.kind == "py" and not allow_code:
        raise ManifestError(f"the manifest's source {source!r} would import and run code; pass "
                            "allow_code=True (CLI: --allow-code) if you trust it, or pass model=")
    model = load_model(spec, random_init=True)
    setattr(model, SOURCE_ATTRIBUTE, source)
    return model


def _rebuild(model: nn.Module, manifest: dict) -> None:
    modules = dict(model.named_modules())
    groups: dict[tuple[str, str], list[AttentionSite]] = {}
    for entry in manifest["sites"]:
        site = AttentionSite.from_dict(entry["site"])
        module = modules.get(site.name)
        if module is None or type(module).__name__ != site.module_type:
            found = type(module).__name__ if module is not None else "nothing"
            raise ManifestError(
                f"the manifest does not match the model: site {site.name!r} should be a "
                f"{site.module_type}, found {found}; pass the base model it was saved from"
            )
        get_replacement(entry["replacement"])
        key = (entry["replacement"], json.dumps(entry["config"], sort_keys=True))
        groups.setdefault(key, []).append(site)
    for (name, config), sites in groups.items():
        replace_attention(model, name, config=json.loads(config), sites=sites)
    finalized = {e["site"]["name"] for e in manifest["sites"] if e["finalized"]}
    for wrapper in replaced_sites(model):
        if wrapper.site.name in finalized:
            wrapper.original = None


# ------------------------------------------------------------------------------- pruned shapes
def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every module whose saved tensors have other shapes (a pruned model) those shapes.

    A replaced site's mixer is rebuilt by its replacement's own ``resize`` hook (the registry), which
    knows how its parts follow their weights; everything else is a plain layer resized by type
    (``_LAYER_RESIZERS``). Weights are loaded afterwards.
    """
    from surgery.swap import replaced_sites

    owned: set[str] = set()
    for wrapper in replaced_sites(model):
        hook = get_replacement(wrapper.replacement).resize
        if hook is None:
            continue
        name = _module_name(model, wrapper.mixer)
        prefix = f"{name}."
        saved = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        current = {k: tuple(v.shape) for k, v in wrapper.mixer.state_dict().items()}
        if saved and saved != current:
            hook(wrapper.mixer, saved)
        owned.add(name)
    for name, module in list(model.named_modules()):
        if any(name == o or name.startswith(f"{o}.") for o in owned):
            continue
        prefix = f"{name}." if name else ""
        shapes = {k[len(prefix):]: tuple(v.shape) for k, v in state.items()
                  if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not shapes:
            continue
        current = {k: tuple(v.shape) for k, v in list(module.named_parameters(recurse=False))
                   + list(module.named_buffers(recurse=False)) if v is not None}
        if all(current.get(k) == s for k, s in shapes.items()):
            continue
        _resize(module, shapes, name)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _resize_linear(module: nn.Linear, shapes: dict) -> None:
    module.out_features, module.in_features = shapes["weight"]


def _resize_recurrent(module: nn.RNNBase, shapes: dict) -> None:
    module.hidden_size = shapes["weight_hh_l0"][1]
    module.input_size = shapes["weight_ih_l0"][1]
    if "weight_hr_l0" in shapes:
        module.proj_size = shapes["weight_hr_l0"][0]


def _resize_convolution(module: nn.Module, shapes: dict) -> None:
    module.out_channels = shapes["weight"][0]
    module.in_channels = shapes["weight"][1] * module.groups
    if module.groups > 1:
        module.groups = module.out_channels
        module.in_channels = module.out_channels * shapes["weight"][1]


def _resize_layer_norm(module: nn.LayerNorm, shapes: dict) -> None:
    module.normalized_shape = tuple(shapes["weight"])


def _resize_embedding(module: nn.Embedding, shapes: dict) -> None:
    module.num_embeddings, module.embedding_dim = shapes["weight"]


#: plain layers whose structure follows their weights' shapes, by type (a replacement's own parts
#: are resized by its ``resize`` hook instead)
_LAYER_RESIZERS: dict[type, Callable[[nn.Module, dict], None]] = {
    nn.Linear: _resize_linear,
    nn.RNNBase: _resize_recurrent,
    nn.Conv1d: _resize_convolution,
    nn.Conv2d: _resize_convolution,
    nn.LayerNorm: _resize_layer_norm,
    nn.Embedding: _resize_embedding,
}


def _resizer(module: nn.Module) -> Callable[[nn.Module, dict], None] | None:
    for kind in type(module).__mro__:
        if kind in _LAYER_RESIZERS:
            return _LAYER_RESIZERS[kind]
        if kind.__name__ == "Conv1D":  # HuggingFace GPT-2's Conv1D: weight [in, out]
            return lambda m, shapes: setattr(m, "nf", shapes["weight"][1])
    return None


def _resize(module: nn.Module, shapes: dict[str, tuple], name: str) -> None:
    resizer = _resizer(module)
    if resizer is None:
        raise ManifestError(f"module {name!r} ({type(module).__name__}) has saved shapes {shapes} "
                            "that differ from the rebuilt model and cannot be resized")
    resizer(module, shapes)
    for key, shape in shapes.items():
        tensor = getattr(module, key, None)
        if isinstance(tensor, nn.Parameter):
            setattr(module, key, nn.Parameter(torch.empty(shape, dtype=tensor.dtype, device=tensor.device),
                                              requires_grad=tensor.requires_grad))
        elif isinstance(tensor, torch.Tensor):
            module.register_buffer(key, torch.empty(shape, dtype=tensor.dtype, device=tensor.device))
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _set_module_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]]) -> None:
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ManifestError(f"the manifest sets attributes on {name!r}, which the model lacks") from None
        for key, value in values.items():
            setattr(module, key, value)


