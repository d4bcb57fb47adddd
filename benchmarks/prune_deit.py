"""Params, FLOPs and CPU latency of DeiT-T/S: original, mhlstm-replaced, replaced + pruned at 0.3/0.5.

Run: python benchmarks/prune_deit.py [--models deit_tiny deit_small] [--repeats 5] [--json OUT.json]

Random init (counts and latency don't depend on the weights). Pruning uses the library defaults:
``surgery.prune(model, example_inputs, ratio=r)`` (magnitude, global over replacement units and
MLP channels, head_floor 0.1). Latencies are medians of interleaved rounds over all four models in
the same process (``surgery.measure.measure_latencies``), so ratios to the original hold on a busy
machine; absolute milliseconds do not. FLOPs: fvcore MACs with LSTM/SDPA handles, batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import timm
import torch

import surgery
from surgery.measure import count_flops, measure_latencies

ALIASES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
           "deit_base": "deit_base_patch16_224"}


def variants(name: str, ratios: list[float]) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    replaced = copy.deepcopy(original)
    surgery.replace_attention(replaced, "mhlstm", x)
    models, seconds = {"original": original}, {}
    for ratio in ratios:
        pruned = copy.deepcopy(replaced)
        start = time.perf_counter()
        surgery.prune(pruned, x, ratio=ratio, measure_flops=False)
        seconds[f"pruned {ratio}"] = time.perf_counter() - start
        models[f"pruned {ratio}"] = surgery.finalize(pruned).eval()
    models["replaced"] = surgery.finalize(replaced).eval()
    order = ["original", "replaced"] + [f"pruned {r}" for r in ratios]
    return {k: models[k] for k in order}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for alias in args.models:
        name = ALIASES.get(alias, alias)
        models, prune_seconds = variants(name, args.ratios)
        x1 = torch.randn(1, 3, 224, 224)
        x8 = torch.randn(8, 3, 224, 224)
        params = {k: surgery.count_parameters(m) for k, m in models.items()}
        flops = {k: count_flops(m, x1) for k, m in models.items()}
        lat1 = measure_latencies(models, x1, repeats=args.repeats, warmup=1, threads=args.threads)
        lat8 = measure_latencies(models, x8, repeats=max(2, args.repeats // 2), warmup=1, threads=args.threads)
        for key in models:
            rows.append({
                "model": alias, "variant": key, "params": params[key], "flops": flops[key],
                "latency_b1_ms": lat1[key]["median_ms"], "latency_b8_ms": lat8[key]["median_ms"],
                "params_ratio": params[key] / params["original"], "flops_ratio": flops[key] / flops["original"],
                "latency_b1_ratio": lat1[key]["median_ms"] / lat1["original"]["median_ms"],
                "latency_b8_ratio": lat8[key]["median_ms"] / lat8["original"]["median_ms"],
                "prune_seconds": prune_seconds.get(key),
                "repeats_b1": lat1[key]["repeats"], "repeats_b8": lat8[key]["repeats"],
                "threads": lat1[key]["threads"],
            })
    print("| model | variant | params | FLOPs (MAC) | latency b1 | latency b8 | params x | FLOPs x "
          "| latency b1 x | latency b8 x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {r['flops'] / 1e9:.3f}G | "
              f"{r['latency_b1_ms']:.0f} ms | {r['latency_b8_ms']:.0f} ms | {r['params_ratio']:.2f} | "
              f"{r['flops_ratio']:.2f} | {r['latency_b1_ratio']:.2f} | {r['latency_b8_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
