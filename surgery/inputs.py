"""Normalising example inputs (tensor, tuple of args, or dict of kwargs) and default ones per model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def as_args_kwargs(example_inputs: Any) -> Inputs:
    """Turn a tensor, a tuple/list of positional args, a dict of kwargs, or an (args, kwargs) pair
    into ``(args, kwargs)``."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise SurgeryError(
        f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
        f"not {type(example_inputs).__name__}"
    )


def without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ask HF decoders not to build a KV cache while we trace or probe (caches are not tensors)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def _decoder_inputs(config: Any, batch: int, length: int, generator: torch.Generator,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Decoder inputs of an encoder-decoder (T5, BART, ...): the start token, then random ids.

    Shorter than the encoder's, so cross-attention (decoder queries, encoder keys) shows as such.
    """
    vocab = getattr(config, "vocab_size")
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None) or 0
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[:, 0] = int(start)
    return {"decoder_input_ids": ids.to(device),
            "decoder_attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}


def default_example_inputs(model: nn.Module, batch: int = 1, seq_len: int = 16) -> Inputs:
    """Example inputs for timm models, HF models (encoder-decoders get decoder inputs too) and
    ``nn.TransformerEncoder``, or from the model's own ``example_inputs()`` method; error otherwise.

    Example:
        >>> import timm
        >>> args, kwargs = default_example_inputs(timm.create_model("deit_tiny_patch16_224"))
        >>> tuple(args[0].shape)
        (1, 3, 224, 224)
    """
    own = getattr(model, "example_inputs", None)
    if callable(own):  # a user model may say what it accepts (also used for py:<module>:<factory>)
        return as_args_kwargs(own())
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        size = tuple(cfg["input_size"])
        if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "img_size"):
            size = (size[0], *model.patch_embed.img_size)
        return (torch.randn(batch, *size, generator=generator).to(device),), {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        if getattr(config, "vocab_size", None):
            ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
            inputs = {"input_ids": ids.to(device),
                      "attention_mask": torch.ones(batch, seq_len, dtype=torch.long, device=device)}
            if getattr(config, "is_encoder_decoder", False):
                inputs.update(_decoder_inputs(config, batch, max(2, seq_len // 2), generator, device))
            return (), inputs
        if getattr(config, "image_size", None):
            size = config.image_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            channels = getattr(config, "num_channels", 3)
            return (), {"pixel_values": torch.randn(batch, channels, *size, generator=generator).to(device)}
    layer = None
    if isinstance(model, nn.TransformerEncoder):
        layer = model.layers[0]
    elif isinstance(model, nn.TransformerEncoderLayer):
        layer = model
    if layer is not None:
        dim = layer.self_attn.embed_dim
        shape = (batch, seq_len, dim) if layer.self_attn.batch_first else (seq_len, batch, dim)
        return (torch.randn(*shape, generator=generator).to(device),), {}
    raise SurgeryError(
        f"cannot guess example inputs for {type(model).__name__}; pass example_inputs=... (a tensor, "
        "a tuple of arguments or a dict of keyword arguments) or give the model an example_inputs() method"
    )


def load_example_inputs(path: str | Path) -> Inputs:
    """Example inputs from a file of tensors, for models with several inputs (CLI ``--inputs``).

    A ``.safetensors`` file, or a ``torch.save`` file read with ``weights_only=True`` (no code runs)
    holding a tensor, a list/tuple of tensors or a dict of tensors. Dict keys are the forward's
    keyword arguments, except keys "0", "1", ... which are positional arguments in that order.

    Args:
        path: the file.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> file = tempfile.mkdtemp() + "/inputs.safetensors"
        >>> save_file({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, file)
        >>> args, kwargs = load_example_inputs(file)
        >>> args, list(kwargs)
        ((), ['input_ids'])
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"--inputs file {str(path)!r} does not exist; give a .safetensors or torch.save file of tensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line
        first = str(error).strip().splitlines()
        raise SurgeryError(
            f"cannot read example inputs from {str(path)!r} ({type(error).__name__}: "
            f"{first[0][:160] if first else ''}); give a .safetensors file or a torch.save file of tensors"
        ) from None
    if isinstance(data, dict):
        bad = sorted(k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
        if bad or not data:
            raise SurgeryError(f"example inputs in {str(path)!r} must map names to tensors (bad keys: {bad[:3]})")
        positional = sorted((k for k in data if k.isdigit()), key=int)
        if positional != [str(i) for i in range(len(positional))]:
            raise SurgeryError(f"positional inputs in {str(path)!r} must be keyed 0, 1, 2, ...; got {positional}")
        return tuple(data[k] for k in positional), {k: v for k, v in data.items() if not k.isdigit()}
    if isinstance(data, torch.Tensor):
        return (data,), {}
    if isinstance(data, (list, tuple)) and data and all(isinstance(v, torch.Tensor) for v in data):
        return tuple(data), {}
    raise SurgeryError(
        f"{str(path)!r} holds {type(data).__name__}; example inputs must be a tensor, a list of tensors "
        "or a dict of tensors"
    )
