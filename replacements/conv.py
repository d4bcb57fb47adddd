"""Token-mixing convolution: depthwise over the sequence, then a pointwise mix; causal-padded when needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


@register_replacement("conv", config=TokenConvolutionConfig)
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
