"""The locator finds every attention block of every model family, with the right description."""

import pytest
import torch
from torch import nn

import surgery
from models import CASES, HandWrittenModel, build, ids, minilm


@pytest.mark.parametrize("case", list(CASES))
def test_sites_found(case):
    _, _, names, causal, convention = CASES[case]
    model, inputs = build(case)
    sites = surgery.find_attention(model, inputs)
    assert [s.name for s in sites] == names
    assert all(s.causal is causal for s in sites)
    assert all(s.convention == convention for s in sites)
    assert all(s.num_heads * s.head_dim == s.context_dim for s in sites)
    assert all(s.kind == "self" for s in sites)


def test_real_minilm_sites():
    sites = surgery.find_attention(minilm())
    assert [s.name for s in sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert {(s.embed_dim, s.num_heads, s.head_dim, s.causal) for s in sites} == {(384, 12, 32, False)}
    # the BERT self-attention returns the context; its output projection lives outside the site
    assert all(s.out_proj is None for s in sites)


@pytest.mark.parametrize("name,heads,dim", [("deit_tiny_patch16_224", 3, 192),
                                            ("deit_small_patch16_224", 6, 384),
                                            ("deit_base_patch16_224", 12, 768),
                                            ("vit_small_patch16_224", 6, 384)])
def test_timm_models(name, heads, dim):
    import timm

    sites = surgery.find_attention(timm.create_model(name))
    assert len(sites) == 12
    assert {(s.num_heads, s.embed_dim, s.out_proj, s.found_by) for s in sites} == {(heads, dim, "proj", "fx")}


def test_export_and_type_fallbacks_agree_with_fx():
    model, inputs = build("timm_vit")
    by_fx = surgery.find_attention(model, inputs, method="fx")
    by_export = surgery.find_attention(model, inputs, method="export")
    by_type = surgery.find_attention(model, inputs, method="type")
    strip = lambda sites: [(s.name, s.num_heads, s.out_proj, s.causal) for s in sites]  # noqa: E731
    assert strip(by_fx) == strip(by_export) == strip(by_type)


def test_targets_exclude_filter():
    model, inputs = build("timm_vit")
    assert [s.name for s in surgery.find_attention(model, inputs, targets=["blocks.1.attn"])] == ["blocks.1.attn"]
    assert [s.name for s in surgery.find_attention(model, inputs, targets=r"blocks\.0\.attn")] == ["blocks.0.attn"]
    assert [s.name for s in surgery.find_attention(model, inputs, exclude=["blocks.0.attn"])] == ["blocks.1.attn"]
    kept = surgery.find_attention(model, inputs, filter_fn=lambda name, module: name.startswith("blocks.1"))
    assert [s.name for s in kept] == ["blocks.1.attn"]


def test_bad_targets_and_no_attention():
    model, inputs = build("timm_vit")
    with pytest.raises(surgery.NoAttentionFoundError, match="matched no module"):
        surgery.find_attention(model, inputs, targets=["nope"])
    with pytest.raises(surgery.NoAttentionFoundError, match="excluded"):
        surgery.find_attention(model, inputs, exclude=r"blocks\.\d\.attn")
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(surgery.NoAttentionFoundError, match="no attention found"):
        surgery.find_attention(mlp, torch.randn(2, 3, 8))


def test_cross_attention_is_reported_and_refused():
    layer = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    decoder = nn.TransformerDecoder(layer, 1).eval()
    inputs = (torch.randn(2, 5, 32), torch.randn(2, 7, 32))
    sites = {s.name: s for s in surgery.find_attention(decoder, inputs)}
    assert sites["layers.0.self_attn"].kind == "self"
    assert sites["layers.0.multihead_attn"].kind == "cross"
    with pytest.raises(surgery.UnsupportedSiteError, match="cross-attention"):
        surgery.replace_attention(decoder, "mhlstm", inputs)
    assert isinstance(decoder.layers[0].self_attn, nn.MultiheadAttention)  # untouched


def test_causal_probe_on_hand_written_model():
    sites = surgery.find_attention(HandWrittenModel(causal=True), ids(vocab=50))
    assert all(s.causal for s in sites)


def _more_families():
    from transformers import (DistilBertConfig, DistilBertModel, LlamaConfig, LlamaModel, T5Config,
                              T5EncoderModel)

    return {
        "llama": (lambda: LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)), "layers.0.self_attn", True, "o_proj"),
        "t5_encoder": (lambda: T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                                                       num_layers=2, num_heads=4)),
                       "encoder.block.0.layer.0.SelfAttention", False, "o"),
        "distilbert": (lambda: DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                hidden_dim=64)),
                       "transformer.layer.0.attention", False, "out_lin"),
    }


@pytest.mark.parametrize("family", ["llama", "t5_encoder", "distilbert"])
def test_more_hf_families(family):
    factory, first, causal, out_proj = _more_families()[family]
    model = factory().eval()
    inputs = {"input_ids": ids(2, 10)}
    sites = surgery.find_attention(model, inputs)
    assert len(sites) == 2 and sites[0].name == first
    assert sites[0].causal is causal and sites[0].out_proj == out_proj and sites[0].num_heads == 4
    reference = model(**inputs).last_hidden_state
    surgery.replace_attention(model, "mhlstm", inputs, sites=sites)
    assert model(**inputs).last_hidden_state.shape == reference.shape
