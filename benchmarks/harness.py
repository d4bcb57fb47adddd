"""Side-by-side cost of attention and its replacements: params, GFLOPs, CPU latency, peak memory,
plus the fidelity/accuracy figures of the recipe runs.

For each model and replacement (every attention block replaced, originals dropped with
``surgery.finalize``): parameters, GFLOPs (fvcore MACs with real costs for LSTM/GRU/SDPA, see
``surgery.measure.count_flops``), CPU latency at batch 1 and 8 (medians; the original and every
variant of one model are timed in the SAME run, interleaved, and the ratio to the original is
reported), peak activation memory of one batch-1 forward, and, when recipe reports are given, the
MNIST test accuracy / MiniLM embedding cosine and retrieval agreement of the distilled students.
Recurrent replacements are timed twice: as trained (eager PyTorch modules) and after
``surgery.fast.optimize`` (the inference form, one native call for all heads and directions).

Weights: DeiT shapes are random-init (cost does not depend on the weights); MiniLM is the real
bundled model; the MNIST ViT is the recipe's architecture.

Run:
    python benchmarks/harness.py --models deit_tiny minilm mnist_vit --json benchmarks/results/harness.json \
        --mnist-report runs/mnist/report.json --minilm-report runs/minilm/report.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.measure import count_flops, measure_latencies, peak_memory  # noqa: E402

MODELS = ("deit_tiny", "deit_small", "deit_base", "minilm", "mnist_vit")
TEXT_TOKENS = 128


def build(name: str) -> tuple[nn.Module, Any]:
    """The original model and an example-input factory ``batch -> inputs``."""
    from surgery.models import load_model

    if name.startswith("deit"):
        model = load_model(name, random_init=True)
        return model, lambda batch: (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    if name == "minilm":
        model = load_model("minilm")

        def text(batch: int) -> dict:
            ids = torch.randint(1000, 20000, (batch, TEXT_TOKENS), generator=torch.Generator().manual_seed(0))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        return model, text
    if name == "mnist_vit":
        from surgery.recipes.mnist import build_vit

        return build_vit().eval(), lambda batch: (torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def variants(original: nn.Module, inputs: Any, replacements: list[str], fast: bool) -> dict[str, nn.Module]:
    out = {"attention": original}
    for replacement in replacements:
        model = copy.deepcopy(original)
        surgery.replace_attention(model, replacement, inputs)
        surgery.finalize(model)
        out[replacement] = model.eval()
        if fast and replacement in ("mhlstm", "gru"):
            from surgery.fast import ReferenceForms

            # eval mode runs the inference form by itself: the plain label is the per-head form
            out[replacement] = ReferenceForms(model)
            from surgery.fast import optimize

            out[f"{replacement} (fast)"] = optimize(copy.deepcopy(model)).eval()
    return out


def recipe_figures(mnist_report: str | None, minilm_report: str | None) -> dict[tuple[str, str], dict]:
    """(model, variant) -> accuracy / fidelity figures taken from recipe report.json files."""
    figures: dict[tuple[str, str], dict] = {}
    if mnist_report and Path(mnist_report).is_file():
        for row in json.loads(Path(mnist_report).read_text())["rows"]:
            variant = "attention" if row["stage"] == "teacher" else row["replacement"]
            key = ("mnist_vit", variant)
            # the unpruned student after stage 2 (or stage 1 when stage 2 was skipped) is the one timed here
            if row["stage"] in ("teacher", "stage1", "stage2"):
                figures[key] = {"accuracy": row["test_accuracy"]}
            elif row["stage"] == "recovery":
                figures[key]["pruned_accuracy"] = row["test_accuracy"]
                figures[key]["pruned_params"] = row["params"]
    if minilm_report and Path(minilm_report).is_file():
        for row in json.loads(Path(minilm_report).read_text())["rows"]:
            variant = "attention" if row["replacement"].startswith("attention") else row["replacement"]
            figures[("minilm", variant)] = {"cosine": row["embedding_cosine"], "top1": row["retrieval_top1"],
                                            "top5": row["retrieval_top5"]}
    return figures


def run(models: list[str], replacements: list[str], repeats: int, threads: int, fast: bool,
        figures: dict) -> list[dict]:
    rows = []
    for name in models:
        original, make_inputs = build(name)
        one, eight = make_inputs(1), make_inputs(8)
        models_ = variants(original, one, replacements, fast)
        began = time.perf_counter()
        latency1 = measure_latencies(models_, one, repeats=repeats, warmup=2, threads=threads)
        latency8 = measure_latencies(models_, eight, repeats=max(3, repeats // 2), warmup=1, threads=threads)
        for variant, model in models_.items():
            base = variant.replace(" (fast)", "")
            flops = count_flops(models_[base], one)
            memory = peak_memory(model, one, threads=threads)
            # the fast form keeps its weights as rearranged buffers: count the trained parameters
            row = {"model": name, "variant": variant, "params": surgery.count_parameters(models_[base]),
                   "gflops": flops / 1e9,
                   "latency_b1_ms": latency1[variant]["median_ms"],
                   "ratio_b1": latency1[variant]["median_ms"] / latency1["attention"]["median_ms"],
                   "latency_b8_ms": latency8[variant]["median_ms"],
                   "ratio_b8": latency8[variant]["median_ms"] / latency8["attention"]["median_ms"],
                   "activation_mb": memory["activation_bytes"] / 2 ** 20,
                   **figures.get((name, base), {})}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        print(f"{name}: measured in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return rows


COLUMNS = ("model", "variant", "params", "gflops", "latency_b1_ms", "ratio_b1", "latency_b8_ms", "ratio_b8",
           "activation_mb", "accuracy", "pruned_accuracy", "pruned_params", "cosine", "top1", "top5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--replacements", nargs="+", default=surgery.list_replacements())
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds at batch 1 (half at batch 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads while timing")
    parser.add_argument("--no-fast", action="store_true", help="skip the surgery.fast inference forms")
    parser.add_argument("--mnist-report", default="runs/mnist/report.json")
    parser.add_argument("--minilm-report", default="runs/minilm/report.json")
    parser.add_argument("--json", help="write rows and the environment here")
    args = parser.parse_args()
    torch.manual_seed(0)
    figures = recipe_figures(args.mnist_report, args.minilm_report)
    rows = run(args.models, args.replacements, args.repeats, args.threads, not args.no_fast, figures)
    from surgery.recipes.report import markdown_table

    used = [c for c in COLUMNS if any(c in row for row in rows)]
    print(markdown_table(used, rows))
    if args.json:
        environment = {"torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.machine(), "processor": platform.processor(),
                       "threads": args.threads, "repeats": args.repeats, "command": " ".join(sys.argv)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
