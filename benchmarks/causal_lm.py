"""Causal-LM recipe on a real model: teacher vs student held-out perplexity, agreement and answers.

Runs ``recipes.causal_lm.run_causal_lm`` with the settings given as ``key=value`` (any
``CausalLmConfig`` field) and writes its report together with how it was measured (command, wall
time, torch threads, CPU count, load average before and after, torch / transformers versions)
to a JSON file.

    python benchmarks/causal_lm.py --out runs/causal_lm_smollm2 \
        --json benchmarks/results/causal_lm_smollm2.json \
        replace=4 replacement=mhlstm blockwise_steps=80 e2e_steps=50 max_seconds=900 threads=1 curve=true

    python benchmarks/causal_lm.py --plot docs/img/causal_lm.png --from-json benchmarks/results/causal_lm_smollm2*.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plot_reports(reports: list[dict], path: str | Path) -> None:
    """Held-out perplexity (relative to the teacher's) against the number of replaced layers: each
    report's ``curve`` (block-wise fits only) as a line, each report's student row as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for report in reports:
        replacement = report.get("config", {}).get("replacement", "?")
        if report.get("curve"):
            points = report["curve"]
            axis.plot([p["replaced"] for p in points], [p["perplexity"] / p["teacher_perplexity"] for p in points],
                      "o--", color="grey", label=f"{replacement}: block-wise fits only (init={report['config'].get('init')}), "
                                                 "layers added cheapest first")
    markers = {"mhlstm": ("s", "tab:blue"), "gru": ("^", "tab:green"), "conv": ("v", "tab:red"),
               "linear": ("D", "tab:purple")}
    seen = set()
    for report in reports:
        teacher, student = report["rows"][0], report["rows"][1]
        replacement = report.get("config", {}).get("replacement", "?")
        marker, color = markers.get(replacement, ("o", "black"))
        label = None if replacement in seen else f"{replacement}: block-wise + end-to-end"
        seen.add(replacement)
        ratio = student["heldout_perplexity"] / teacher["heldout_perplexity"]
        axis.plot([student["layers_replaced"]], [ratio], marker, color=color, markersize=8, label=label)
        axis.annotate(f"{ratio:.2f}x", (student["layers_replaced"], ratio), textcoords="offset points",
                      xytext=(6, 4), fontsize=8)
    axis.plot([15, 30], [1.15, 1.5], "x", color="black", markersize=9, label="goals (issue 14): 1.15x at 15, 1.5x at 30")
    axis.axhline(1.0, color="black", linewidth=0.5)
    axis.set_yscale("log")
    axis.set_xlabel("attention layers replaced (of 30)")
    axis.set_ylabel("held-out perplexity / teacher's")
    axis.set_title("SmolLM2-135M-Instruct, CPU runs (benchmarks/causal_lm.py)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="run directory of the recipe (resumable)")
    parser.add_argument("--json", help="where to write the report + measurement context")
    parser.add_argument("--plot", default=None, help="draw perplexity against replaced layers into this PNG")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="plot these earlier reports instead of running (with --plot)")
    parser.add_argument("settings", nargs="*", help="CausalLmConfig settings as key=value")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot")
        plot_reports([json.loads(Path(p).read_text()) for p in args.from_json], args.plot)
        return {}
    if not args.out or not args.json:
        parser.error("--out and --json are needed to run the recipe")
    import torch
    import transformers

    from surgery.recipes import get_recipe

    settings = dict(item.split("=", 1) for item in args.settings)
    recipe = get_recipe("causal-lm")
    config = recipe.make_config(**settings)
    load_before = os.getloadavg()
    began = time.time()
    report = recipe.run(config, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    wall = time.time() - began
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:
        commit = None
    report["measured"] = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "wall_seconds": round(wall, 1), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "device": config.device, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "git_commit": commit,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(temporary, path)
    if args.plot:
        plot_reports([report], args.plot)
    print(json.dumps({k: report["rows"][1][k] for k in ("heldout_perplexity", "top1_agreement", "mean_kl")}
                     | {"teacher_perplexity": report["rows"][0]["heldout_perplexity"], "wall_seconds": round(wall)}))
    return report


if __name__ == "__main__":
    main()
