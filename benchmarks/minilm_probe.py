"""Short MiniLM distillation probes: compare settings of the end-to-end route at a fixed step count.

Run: OMP_NUM_THREADS=1 python benchmarks/minilm_probe.py --out runs/probe-lr2e-3 --steps 400 --lr 2e-3
         [--data text:python*1+english*2] [--replacement gru] [--other 0.2] [--site 0.1] [--batch 16]
         [--seq 64] [--hidden 64] [--json benchmarks/results/minilm_probes.jsonl]

Each probe: a fresh copy of the bundled all-MiniLM-L6-v2 with every attention block replaced, the
teacher-derived start (``init="teacher"``, 12 batches), then ``--steps`` end-to-end steps with the
MiniLM recipe's loss and freezing (every weight trains; the mixers at ``--lr``, the rest at
``--other`` times it; word embeddings frozen), with a full warm-up + cosine schedule over those
steps. Reported: mean cosine between student and teacher sentence embeddings on the recipe's 258
held-out sentences (in domain), the same on the out-of-domain set (``surgery.data.heldout_english``:
241 everyday English sentences no training source holds) and on 258 sentences of ``text:builtin``'s
*training* split (the gap shows how much the run fits its training text), retrieval agreement on
both held-out sets, wall seconds (init and evaluations included), the machine's load average at
the end. One JSON line per probe (with the command) is appended to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import surgery
from surgery.recipes.minilm import held_out_sentences, retrieval_agreement, sentence_embeddings
from surgery.data import builtin_text, data_from_spec, heldout_english, sentences, tokenizer_for
from surgery.models import load_model


def probe(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    teacher = load_model("minilm").float()
    tokenizer = tokenizer_for(teacher)
    held = held_out_sentences("text:builtin", 1000)
    seen = list(dict.fromkeys(sentences(builtin_text("train"))))
    seen = seen[:: max(1, len(seen) // len(held))][:len(held)]
    ood = heldout_english()
    teacher_held = sentence_embeddings(teacher, tokenizer, held)
    teacher_ood = sentence_embeddings(teacher, tokenizer, ood)
    teacher_seen = sentence_embeddings(teacher, tokenizer, seen)
    student = load_model("minilm").float()
    example = {"input_ids": torch.ones(1, 16, dtype=torch.long), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    surgery.replace_attention(student, args.replacement, example,
                              config={"hidden_per_head": args.hidden} if args.hidden else None)
    train = data_from_spec(args.data, teacher, "train", batch_size=args.batch, seq_len=args.seq, seed=0)
    eval_data = data_from_spec("text:builtin", teacher, "heldout", batch_size=16, seq_len=64, seed=0)
    began = time.perf_counter()
    result = surgery.distill(None, student, train, mode="e2e", steps=args.steps, lr=args.lr, run_dir=args.out,
                             resume=True, eval_data=eval_data, eval_batches=2, seed=0, warmup=0.05, train="all",
                             other_lr_scale=args.other, site_weight=args.site, freeze=args.freeze or None,
                             init="teacher", init_batches=args.init_batches, cache="run" if args.cache else None)
    wall = time.perf_counter() - began
    student_held = sentence_embeddings(student, tokenizer, held)
    student_seen = sentence_embeddings(student, tokenizer, seen)
    student_ood = sentence_embeddings(student, tokenizer, ood)
    agreement = retrieval_agreement(teacher_held, student_held)
    ood_agreement = retrieval_agreement(teacher_ood, student_ood)
    return {"args": {k: v for k, v in vars(args).items() if k != "json"},
            "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python "
                       + " ".join(shlex.quote(a) for a in sys.argv),
            "steps": result.steps,
            "heldout_cosine": round(float((student_held * teacher_held).sum(-1).mean()), 4),
            "ood_cosine": round(float((student_ood * teacher_ood).sum(-1).mean()), 4),
            "train_cosine": round(float((student_seen * teacher_seen).sum(-1).mean()), 4),
            "retrieval_top1": round(agreement["top1"], 1), "retrieval_top5": round(agreement["top5"], 1),
            "ood_top1": round(ood_agreement["top1"], 1), "ood_top5": round(ood_agreement["top5"], 1),
            "wall_seconds": round(wall, 1), "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (resumable)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of the new mixers")
    parser.add_argument("--other", type=float, default=0.2, help="lr of the pre-trained weights, relative to --lr")
    parser.add_argument("--site", type=float, default=0.1, help="weight of the per-site MSE terms")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=0, help="hidden_per_head (0: the head dim)")
    parser.add_argument("--replacement", default="mhlstm")
    parser.add_argument("--init-batches", type=int, default=12)
    parser.add_argument("--freeze", default="*.word_embeddings.*")
    parser.add_argument("--data", default="text:builtin", help="training text (held-out: text:builtin's)")
    parser.add_argument("--cache", action="store_true", help="teacher cache in the run directory")
    parser.add_argument("--json", default=None, help="append the result line to this file")
    args = parser.parse_args()
    row = probe(args)
    print(json.dumps(row))
    if args.json:
        with Path(args.json).open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
