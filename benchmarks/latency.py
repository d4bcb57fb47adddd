"""CPU latency of DeiT-T/S with each replacement against the original attention, timed in one run.

Run: python benchmarks/latency.py [--models deit_tiny deit_small] [--sizes 224 512] [--threads 2]
     [--repeats 15] [--json OUT.json]

For each model and image size every variant is built from the same random-init original (latency
does not depend on the weights) and all of them are timed together by
``surgery.measure.measure_latencies``: interleaved rounds, rotating order, medians, batch 1,
eval mode under inference_mode, fixed intra-op threads. Ratios are variant / attention from the same
run, so they hold on a busy machine even when the absolute milliseconds drift.

Variants: the replacement's training form (at 224 px only for mhlstm/gru: it is slow), its fast
inference form (``surgery.fast.optimize``: native recurrence kernel, reused out-projection folded
in; conv with in-kernel padding), and mhlstm pruned with ``surgery.prune``
at ``--prune-ratio`` (magnitude importance on random weights, global over recurrent hidden units and
MLP channels) then optimised.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import timm
import torch

import surgery
from surgery.fast import ReferenceForms, kernel_status, optimize
from surgery.measure import count_flops, measure_latencies

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}


def variants(name: str, size: int, prune_ratio: float, naive: bool) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """label -> (model to time, model to count FLOPs on: the training form)."""
    torch.manual_seed(0)
    original = timm.create_model(name, img_size=size).eval()
    x = torch.randn(1, 3, size, size)
    out = {"attention": (original, original)}
    for replacement in ("mhlstm", "gru", "conv"):
        replaced = copy.deepcopy(original)
        surgery.replace_attention(replaced, replacement, x)
        surgery.finalize(replaced)
        if naive or replacement == "conv":
            # eval mode runs the inference form by itself: the per-head form must be asked for
            out[f"{replacement} (training form)"] = (ReferenceForms(replaced), replaced)
        out[f"{replacement} (fast)"] = (optimize(copy.deepcopy(replaced)), replaced)
    if prune_ratio:
        pruned = copy.deepcopy(original)
        surgery.replace_attention(pruned, "mhlstm", x)
        surgery.prune(pruned, x, ratio=prune_ratio, measure_flops=False)
        surgery.finalize(pruned)
        out[f"mhlstm pruned {prune_ratio} (fast)"] = (optimize(copy.deepcopy(pruned)), pruned)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    status = kernel_status()
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "cpu": platform.processor() or platform.machine(), "kernel": status}
    rows = []
    for alias in args.models:
        for size in args.sizes:
            started = time.time()
            built = variants(MODELS[alias], size, args.prune_ratio, naive=size <= 224)
            x = torch.randn(1, 3, size, size)
            timing = measure_latencies({k: v[0] for k, v in built.items()}, x, repeats=args.repeats,
                                       warmup=args.warmup, threads=args.threads)
            base = timing["attention"]["median_ms"]
            for label, (_, counted) in built.items():
                rows.append({
                    "model": alias, "size": size, "tokens": (size // 16) ** 2 + 1, "variant": label,
                    "params": surgery.count_parameters(counted),
                    "gmacs": round(count_flops(counted, x) / 1e9, 3),
                    "median_ms": round(timing[label]["median_ms"], 2),
                    "p25_ms": round(timing[label]["p25_ms"], 2), "p75_ms": round(timing[label]["p75_ms"], 2),
                    "ratio": round(timing[label]["median_ms"] / base, 2),
                })
            print(f"# {alias} {size}px done in {time.time() - started:.0f} s", flush=True)
            for r in rows[-len(built):]:
                print(f"#   {r['variant']}: {r['median_ms']} ms, {r['ratio']}x", flush=True)
            if args.json:  # after every configuration, so a long run that is stopped keeps its rows
                _write(args.json, meta, rows)
    print(f"torch {meta['torch']}, {args.threads} threads, batch 1, {args.repeats} interleaved repeats, "
          f"native kernel: {status['available']}")
    print("| model | px | tokens | variant | params | GMACs | median ms (p25-p75) | vs attention |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['tokens']} | {r['variant']} | {r['params'] / 1e6:.2f}M "
              f"| {r['gmacs']} | {r['median_ms']} ({r['p25_ms']}-{r['p75_ms']}) | {r['ratio']}x |")


def _write(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
