"""Latency and FLOPs against sequence length: attention vs each replacement, and the crossover.

Attention costs O(N^2 d) per block, the replacements O(N d^2): past some length N the replacement
must win on FLOPs; on a CPU at batch 1 the recurrences pay per-step overhead, so the latency
crossover comes later (or not at all in range). Images: a DeiT-T shape (random init, patch 16) at
224 to 512 px (197 to 1025 tokens). Text: the real all-MiniLM-L6-v2 at 64 to 512 tokens. At every
length, the attention model and its replaced variants are timed in the same run, interleaved
(``surgery.measure.measure_latencies``, medians); recurrent replacements are timed in their inference
form (``surgery.fast.optimize``); FLOPs are fvcore MACs with real LSTM/GRU/SDPA costs.

Run:
    python benchmarks/scaling.py --json benchmarks/results/scaling.json --png docs/img/scaling.png
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.measure import count_flops, measure_latencies  # noqa: E402

IMAGE_SIZES = (224, 288, 352, 416, 512)
TEXT_LENGTHS = (64, 128, 256, 512)


def image_models(size: int, replacements: list[str]) -> tuple[dict, dict, tuple]:
    import timm

    torch.manual_seed(0)
    original = timm.create_model("deit_tiny_patch16_224", img_size=size).eval()
    inputs = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    return _variants(original, inputs, replacements) + (inputs,)


def text_models(length: int, replacements: list[str], base) -> tuple[dict, dict, dict]:
    ids = torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return _variants(base, inputs, replacements) + (inputs,)


def _variants(original, inputs, replacements):
    """(timed models, models for FLOP counting): recurrent ones timed in their fast inference form."""
    from surgery.fast import optimize

    timed, counted = {"attention": original}, {"attention": original}
    for replacement in replacements:
        model = copy.deepcopy(original)
        surgery.replace_attention(model, replacement, inputs)
        surgery.finalize(model).eval()
        counted[replacement] = model
        timed[replacement] = optimize(copy.deepcopy(model)).eval() if replacement in ("mhlstm", "gru") else model
    return timed, counted


def sweep(kind: str, lengths, replacements, repeats: int, threads: int) -> list[dict]:
    rows = []
    base = None
    if kind == "text":
        from surgery.models import load_model

        base = load_model("minilm")
    for length in lengths:
        began = time.perf_counter()
        if kind == "image":
            timed, counted, inputs = image_models(length, replacements)
            tokens = (length // 16) ** 2 + 1
        else:
            timed, counted, inputs = text_models(length, replacements, base)
            tokens = length
        latency = measure_latencies(timed, inputs, repeats=repeats, warmup=2, threads=threads)
        for variant in timed:
            rows.append({"kind": kind, "size": length, "tokens": tokens, "variant": variant,
                         "latency_ms": latency[variant]["median_ms"],
                         "ratio": latency[variant]["median_ms"] / latency["attention"]["median_ms"],
                         "gflops": count_flops(counted[variant], inputs) / 1e9})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print(f"{kind} {length}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    """Per kind and replacement: the first measured length where it beats attention (latency, FLOPs)."""
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows if r["kind"] == kind} - {"attention"}):
            mine = sorted((r for r in rows if r["kind"] == kind and r["variant"] == variant), key=lambda r: r["tokens"])
            attention = {r["tokens"]: r for r in rows if r["kind"] == kind and r["variant"] == "attention"}
            first_latency = next((r["tokens"] for r in mine if r["latency_ms"] < attention[r["tokens"]]["latency_ms"]), None)
            first_flops = next((r["tokens"] for r in mine if r["gflops"] < attention[r["tokens"]]["gflops"]), None)
            out.append({"kind": kind, "variant": variant, "latency_wins_from_tokens": first_latency,
                        "flops_win_from_tokens": first_flops})
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("image", "text") if any(r["kind"] == k for r in rows)]
    figure, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), squeeze=False)
    titles = {"image": "DeiT-T shape, 224-512 px", "text": "all-MiniLM-L6-v2, 64-512 tokens"}
    for column, kind in enumerate(kinds):
        for variant in sorted({r["variant"] for r in rows if r["kind"] == kind}, key=lambda v: v != "attention"):
            mine = sorted((r for r in rows if r["kind"] == kind and r["variant"] == variant), key=lambda r: r["tokens"])
            style = {"linewidth": 2.5, "color": "black"} if variant == "attention" else {"marker": "o"}
            tokens = [r["tokens"] for r in mine]
            axes[0][column].plot(tokens, [r["latency_ms"] for r in mine], label=variant, **style)
            axes[1][column].plot(tokens, [r["gflops"] for r in mine], label=variant, **style)
        axes[0][column].set_title(f"{titles[kind]}: CPU latency, batch 1")
        axes[0][column].set_ylabel("median latency (ms)")
        axes[1][column].set_title(f"{titles[kind]}: GFLOPs (MACs)")
        axes[1][column].set_ylabel("GMACs")
        for row in axes:
            row[column].set_xlabel("tokens")
            row[column].set_xscale("log", base=2)
            row[column].set_yscale("log")
            row[column].grid(True, which="both", alpha=0.3)
            row[column].legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-sizes", nargs="*", type=int, default=list(IMAGE_SIZES))
    parser.add_argument("--text-lengths", nargs="*", type=int, default=list(TEXT_LENGTHS))
    parser.add_argument("--replacements", nargs="+", default=surgery.list_replacements())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write rows, crossovers and the environment here")
    parser.add_argument("--png", help="write the plot here")
    args = parser.parse_args()
    rows = sweep("image", args.image_sizes, args.replacements, args.repeats, args.threads) if args.image_sizes else []
    if args.text_lengths:
        rows += sweep("text", args.text_lengths, args.replacements, args.repeats, args.threads)
    found = crossovers(rows)
    from surgery.recipes.report import markdown_table

    print(markdown_table(["kind", "size", "tokens", "variant", "latency_ms", "ratio", "gflops"], rows))
    print()
    print(markdown_table(["kind", "variant", "latency_wins_from_tokens", "flops_win_from_tokens"], found))
    if args.json:
        environment = {"torch": torch.__version__, "python": platform.python_version(),
                       "threads": args.threads, "repeats": args.repeats, "command": " ".join(sys.argv)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": environment, "rows": rows, "crossovers": found},
                                              indent=2))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
