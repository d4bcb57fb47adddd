"""Fast inference, kept for code written against earlier versions: nobody needs to call anything.

A replacement in eval mode without gradients (``torch.inference_mode()`` / ``torch.no_grad()``)
runs its inference form by itself: ``mhlstm``/``gru`` pack their weights once (kept until a weight
changes) and run every head's and direction's recurrence in one native call; ``conv`` pads inside
its convolutions. Training runs the batched training form; every form computes the same function,
so ``surgery.save`` / ``surgery.load`` work at any time and a loaded model is fast in eval mode.

``optimize(model)`` now only puts the model in eval mode, packs the inference forms ahead of the
first call (and pins the native kernel on or off), optionally pads pruned MLP widths, and is where
the opt-in float16 recurrent weights are chosen (``recurrent_weights="float16"``). The
inference-form classes stay importable from here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.registry import get_replacement, reference_forms
from surgery.replacements.conv import FastTokenConvolution
from surgery.replacements.native import kernel_status
from surgery.replacements.recurrence import (  # noqa: F401
    RECURRENT_WEIGHTS,
    FastMultiHeadRecurrent,
    _recurrence_torch,
    check_recurrent_weights,
)

__all__ = ["FastMultiHeadRecurrent", "FastTokenConvolution", "ReferenceForms", "kernel_status", "optimize"]


class ReferenceForms(nn.Module):
    """``model`` run inside ``surgery.registry.reference_forms()``: every replacement in its reference
    form (``mhlstm``/``gru``: each head's own ``nn.LSTM``/``nn.GRU``), e.g. to time what the
    inference form saves (``surgery bench --no-fast``). Same outputs as ``model``.

    Example:
        >>> wrapped = ReferenceForms(nn.Linear(2, 2))
        >>> wrapped(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with reference_forms():
            return self.model(*args, **kwargs)


def _pad_hidden_linears(model: nn.Module, multiple: int = 8) -> int:
    """Pad pruned MLP hidden widths (``fc1`` -> activation -> ``fc2``, timm's ``Mlp``) to a multiple
    of ``multiple`` with zero rows in fc1 and zero columns in fc2; returns how many were padded.

    Exact: whatever the activation makes of the padded channels, fc2 multiplies it by zero. Odd
    widths left by pruning are slow in MKL: fc1 192 -> 379 took 0.53 ms against 0.35 ms for
    192 -> 384 (197 tokens, 1 thread); on a whole pruned DeiT-T the gain was within noise.
    """
    padded = 0
    for module in model.modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            continue
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            continue  # a norm over the hidden channels would see the padding
        width = fc1.out_features
        if fc2.in_features != width or width % multiple == 0:
            continue
        extra = multiple - width % multiple
        with torch.no_grad():
            grown1 = nn.Linear(fc1.in_features, width + extra, bias=fc1.bias is not None).to(fc1.weight)
            grown1.weight.zero_()
            grown1.weight[:width] = fc1.weight
            if fc1.bias is not None:
                grown1.bias.zero_()
                grown1.bias[:width] = fc1.bias
            grown2 = nn.Linear(width + extra, fc2.out_features, bias=fc2.bias is not None).to(fc2.weight)
            grown2.weight.zero_()
            grown2.weight[:, :width] = fc2.weight
            if fc2.bias is not None:
                grown2.bias.copy_(fc2.bias)
        module.fc1, module.fc2 = grown1.requires_grad_(False), grown2.requires_grad_(False)
        padded += 1
    return padded


def _takes_recurrent_weights(hook: Any) -> bool:
    """Whether an ``inference_form`` hook names a ``recurrent_weights`` parameter (``mhlstm``/``gru``
    do; ``conv``/``linear`` hold no recurrent weights and do not)."""
    try:
        return "recurrent_weights" in inspect.signature(hook).parameters
    except (TypeError, ValueError):
        return False


def optimize(model: nn.Module, *, use_kernel: bool | None = None, fold_projection: bool = True,
             pad_mlp: bool = False, recurrent_weights: str = "float32") -> nn.Module:
    """Compatibility call: eval mode, the inference forms packed now rather than on the first call.

    The model keeps its structure (so it saves and loads as before); its replacements run their
    inference forms in eval mode without gradients whether or not this was called.

    Args:
        model: a model with replaced attention.
        use_kernel: pin the native kernel on (True) or off (False, the PyTorch loop); None = the
            kernel when it compiles.
        fold_projection: accepted for compatibility. Earlier versions multiplied the reused output
            projection into the mixer, which changed the saved keys (such a model could not be
            loaded again); the structure is no longer changed.
        pad_mlp: pad MLP hidden widths left odd by pruning to a multiple of 8 (exact zeros; the
            padded model saves and loads like any pruned one).
        recurrent_weights: precision of the recurrent weights W_hh of every ``mhlstm``/``gru``
            inference form and decode step: ``"float32"`` (exact, the default; calling again with it
            undoes ``"float16"``) or ``"float16"`` (opt-in: W_hh rounded to float16, half the bytes
            the kernel streams per step; inputs, states and gates stay float32; its fidelity cost
            is measured in docs/choosing-a-replacement.md). Kept on each mixer until changed, not
            saved: a loaded model starts at float32. Replacements without recurrent weights
            (``conv``, ``linear``) are unaffected; ``"float16"`` on a model that has none of them,
            or whose recurrent mixers have no inference form (not CPU float32), is refused.

    Returns:
        The same model object, in eval mode.

    Example:
        >>> import timm, surgery
        >>> from surgery.fast import optimize
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "mhlstm")
        >>> _ = optimize(surgery.finalize(model))
    """
    from surgery.swap import replaced_sites

    check_recurrent_weights(recurrent_weights)
    sites = [(wrapper, get_replacement(wrapper.replacement).inference_form) for wrapper in replaced_sites(model)]
    recurrent = [(wrapper, hook) for wrapper, hook in sites if hook is not None and _takes_recurrent_weights(hook)]
    if recurrent_weights != "float32" and not recurrent:
        kinds = sorted({wrapper.replacement for wrapper, _ in sites}) or ["none"]
        raise SurgeryError(f"recurrent_weights={recurrent_weights!r} applies to recurrent replacements (mhlstm, "
                           f"gru); this model's replacements are {', '.join(kinds)}: drop the option")
    model.eval()
    takes, served = {id(wrapper) for wrapper, _ in recurrent}, 0
    for wrapper, hook in sites:
        if hook is None:
            continue
        if id(wrapper) in takes:
            served += hook(wrapper.mixer, use_kernel=use_kernel, recurrent_weights=recurrent_weights) is not None
        else:
            hook(wrapper.mixer, use_kernel=use_kernel)
    if recurrent_weights != "float32" and not served:
        for wrapper, hook in recurrent:  # leave no mixer holding a choice that nothing serves
            hook(wrapper.mixer, recurrent_weights="float32")
        raise SurgeryError(f"recurrent_weights={recurrent_weights!r} needs the CPU float32 inference form, which "
                           "this model's recurrent mixers do not run (on a GPU or in another dtype they run "
                           "cuDNN / nn.LSTM in the model's own precision): drop the option")
    if pad_mlp:
        _pad_hidden_linears(model)
    return model
