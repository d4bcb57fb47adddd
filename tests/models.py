"""Tiny models of every family the library must handle, built offline with fixed seeds."""

from __future__ import annotations

import math

import torch
from torch import nn


class HandWrittenAttention(nn.Module):
    """A user-written attention block: separate q/k/v projections, explicit softmax, out projection."""

    def __init__(self, dim: int = 32, heads: int = 4, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if self.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.out(context)


class HandWrittenBlock(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = HandWrittenAttention(dim, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm(x))
        return x + self.mlp(x)


class HandWrittenModel(nn.Module):
    """Token ids -> hidden states, with hand-written attention (causal optional)."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, depth: int = 2,
                 causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(HandWrittenBlock(dim, heads, causal) for _ in range(depth))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


def tiny_vit():
    import timm.models.vision_transformer as vt

    return vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                mlp_ratio=2, num_classes=10)


def tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0))


def tiny_hf_vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, image_size=32, patch_size=8))


def tiny_encoder(batch_first: bool = True):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def minilm():
    from surgery.models import load_model

    return load_model("minilm")


def ids(batch: int = 2, length: int = 12, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# (name, factory, example inputs, expected site names, causal, convention)
CASES = {
    "timm_vit": (tiny_vit, lambda: torch.randn(2, 3, 32, 32), ["blocks.0.attn", "blocks.1.attn"],
                 False, "tensor"),
    "hf_bert": (tiny_bert, lambda: {"input_ids": ids(), "attention_mask": torch.ones(2, 12, dtype=torch.long)},
                ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"], False, "tuple"),
    "hf_gpt2": (tiny_gpt2, lambda: {"input_ids": ids()}, ["h.0.attn", "h.1.attn"], True, "tuple"),
    "hf_vit": (tiny_hf_vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
               ["layers.0.attention", "layers.1.attention"], False, "tuple"),
    "torch_encoder": (tiny_encoder, lambda: torch.randn(2, 6, 32),
                      ["layers.0.self_attn", "layers.1.self_attn"], False, "mha"),
    "torch_encoder_seq_first": (lambda: tiny_encoder(False), lambda: torch.randn(6, 2, 32),
                                ["layers.0.self_attn", "layers.1.self_attn"], False, "mha"),
    "hand_written": (HandWrittenModel, lambda: ids(vocab=50), ["blocks.0.mixer", "blocks.1.mixer"],
                     False, "tensor"),
    "hand_written_causal": (lambda: HandWrittenModel(causal=True), lambda: ids(vocab=50),
                            ["blocks.0.mixer", "blocks.1.mixer"], True, "tensor"),
}


def build(case: str):
    factory, inputs, *_ = CASES[case]
    torch.manual_seed(0)
    return factory().eval(), inputs()


def run(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def main_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


class HandWrittenWithExamples(HandWrittenModel):
    """A user model that says what it accepts, for the CLI's ``py:<module>:<factory>`` spec."""

    def example_inputs(self):
        return ids(2, 10, vocab=50)


def hand_written_factory():
    torch.manual_seed(0)
    return HandWrittenWithExamples()
