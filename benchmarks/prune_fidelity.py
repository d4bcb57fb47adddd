"""Fidelity after pruning: real MiniLM with mhlstm, distilled, then pruned (magnitude vs Taylor,
ratios 0.3/0.5), before and after a short recovery distillation.

Run: python benchmarks/prune_fidelity.py [--model minilm] [--distill-steps 800] [--recover-steps 200]
     [--device cuda] [--json OUT.json]

Fidelity: mean cosine, over held-out built-in text, between the mean-pooled sentence embeddings
of the pruned model and of the original (unreplaced) model (1.0 = identical).
``--replacement none`` skips replacement and distillation and prunes only the MLP channels of the
pretrained model (Taylor then uses the distance to the unpruned model as its loss).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import surgery
from surgery.data import data_from_spec
from surgery.data import split_batch, to_device
from surgery.inputs import default_example_inputs
from surgery.models import load_model


def _embed(model, kwargs) -> torch.Tensor:
    hidden = model(**kwargs).last_hidden_state
    mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@torch.no_grad()
def fidelity(teacher, student, heldout, batches: int) -> float:
    """Mean cosine of the mean-pooled, L2-normalised embeddings of student and teacher."""
    device = next(student.parameters()).device
    cosines = []
    student.eval()
    for i, batch in enumerate(heldout):
        if i >= batches:
            break
        _, kwargs, _ = split_batch(batch)
        kwargs = to_device(kwargs, device)
        cosines.append((_embed(student, kwargs) * _embed(teacher, kwargs)).sum(-1))
    return float(torch.cat(cosines).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--replacement", default="mhlstm")
    parser.add_argument("--distill-steps", type=int, default=800)
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--importances", nargs="+", default=["magnitude", "taylor"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher = load_model(args.model).float().to(device).eval()
    model = copy.deepcopy(teacher)
    example = default_example_inputs(model)
    data = "text:builtin"
    settings = dict(lr=args.lr, batch_size=args.batch_size, device=device, fast=False)
    replaced = args.replacement != "none"
    distill_seconds = 0.0
    if replaced:
        from surgery.distill import distill

        surgery.replace_attention(model, args.replacement, example)
        start = time.perf_counter()
        distill(None, model, data, mode="blockwise", steps=args.distill_steps, **settings)
        distill_seconds = time.perf_counter() - start
    heldout = data_from_spec(data, model, split="heldout", batch_size=args.batch_size)

    def loss_to_teacher(student, batch):
        _, kwargs, _ = split_batch(batch)
        kwargs = to_device(kwargs, device)
        with torch.no_grad():
            target = teacher(**kwargs).last_hidden_state
        return torch.nn.functional.mse_loss(student(**kwargs).last_hidden_state, target)

    rows = [{"variant": "replaced + distilled" if replaced else "original", "ratio": 0.0, "importance": "-",
             "params": surgery.count_parameters(model), "cosine": fidelity(teacher, model, heldout, args.eval_batches),
             "cosine_recovered": None, "seconds": distill_seconds}]
    for ratio in args.ratios:
        for importance in args.importances:
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            surgery.prune(pruned, example, ratio=ratio, importance=importance, data=data, taylor_batches=8,
                          measure_flops=False, scope="all" if replaced else "mlp",
                          loss_fn=None if replaced else loss_to_teacher)
            seconds = time.perf_counter() - start
            row = {"variant": "pruned", "ratio": ratio, "importance": importance,
                   "params": surgery.count_parameters(pruned),
                   "cosine": fidelity(teacher, pruned, heldout, args.eval_batches), "cosine_recovered": None,
                   "seconds": seconds}
            if args.recover_steps and replaced:
                distill(teacher, pruned, data, mode="blockwise", steps=args.recover_steps, **settings)
                row["cosine_recovered"] = fidelity(teacher, pruned, heldout, args.eval_batches)
            rows.append(row)
            print(row, flush=True)
    base = surgery.count_parameters(teacher)
    print(f"teacher params {base:,}; distilled {args.distill_steps if replaced else 0} steps "
          f"({distill_seconds:.0f} s) on {device}")
    recovery = f"after {args.recover_steps} recovery steps" if replaced and args.recover_steps else "recovered"
    print(f"| variant | ratio | importance | params | x teacher | embedding cosine | {recovery} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        recovered = f"{r['cosine_recovered']:.4f}" if r["cosine_recovered"] is not None else "-"
        print(f"| {r['variant']} | {r['ratio']} | {r['importance']} | {r['params'] / 1e6:.2f}M | "
              f"{r['params'] / base:.2f} | {r['cosine']:.4f} | {recovered} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
