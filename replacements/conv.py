"""Token-mixing convolution: depthwise over the sequence, then a pointwise mix; causal-padded when needed.

Everything of ``conv`` lives here: config, module (its forward pads inside the convolution in eval
mode without gradients), pruner, teacher-derived start, resize on load, inference form.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fitting import least_squares, masked_rows
from .native import load_kernel
from .recurrence import weights_token
from surgery.errors import SurgeryError
from surgery.registry import (MixerShape, ReplacementConfig, TeacherEvidence, register_replacement, tracing,
                              using_reference_forms)
from surgery.units import Bundle, ReplacementPruner, UnitSet, cut_linear, score_units, shrink


@dataclass(frozen=True)
class TokenConvolutionConfig(ReplacementConfig):
    """Hyper-parameters of ``conv``.

    Args:
        kernel_size: tokens each output position sees (odd for centred windows).
        layers: depthwise convolutions stacked (receptive field grows by kernel_size - 1 each).
    """

    kernel_size: int = 7
    layers: int = 2


class TokenConvolutionPruner(ReplacementPruner):
    """Prunes ``TokenConvolution`` for torch-pruning and the global ranking.

    Internal unit: channel c of the mixer's width: row c of ``pre_proj`` (and bias), channel c of
    every depthwise convolution (weight and bias), column c of ``out``. External channels
    (torch-pruning's view): inputs = ``pre_proj`` columns, outputs = ``out`` rows.
    """

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out.out_features

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        cut_linear(layer.out, idxs, dim=0)
        return layer

    def unit_bundles(self, layer: nn.Module, name: str) -> list[Bundle]:
        width = layer.pre_proj.out_features
        rows = torch.arange(width).unsqueeze(1)
        parts = [("pre_proj.weight", 0, rows), ("out.weight", 1, rows)]
        if layer.pre_proj.bias is not None:
            parts.append(("pre_proj.bias", 0, rows))
        for i, conv in enumerate(layer.convs):
            parts.append((f"convs.{i}.weight", 0, rows))
            if conv.bias is not None:
                parts.append((f"convs.{i}.bias", 0, rows))
        sets = [UnitSet("channels", width, parts)]

        def score(criterion):
            return [score_units(layer, s, criterion) for s in sets]

        def apply(removed):
            shrink(layer, sets, removed)
            kept = layer.pre_proj.weight.shape[0]
            layer.pre_proj.out_features = kept
            layer.out.in_features = kept
            for conv in layer.convs:
                conv.in_channels = conv.out_channels = conv.groups = kept

        return [Bundle(name, "conv", width, score, apply, modules=[layer.pre_proj, layer.out, *layer.convs],
                       set_names=["channels"], owner=layer, unit_sets=sets)]


def init_from_teacher(mixer: "TokenConvolution", evidence: TeacherEvidence) -> list[float] | None:
    """``pre_proj`` <- the value projection, zero depthwise kernels (each token passes through its
    residual path unchanged) and the least-squares output map from the token's own values to the
    teacher's context: the "decay 0" member of the recurrent start, which training then widens."""
    weight, bias = evidence.value_weight, evidence.value_bias
    if mixer.pre_proj.weight.shape != weight.shape or mixer.out.weight.shape[0] != weight.shape[0]:
        return None  # pruned or resized: the value projection no longer fits
    mixer.pre_proj.weight.copy_(weight)
    mixer.pre_proj.bias.copy_(bias if bias is not None else torch.zeros_like(mixer.pre_proj.bias))
    for conv in mixer.convs:
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
    features = [masked_rows(mixer.pre_proj(hidden), mask) for hidden, mask, _ in evidence.records]
    goals = [masked_rows(target, mask) for _, mask, target in evidence.records]
    solution, _ = least_squares(torch.cat(features).double(), torch.cat(goals).double(), evidence.ridge)
    mixer.out.weight.copy_(solution[:-1].T.to(mixer.out.weight.dtype))
    mixer.out.bias.copy_(solution[-1].to(mixer.out.bias.dtype))
    return [0.0]


def resize(mixer: "TokenConvolution", shapes: dict[str, tuple]) -> None:
    """Rebuild the mixer at its saved (pruned) width; weights load afterwards."""
    reference = mixer.out.weight
    width, inputs = shapes["pre_proj.weight"]
    mixer.pre_proj = nn.Linear(inputs, width, bias="pre_proj.bias" in shapes).to(reference)
    kernel = mixer.config.kernel_size
    mixer.convs = nn.ModuleList(
        nn.Conv1d(width, width, kernel, groups=width, padding=0, bias=f"convs.{i}.bias" in shapes).to(reference)
        for i in range(len(mixer.convs)))
    outputs, _ = shapes["out.weight"]
    mixer.out = nn.Linear(width, outputs, bias="out.bias" in shapes).to(reference)


def inference_form(mixer: "TokenConvolution", *, use_kernel: bool | None = None) -> nn.Module:
    """The registry's ``inference_form`` hook: packs the mixer's kernels now (eval mode runs its
    inference form by itself) and returns it as a separate ``FastTokenConvolution``."""
    _packed_kernels(mixer, mixer.pre_proj.weight.new_empty(1, 1, 1))
    return FastTokenConvolution(mixer)


# mixer -> (mixer's weights token, projection's weights token, folded form); outside the module,
# as _PACKED, so copies and pickles of the mixer never carry it
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def folded_form(mixer: "TokenConvolution", projection: nn.Module) -> nn.Module | None:
    """The registry's ``folded_form`` hook: ``FastTokenConvolution(mixer, projection)``, the site's
    reused output projection multiplied into ``out`` (one [C, C] GEMM per call instead of two:
    0.1 ms of a DeiT-T block's 0.55 ms, 1 thread), rebuilt when a weight of either changes
    (``weights_token``). None where the product does not apply (not a plain Linear reading the
    mixer's output)."""
    if type(projection) is not nn.Linear or projection.in_features != mixer.out.out_features \
            or projection.weight.dtype != mixer.out.weight.dtype or projection.weight.device != mixer.out.weight.device:
        return None
    mixer_token, projection_token = weights_token(mixer), weights_token(projection)
    cached = _FOLDED.get(mixer)
    if cached is None or cached[0] is not mixer_token or cached[1] is not projection_token:
        with torch.inference_mode(False), torch.no_grad():
            cached = (mixer_token, projection_token, FastTokenConvolution(mixer, projection))
        _FOLDED[mixer] = cached
    return cached[2]


class ConvDecoding:
    """Decoding form of ``conv`` at causal sites: the state is, per depthwise convolution, its last
    ``kernel_size - 1`` inputs ``[B, width, kernel_size - 1]`` (pads already zeroed, as the sequence
    form zeroes them). Prefill and step are one computation: the window is the state followed by
    the new tokens, which is what the causal zero padding of the sequence form is for a fresh state.
    """

    def init_state(self, mixer: "TokenConvolution", batch: int) -> tuple[torch.Tensor, ...]:
        self._check(mixer)
        reference = mixer.pre_proj.weight
        return tuple(reference.new_zeros(batch, conv.in_channels, mixer.config.kernel_size - 1)
                     for conv in mixer.convs)

    def _check(self, mixer: "TokenConvolution") -> None:
        if not mixer.shape.causal:
            raise SurgeryError("a centred (non-causal) conv mixer has no decoding form (it reads later tokens); "
                               "only causal sites decode token by token")

    def prefill(self, mixer: "TokenConvolution", x: torch.Tensor, mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check(mixer)
        if state is None:
            state = self.init_state(mixer, x.shape[0])
        y = mixer.pre_proj(x).transpose(1, 2)
        keep = None if mask is None else mask.unsqueeze(1).to(y.dtype)
        kept = []
        for conv, past in zip(mixer.convs, state):
            if keep is not None:
                y = y * keep
            window = torch.cat([past.to(y.dtype), y], dim=-1)
            kept.append(window[..., window.shape[-1] - past.shape[-1]:])
            y = F.gelu(F.conv1d(window, conv.weight, conv.bias, groups=conv.groups)) + y
        return mixer.out(y.transpose(1, 2)), tuple(kept)

    def step(self, mixer: "TokenConvolution", x_t: torch.Tensor,
             state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One token ``x_t`` [B, 1, D] -> (output [B, 1, C], new state)."""
        return self.prefill(mixer, x_t, None, state)


@register_replacement("conv", config=TokenConvolutionConfig, pruner=TokenConvolutionPruner,
                      init_from_teacher=init_from_teacher, resize=resize, decoding=ConvDecoding(),
                      inference_form=lambda mixer, **_: inference_form(mixer), folded_form=folded_form)
class TokenConvolution(nn.Module):
    """Depthwise convolution over tokens plus pointwise projection; causal padding at causal sites."""

    def __init__(self, shape: MixerShape, config: TokenConvolutionConfig) -> None:
        super().__init__()
        if config.kernel_size < 1 or config.layers < 1:
            raise ValueError("conv needs kernel_size >= 1 and layers >= 1")
        self.shape = shape
        self.config = config
        width = shape.output_dim
        self.pre_proj = nn.Linear(shape.input_dim, width)
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, config.kernel_size, groups=width, padding=0)
            for _ in range(config.layers)
        )
        self.out = nn.Linear(width, width)

    def _pad(self) -> tuple[int, int]:
        k = self.config.kernel_size
        return (k - 1, 0) if self.shape.causal else ((k - 1) // 2, k // 2)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same function in the form that fits the moment: the inference form (tokens-last
        layout, oneDNN depthwise convolution with the GELU fused, packed kernels) in eval mode
        without gradients on CPU float32; the reference form (the plain modules) when training,
        under a tracer, inside ``surgery.registry.reference_forms()`` and on other devices/dtypes."""
        if not self.training and not torch.is_grad_enabled() and not using_reference_forms() and not _tracing():
            packs = _packed_kernels(self, x)
            if packs is not None:
                return _fast_forward(self.pre_proj, self.convs, self.out, self._pad(), packs, x, padding_mask)
        return self.reference_forward(x, padding_mask)

    def reference_forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reference (training) form: ``[B, C, N]`` layout, explicit zero padding, ``nn.Conv1d``."""
        return _reference_forward(self.pre_proj, self.convs, self.out, self._pad(), x, padding_mask)


def _reference_forward(pre_proj: nn.Module, convs: nn.ModuleList, out: nn.Module, pads: tuple[int, int],
                       x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    x = pre_proj(x)
    keep = None if padding_mask is None else padding_mask.unsqueeze(1).to(x.dtype)
    y = x.transpose(1, 2)
    for conv in convs:
        if keep is not None:
            y = y * keep
        y = F.gelu(conv(F.pad(y, pads))) + y
    return out(y.transpose(1, 2))


# ------------------------------------------------------------------------------- inference form
#
# Profiled at DeiT-T size (197 tokens, 192 channels, kernel 7, batch 1, 1 thread) the reference form
# spent most of its mixer time outside the matmuls: per depthwise layer a [B, C, N] conv1d (oneDNN
# reorders the transposed input and the weight at every call), an unfused erf GELU over the whole
# activation and a residual add, then a copy back to [B, N, C] for the output Linear. The inference
# form keeps the tokens-last layout throughout. Where the native kernels compile, each depthwise
# layer is one pass of replacements/csrc/token_conv.cpp: y + gelu(depthwise(y)) with the exact GELU,
# the zero padding inside (37 us against oneDNN's 60 us plus a 4-8 us add; DeiT-T conv 0.91x -> 0.80x
# attention, 1 thread). Elsewhere a [B, N, C] tensor viewed as [B, C, 1, N] is channels-last, which
# oneDNN's depthwise kernel reads directly; the weight is reordered once; the GELU runs as the
# convolution's post-op; the residual is added in place. The two stacked convolutions cannot merge (a
# GELU lies between them), and ``out`` cannot merge with ``pre_proj`` for the same reason; the site's
# reused projection is multiplied into ``out`` (``folded_form``, ``FastTokenConvolution(projection=...)``).

# "available": oneDNN's fused convolution op runs here and agrees (probed once); "native": False pins
# the native token-convolution kernel off (tests run every path)
_FUSED: dict[str, bool] = {}
_EMPTY = torch.empty(0)
# mixer -> (key, packed kernels); outside the module so deepcopy, pickling and state_dict never see
# the packed (opaque oneDNN) tensors, and a copied mixer packs its own
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


_tracing = tracing  # surgery.registry.tracing


def _pack(kernel: torch.Tensor) -> torch.Tensor:
    """A ``[C, 1, 1, k]`` depthwise kernel in oneDNN's own layout (reordered once, not per call)."""
    channels = kernel.shape[0]
    return torch.ops.mkldnn._reorder_convolution_weight(kernel, [0, 0], [1, 1], [1, 1], channels,
                                                        [1, channels, 1, 256])


def _fused(y: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(y, kernel, bias, [0, padding], [1, 1], [1, 1], y.shape[1],
                                                   "gelu", [], "none")


def _unfused(y: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return F.gelu(F.conv2d(y, kernel, bias, padding=(0, padding), groups=y.shape[1]))


def _fused_op_available() -> bool:
    """Whether oneDNN's convolution with a GELU post-op runs in this build and matches conv2d + GELU
    (probed once on a small case; builds without it, or where it disagrees, use the unfused ops)."""
    if "available" not in _FUSED:
        ok = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
            try:
                generator = torch.Generator().manual_seed(0)
                y = torch.randn(2, 11, 16, generator=generator).transpose(1, 2).unsqueeze(2)
                kernel = torch.randn(16, 1, 1, 5, generator=generator)
                bias = torch.randn(16, generator=generator)
                with torch.no_grad():
                    ok = bool(torch.allclose(_fused(y, _pack(kernel), bias, 2), _unfused(y, kernel, bias, 2),
                                             atol=1e-5, rtol=1e-5))
            except (RuntimeError, AttributeError, NotImplementedError):
                ok = False
        _FUSED["available"] = ok
    return _FUSED["available"]


def _native_kernel():
    """The native kernels' module when it has ``token_conv_gelu`` (``replacements/csrc/token_conv.cpp``:
    the depthwise convolution, its GELU and the residual in one pass), else None (no compiler, or
    ``SURGERY_FAST_KERNEL=0``; oneDNN's op runs then). ``_FUSED["native"] = False`` pins it off."""
    if _FUSED.get("native") is False:
        return None
    kernel = load_kernel()
    return kernel if kernel is not None and hasattr(kernel, "token_conv_gelu") else None


def _packed_kernels(mixer: nn.Module, x: torch.Tensor) -> tuple[str, list] | None:
    """(path, per depthwise convolution its kernel in that path's layout), cached on the mixer until
    a weight changes (an optimiser step, pruning, ``load_state_dict``: each changes a tensor's version
    or storage). Paths: ``"native"`` (the token-convolution kernel, ``[k, C]`` kernels), ``"fused"``
    (oneDNN's convolution with the GELU post-op, oneDNN-packed ``[C, 1, 1, k]``), ``"unfused"``
    (conv2d then GELU). None where the inference form does not apply (not CPU float32). Kept outside
    the module: nothing of it is saved or copied."""
    weight = mixer.convs[0].weight
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 3:
        return None
    path = "native" if _native_kernel() is not None else "fused" if _fused_op_available() else "unfused"
    key = (path, tuple((c.weight.data_ptr(), c.weight._version, tuple(c.weight.shape)) for c in mixer.convs))
    cached = _PACKED.get(mixer)
    if cached is not None and cached[0] == key:
        return cached[1]
    if path == "native":
        kernels = [conv.weight.detach()[:, 0, :].T.contiguous() for conv in mixer.convs]
    else:
        kernels = [conv.weight.detach().unsqueeze(2).contiguous() for conv in mixer.convs]
        if path == "fused":
            kernels = [_pack(k) for k in kernels]
    packs = (path, kernels)
    _PACKED[mixer] = (key, packs)
    return packs


def _fast_forward(pre_proj: nn.Module, convs: nn.ModuleList, out: nn.Module, pads: tuple[int, int],
                  packs: tuple[bool, list], x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """The mixer's function in the tokens-last layout (see the comment above)."""
    path, kernels = packs
    depthwise_gelu = _fused if path == "fused" else _unfused
    y = pre_proj(x)  # [B, N, C]
    keep = None if padding_mask is None else padding_mask.unsqueeze(-1).to(y.dtype)
    left, right = pads
    native = load_kernel() if path == "native" else None  # _packed_kernels chose "native": it has the op
    for conv, kernel in zip(convs, kernels):
        if keep is not None:
            y = y * keep
        if native is not None:  # y + gelu(depthwise(y)) in one pass, zero padding inside
            bias = _EMPTY if conv.bias is None else conv.bias.detach()
            y = native.token_conv_gelu(y.contiguous(), kernel, bias, left)
            continue
        if left == right:
            window, padding = y, left
        else:  # causal (or an even kernel): pad the tokens once, the kernel pads nothing
            window, padding = F.pad(y, (0, 0, left, right)), 0
        bias = None if conv.bias is None else conv.bias.detach()
        # [B, N, C] viewed as [B, C, 1, N] is channels-last: no copy in, none out
        z = depthwise_gelu(window.transpose(1, 2).unsqueeze(2), kernel, bias, padding)
        y = z.squeeze(2).transpose(1, 2).add_(y)  # z is a fresh tensor: adding in place is safe
    return out(y)


class FastTokenConvolution(nn.Module):
    """Inference form of ``conv`` (``TokenConvolution``) as a separate module: the tokens-last fused
    computation the mixer runs by itself in eval mode, and optionally a following projection
    (the site's reused out-projection) multiplied into the output Linear.

    Args:
        source: the trained mixer (its pre-projection and convolutions are shared, not copied).
        projection: the site's reused output projection to fold in (the wrapper then skips it).

    Example:
        >>> from surgery.registry import MixerShape
        >>> mixer = TokenConvolution(MixerShape(8, 8, 2, False), TokenConvolutionConfig()).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(FastTokenConvolution(mixer)(x), mixer.reference_forward(x), atol=1e-6)
        True
    """

    def __init__(self, source: nn.Module, projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.source = [source]  # a list: not a submodule (its weights are shared, not duplicated)
        self.pre_proj = source.pre_proj
        self.convs = source.convs
        self.pads = source._pad()
        self.folded = projection is not None
        with torch.no_grad():
            weight, bias = source.out.weight.detach(), source.out.bias
            bias = bias.detach() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
            if projection is not None:
                p_bias = projection.bias.detach() if projection.bias is not None else 0
                weight, bias = (projection.weight.double() @ weight.double()).to(weight.dtype), (
                    projection.weight.double() @ bias.double() + p_bias).to(weight.dtype)
            self.out = nn.Linear(weight.shape[1], weight.shape[0]).to(weight)
            self.out.weight.copy_(weight)
            self.out.bias.copy_(bias)
        self.out.requires_grad_(False)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        packs = None if torch.is_grad_enabled() else _packed_kernels(self.source[0], x)
        if packs is None:  # gradients, or not CPU float32: the reference computation, this output map
            return _reference_forward(self.pre_proj, self.convs, self.out, self.pads, x, padding_mask)
        return _fast_forward(self.pre_proj, self.convs, self.out, self.pads, packs, x, padding_mask)
