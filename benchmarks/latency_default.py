"""DeiT-T + mhlstm with no call but replace_attention + finalize + .eval(): batch-1 CPU latency against
the original attention, timed in one run.

Run: python benchmarks/latency_default.py [--repeats 30] [--threads 2 1] [--out benchmarks/results/latency_default.json]

Three models, built from one random-init DeiT-T (latency does not depend on the weights), timed by
``surgery.measure.measure_latencies``: interleaved rounds in rotating order, medians, batch 1, 224 px,
eval mode under ``torch.inference_mode``, fixed intra-op threads:

- ``attention``: the original timm model;
- ``mhlstm (default)``: replace_attention + finalize + .eval(), nothing else: the mixers run their
  inference form by themselves (packed weights, the native recurrence kernel when it compiles);
- ``mhlstm (reference form)``: the same model inside ``surgery.registry.reference_forms()``: each
  head's own ``nn.LSTM``, what an eval-mode model ran before the inference form became the default.

Ratios are to attention in the same run, so they hold on a busy machine; the load average before
and after each thread setting is recorded (this machine's two cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import timm
import torch
from torch import nn

import surgery
from surgery.fast import kernel_status
from surgery.measure import measure_latencies
from surgery.registry import reference_forms


class ReferenceForms(nn.Module):
    """Runs ``model`` inside ``reference_forms()`` (the per-head nn.LSTM form)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with reference_forms():
            return self.model(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_default.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    original = timm.create_model("deit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    replaced = timm.create_model("deit_tiny_patch16_224")
    replaced.load_state_dict(original.state_dict())
    surgery.replace_attention(replaced, "mhlstm", x)
    surgery.finalize(replaced)
    replaced.eval()  # the only call after finalize
    with torch.inference_mode():
        same = float((replaced(x) - ReferenceForms(replaced)(x)).abs().max())
    models = {"attention": original, "mhlstm (default)": replaced, "mhlstm (reference form)": ReferenceForms(replaced)}
    results = []
    for threads in args.threads:
        load_before = os.getloadavg()
        began = time.time()
        timing = measure_latencies(models, x, repeats=args.repeats, warmup=args.warmup, threads=threads)
        load_after = os.getloadavg()
        base = timing["attention"]["median_ms"]
        row = {"threads": threads, "repeats": args.repeats, "seconds": round(time.time() - began, 1),
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in load_after],
               "median_ms": {k: round(v["median_ms"], 3) for k, v in timing.items()},
               "p25_ms": {k: round(v["p25_ms"], 3) for k, v in timing.items()},
               "p75_ms": {k: round(v["p75_ms"], 3) for k, v in timing.items()},
               "ratio_to_attention": {k: round(v["median_ms"] / base, 3) for k, v in timing.items()}}
        results.append(row)
        _write(args.out, results, same)  # after every thread setting: a killed run keeps what it measured
        print(f"{threads} thread(s), load {load_before[0]:.1f} -> {load_after[0]:.1f}: "
              + ", ".join(f"{k} {v['median_ms']:.1f} ms ({v['median_ms'] / base:.2f}x)" for k, v in timing.items()))
    print(f"wrote {args.out}")


def _write(out: str, results: list, same: float) -> None:
    report = {"benchmark": "latency_default", "model": "deit_tiny_patch16_224", "replacement": "mhlstm",
              "batch": 1, "image_size": 224, "calls": "replace_attention + finalize + .eval() only",
              "max_abs_difference_default_vs_reference": same, "kernel": kernel_status(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
              "results": results}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
