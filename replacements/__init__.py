"""Built-in sequence-to-sequence replacements for attention; importing this package registers them."""

from replacements.conv import TokenConvolution, TokenConvolutionConfig
from replacements.gru import MultiHeadGRU, MultiHeadGRUConfig
from replacements.mhlstm import MultiHeadLSTM, MultiHeadLSTMConfig

__all__ = [
    "MultiHeadGRU",
    "MultiHeadGRUConfig",
    "MultiHeadLSTM",
    "MultiHeadLSTMConfig",
    "TokenConvolution",
    "TokenConvolutionConfig",
]
