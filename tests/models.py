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


# ----------------------------------------------------------------------------- unusual attention
# Tiny models of attention that is not N-to-N self-attention over [B, N, D] (issue 17): each must be
# reported (kind, skip reason) or replaced correctly, never replaced by an N-to-N mixer in silence.
def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


class ClassAttention(nn.Module):
    """CaiT-style class attention: only the class token queries; returns [B, 1, D]."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = _split_heads(self.q(x[:, :1]), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(x).chunk(2, dim=-1))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, 1, d))


class ClassAttentionModel(nn.Module):
    """Two self-attention blocks, then a class-attention head whose [B, 1, D] output is added to
    every token by broadcasting (so an N-to-N mixer in its place keeps the output shape)."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(HandWrittenBlock(dim, heads, False) for _ in range(2))
        self.head = ClassAttention(dim, heads)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x + self.head(x)


class CrossAttention(nn.Module):
    """Queries from one token stream, keys and values from another (no tell-tale keyword names)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (_split_heads(t, self.heads) for t in (self.q(x), self.k(other), self.v(other)))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TwoStreamModel(nn.Module):
    """Self-attention on an image stream and a text stream, then the image stream attends to text."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.image = HandWrittenBlock(dim, heads, False)
        self.text = HandWrittenBlock(dim, heads, False)
        self.cross = CrossAttention(dim, heads)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = self.image(image), self.text(text)
        return image + self.cross(image, text)


class DownsamplingAttention(nn.Module):
    """Pooled queries (every second token) attend to all tokens: [B, N, D] -> [B, N / 2, D]."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        pooled = nn.functional.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        q = _split_heads(self.q(pooled), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(x).chunk(2, dim=-1))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n // 2, d))


class DownsamplingModel(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = HandWrittenBlock(dim, heads, False)
        self.down = DownsamplingAttention(dim, heads)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(self.block(self.embed(ids)))


class TalkingHeadsAttention(nn.Module):
    """Talking-heads attention: Linear(heads, heads) layers mix the heads' scores before and after
    the softmax; the output projection is the first Linear after the value product."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mix_logits, self.mix_weights = nn.Linear(heads, heads), nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        scores = self.mix_logits(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = self.mix_weights(scores.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class TalkingHeadsModel(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = TalkingHeadsAttention(dim, heads)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x + self.attn(x)


class WindowAttention4d(nn.Module):
    """Attention inside non-overlapping windows of a [B, H, W, C] grid, as in torchvision's Swin."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 2) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        windows = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(windows).chunk(3, dim=-1))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(-1)
        out = self.proj((weights @ v).transpose(1, 2).reshape(-1, s * s, c))
        return out.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowedModel(nn.Module):
    """Token ids -> a 4 x 4 grid: one self-attention block over all tokens, one windowed block."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = HandWrittenBlock(dim, heads, False)
        self.windows = WindowAttention4d(dim, heads)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(ids))
        grid = x.view(x.shape[0], 4, 4, x.shape[-1])
        return (grid + self.windows(grid)).flatten(1, 2)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0))


def tiny_gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def tiny_llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def two_stream_factory():
    """A two-input model for the CLI's ``--inputs`` (it has no ``example_inputs()``)."""
    torch.manual_seed(0)
    return TwoStreamModel()
