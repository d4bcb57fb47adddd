"""Token-mixing convolution: depthwise over the sequence, then a pointwise mix; causal-padded when needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery.prune.groups import Bundle, ReplacementPruner, UnitSet, _cut_linear, score_units, shrink
from surgery.registry import MixerShape, ReplacementConfig, register_replacement


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
        _cut_linear(layer.out, idxs, dim=0)
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


@register_replacement("conv", config=TokenConvolutionConfig, pruner=TokenConvolutionPruner)
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
        for conv in self.convs:
            if keep is not None:
                y = y * keep
            y = F.gelu(conv(F.pad(y, self._pad()))) + y
        return self.out(y.transpose(1, 2))
