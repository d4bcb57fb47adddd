"""Causal-LM recipe on a real model: teacher vs student held-out perplexity, agreement and answers.

Runs ``recipes.causal_lm.run_causal_lm`` with the settings given as ``key=value`` (any
``CausalLmConfig`` field) and writes its report together with how it was measured (command, wall
time, torch threads, CPU count, load average before and after, torch / transformers versions)
to a JSON file.

    python benchmarks/causal_lm.py --out runs/causal_lm_smollm2 \
        --json benchmarks/results/causal_lm_smollm2.json \
        replace=4 replacement=mhlstm blockwise_steps=80 e2e_steps=50 max_seconds=900 threads=1 curve=true
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory of the recipe (resumable)")
    parser.add_argument("--json", required=True, help="where to write the report + measurement context")
    parser.add_argument("settings", nargs="*", help="CausalLmConfig settings as key=value")
    args = parser.parse_args(argv)
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
    print(json.dumps({k: report["rows"][1][k] for k in ("heldout_perplexity", "top1_agreement", "mean_kl")}
                     | {"teacher_perplexity": report["rows"][0]["heldout_perplexity"], "wall_seconds": round(wall)}))
    return report


if __name__ == "__main__":
    main()
