"""Built-in sequence-to-sequence replacements for attention; importing this package registers them.

Installed as ``surgery.replacements`` (the folder stays ``replacements/`` in the repository). One
replacement = its own file(s) here: config, module, training / inference forms, pruner, resize on
load, teacher-derived start, FLOP handles, all registered together (``surgery.registry``).
"""

if __name__ != "surgery.replacements":  # imported by its old top-level name from a source checkout
    from surgery._compat import alias_package

    alias_package(__name__, "surgery.replacements")
else:
    from .conv import TokenConvolution, TokenConvolutionConfig
    from .gru import MultiHeadGRU, MultiHeadGRUConfig
    from .linear import GatedLinearAttention, LinearAttentionConfig
    from .mhlstm import MultiHeadLSTM, MultiHeadLSTMConfig
    from .native import kernel_status

    __all__ = [
        "GatedLinearAttention",
        "LinearAttentionConfig",
        "MultiHeadGRU",
        "MultiHeadGRUConfig",
        "MultiHeadLSTM",
        "MultiHeadLSTMConfig",
        "TokenConvolution",
        "TokenConvolutionConfig",
        "kernel_status",
    ]
