"""Prune a trained MNIST student at several ratios: parameters vs the teacher, units kept, accuracy.

Run: python benchmarks/mnist_prune_sweep.py [--student runs/mnist/mhlstm/stage2]
         [--ratios 0.3 0.4 0.5] [--local] [--scope all] [--json OUT.json]

Loads a stage directory of ``surgery recipe mnist`` (default: the mhlstm student after stage 2),
prunes a fresh copy at each ratio with ``surgery.prune`` (magnitude; global unless ``--local``), and
reports its parameter count against the teacher's, how many recurrent units / conv channels and
MLP hidden channels survive, and the test accuracy on the 1,000 held-out digits *before* any
recovery. It answers which ratio takes a student below the teacher's size, without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import surgery
from surgery.recipes.mnist import accuracy, build_vit, load_digits


def sweep(student: str, ratios: list[float], *, global_: bool = True, scope: str = "all") -> list[dict]:
    """One row per ratio: params, kept units by kind, test accuracy before recovery."""
    _, _, test_x, test_y = load_digits()
    teacher_params = surgery.count_parameters(build_vit())
    rows = []
    for ratio in ratios:
        model = surgery.load(student, model=build_vit())
        started = time.perf_counter()
        report = surgery.prune(model, (torch.zeros(1, 1, 28, 28),), ratio=ratio, global_=global_, scope=scope,
                               measure_flops=False)
        seconds = time.perf_counter() - started
        kept = {kind: [0, 0] for kind in sorted({b.kind for b in report.bundles})}
        for bundle in report.bundles:
            kept[bundle.kind][0] += bundle.after
            kept[bundle.kind][1] += bundle.before
        params = surgery.count_parameters(model)
        rows.append({"ratio": ratio, "ranking": "global" if global_ else "local", "scope": scope,
                     "params": params, "vs_teacher_params": round(params / teacher_params, 3),
                     "fewer_than_teacher": params < teacher_params,
                     **{f"{kind}_units_kept": f"{after}/{before}" for kind, (after, before) in kept.items()},
                     "test_accuracy_before_recovery": accuracy(model, test_x, test_y),
                     "prune_seconds": round(seconds, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/mnist/mhlstm/stage2", help="a stage directory of the recipe")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.4, 0.45, 0.47, 0.48, 0.5, 0.55])
    parser.add_argument("--local", action="store_true", help="remove the ratio from every head/layer")
    parser.add_argument("--scope", default="all", help="all, replacements or mlp")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    if not (Path(args.student) / "manifest.json").is_file():
        parser.error(f"{args.student} is not a saved stage directory; run `surgery recipe mnist` first")
    torch.set_num_threads(1)
    rows = sweep(args.student, args.ratios, global_=not args.local, scope=args.scope)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        row = {c: row.get(c, "—") for c in columns}
        print("| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) and not isinstance(row[c], bool)
                                else f"{row[c]:.1f}" if isinstance(row[c], float) and c.startswith("test")
                                else str(row[c]) for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
