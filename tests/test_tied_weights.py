"""Causal LMs built in Python or saved as HF directories: tied LM heads survive save/load, ``hf:DIR``
of a causal LM keeps its head, and ``surgery list`` names the bundled models."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import surgery  # noqa: E402
from surgery.models import load_model  # noqa: E402

VOCAB = 64


def _gpt2(tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=2, n_layer=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)).eval()


def _llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=None, tie_word_embeddings=tied)).eval()


@pytest.mark.parametrize("build,tied", [(_gpt2, True), (_llama, True), (_llama, False)],
                         ids=["gpt2-tied", "llama-tied", "llama-untied"])
def test_a_causal_lm_built_in_python_round_trips_with_its_lm_head(tmp_path, build, tied):
    torch.manual_seed(0)
    model = build(tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, VOCAB, (2, 10))
    surgery.replace_attention(model, "mhlstm", {"input_ids": ids[:1, :8]})
    surgery.finalize(model)
    with torch.no_grad():  # a trained head differs from the embedding it was tied to: the tie must hold
        model.get_input_embeddings().weight.add_(torch.randn_like(model.get_input_embeddings().weight))
    surgery.save(model, tmp_path / "run")
    again = surgery.load(tmp_path / "run")
    assert (again.lm_head.weight is again.get_input_embeddings().weight) == tied
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        # decoding with the cache still goes through the replaced sites after load
        out = again.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
        reference = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_directory_of_a_causal_lm_loads_with_its_lm_head(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / "lm")
    loaded = load_model(f"hf:{tmp_path / 'lm'}")
    assert type(loaded) is type(model)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # and a replaced one saved with that spec rebuilds with its head
    surgery.replace_attention(loaded, "gru", {"input_ids": ids})
    surgery.save(loaded, tmp_path / "run")
    assert type(surgery.load(tmp_path / "run")) is type(model)


def test_hf_directory_of_an_encoder_still_loads_headless(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    assert type(load_model(f"hf:{tmp_path / 'bert'}")).__name__ == "BertModel"


def test_list_names_the_bundled_models():
    from typer.testing import CliRunner

    from surgery.cli import app

    runner = CliRunner()
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0, table.output
    assert "smollm2" in table.stdout and "minilm" in table.stdout
    data = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert set(data["bundled"]) >= {"minilm", "smollm2"}
    assert "SmolLM2-135M" in data["bundled"]["smollm2"]["model"]
