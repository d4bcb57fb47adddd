"""Per-token greedy decode latency and state memory: replaced causal LMs vs the original with its KV cache.

For each model shape and prompt length: one random-weight original (its KV cache) and, built from
a copy, the same model with every attention site replaced (``surgery.replace_attention`` +
``surgery.finalize``), decoding with the model's own cache (``surgery.decoding``). Both are
prefilled with the same prompt, then ``--steps`` greedy steps are timed one token at a time,
original and replaced interleaved step by step in the same run (so load on the machine hits both
alike); medians are reported with the ratio replaced / original. Memory: bytes of the original's
KV cache after the prompt vs bytes of the replaced sites' states (``surgery.decoding.state_bytes``).

Weights are random (cost does not depend on them). Widths and depths are reduced from the named
models (``--layers``) so the run fits a busy CPU: the ratio is what to read.

Run:
    python benchmarks/decode.py --json benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.decoding import state_bytes  # noqa: E402


def build(shape: str, layers: int, context: int, vocab: int | None = None) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if shape == "gpt2":  # GPT-2 small widths (768, 12 heads), fewer layers
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab or 50257, n_embd=768, n_head=12, n_layer=layers,
                                          n_positions=context, attn_implementation="sdpa")).eval()
    if shape == "llama":  # Llama-shaped: GQA (16 query heads, 4 KV heads), rotary, SwiGLU
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab or 32000, hidden_size=1024, intermediate_size=2816,
                                            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                            max_position_embeddings=context, attn_implementation="sdpa")).eval()
    raise SystemExit(f"unknown shape {shape!r}; use gpt2 or llama")


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def measure(shape: str, replacement: str, layers: int, lengths: list[int], steps: int,
            vocab: int | None = None) -> list[dict]:
    torch.manual_seed(0)
    original = build(shape, layers, max(lengths) + steps + 8, vocab)
    replaced = copy.deepcopy(original)
    vocab = original.config.vocab_size
    surgery.replace_attention(replaced, replacement, {"input_ids": torch.randint(0, vocab, (1, 8))})
    surgery.finalize(replaced)
    rows = []
    for length in lengths:
        prompt = torch.randint(0, vocab, (1, length))
        with torch.no_grad():
            caches, tokens, times = {}, {}, {"attention": [], replacement: []}
            for name, model in (("attention", original), (replacement, replaced)):
                start = time.perf_counter()
                out = model(input_ids=prompt, use_cache=True)
                times[name + "_prefill"] = time.perf_counter() - start
                caches[name], tokens[name] = out.past_key_values, out.logits[:, -1:].argmax(-1)
            memory = {"attention": kv_bytes(caches["attention"]), replacement: state_bytes(caches[replacement])}
            for _ in range(steps):
                for name, model in (("attention", original), (replacement, replaced)):
                    start = time.perf_counter()
                    out = model(input_ids=tokens[name], past_key_values=caches[name], use_cache=True)
                    times[name].append(time.perf_counter() - start)
                    caches[name], tokens[name] = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ms = {name: 1000 * statistics.median(times[name][1:]) for name in ("attention", replacement)}
        row = {"shape": shape, "layers": layers, "vocab": original.config.vocab_size, "replacement": replacement, "prompt": length, "batch": 1,
               "steps": steps, "ms_per_token_attention": round(ms["attention"], 3),
               f"ms_per_token_{replacement}": round(ms[replacement], 3),
               "latency_ratio": round(ms[replacement] / ms["attention"], 3),
               "memory_bytes_attention_kv": memory["attention"], f"memory_bytes_{replacement}_state": memory[replacement],
               "prefill_s_attention": round(times["attention_prefill"], 3),
               f"prefill_s_{replacement}": round(times[replacement + "_prefill"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--replacement", default="mhlstm")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: the named model's); smaller = the LM head weighs less")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    rows = []
    for shape in args.shapes:
        rows += measure(shape, args.replacement, args.layers, args.lengths, args.steps, args.vocab)
    result = {"command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]), "threads": args.threads,
              "loadavg_before": [round(v, 2) for v in load], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
