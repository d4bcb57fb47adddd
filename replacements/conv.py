"""Token-mixing convolution: depthwise over the sequence, then a pointwise mix; causal-padded when needed.

Everything of ``conv`` lives here: config, module (its forward pads inside the convolution in eval
mode without gradients), pruner, teacher-derived start, resize on load, inference form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fitting import least_squares, masked_rows
from surgery.errors import SurgeryError
from surgery.registry import MixerShape, ReplacementConfig, TeacherEvidence, register_replacement, using_reference_forms
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
    """The registry's ``inference_form`` hook: a separate ``FastTokenConvolution`` (no native kernel)."""
    return FastTokenConvolution(mixer)


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
                      inference_form=lambda mixer, **_: inference_form(mixer))
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
        x = self.pre_proj(x)
        keep = None if padding_mask is None else padding_mask.unsqueeze(1).to(x.dtype)
        y = x.transpose(1, 2)
        left, right = self._pad()
        # inference form: symmetric padding done inside the convolution (oneDNN pads in the kernel,
        # no padded copy of the sequence); same function, so training keeps the explicit pad
        inside = left == right and not self.training and not torch.is_grad_enabled() and not using_reference_forms()
        for conv in self.convs:
            if keep is not None:
                y = y * keep
            if inside:
                z = F.conv1d(y, conv.weight, conv.bias, padding=left, groups=conv.groups)
            else:
                z = conv(F.pad(y, (left, right)))
            y = F.gelu(z) + y
        return self.out(y.transpose(1, 2))


class FastTokenConvolution(nn.Module):
    """Inference form of ``conv`` (``TokenConvolution``): padding done inside the convolution when
    it is symmetric, and optionally the reused out-projection multiplied into the last Linear.

    Args:
        source: the trained mixer (its pre-projection and convolutions are shared, not copied).
        projection: the site's reused output projection to fold in (the wrapper then skips it).

    Example:
        >>> from surgery.registry import MixerShape
        >>> mixer = TokenConvolution(MixerShape(8, 8, 2, False), TokenConvolutionConfig()).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(FastTokenConvolution(mixer)(x), mixer(x), atol=1e-6)
        True
    """

    def __init__(self, source: nn.Module, projection: nn.Linear | None = None) -> None:
        super().__init__()
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
        x = self.pre_proj(x)
        keep = None if padding_mask is None else padding_mask.unsqueeze(1).to(x.dtype)
        y = x.transpose(1, 2)
        left, right = self.pads
        for conv in self.convs:
            if keep is not None:
                y = y * keep
            if left == right:  # oneDNN pads inside the kernel: no padded copy of the sequence
                z = F.conv1d(y, conv.weight, conv.bias, padding=left, groups=conv.groups)
            else:
                z = conv(F.pad(y, (left, right)))
            y = F.gelu(z) + y
        return self.out(y.transpose(1, 2))
