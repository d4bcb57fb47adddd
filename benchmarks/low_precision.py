"""Fidelity cost and speed of float16 recurrent weights (``optimize(model, recurrent_weights="float16")``).

Run (1 thread; each part is optional):
    OMP_NUM_THREADS=1 python benchmarks/low_precision.py --minilm runs/lp-minilm \\
        --mnist runs/lp-mnist --mixer --latency --json benchmarks/results/low_precision.json

- ``--minilm RUN``: a saved all-MiniLM-L6-v2 student (``surgery replace --model minilm ...``):
  mean cosine between its sentence embeddings and the teacher's on the MiniLM recipe's held-out
  sentences of the run's training text (in domain) and on ``surgery.data.heldout_english`` (out of
  domain), with retrieval agreement (``recipes.minilm.fidelity_columns``), with float32 and with
  float16 W_hh; and the cosine between the student's own float32 and float16 embeddings.
- ``--mnist RUN``: an MNIST recipe run directory (``surgery recipe mnist --out RUN``): each
  student's (``RUN/<replacement>/stage2``, else ``stage1``) test accuracy on the 1,000 held-out
  digits with float32 and float16 W_hh, how many predictions change, the largest logit difference.
- ``--mixer``: one DeiT-T mixer's inference form alone (197 tokens, batch 1), float32 and float16
  interleaved call by call, thread CPU time (less inflated by a busy machine than wall time).
- ``--latency``: DeiT-T (224 px, batch 1, random weights: costs do not depend on the values) with
  every attention replaced, float32 and float16 copies and the original attention timed
  interleaved in one run (``surgery.measure.measure_latencies``) at ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import surgery
from surgery.fast import kernel_status, optimize


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def recurrent_weight_range(model: torch.nn.Module) -> dict:
    """Largest |W_hh| of the model's recurrent mixers and the largest change float16 rounding makes
    to one (what the fidelity cost scales with)."""
    from surgery.swap import replaced_sites

    weights = [p.detach() for wrapper in replaced_sites(model) for name, p in wrapper.mixer.named_parameters()
               if "weight_hh" in name]
    if not weights:
        return {}
    return {"w_hh_abs_max": max(float(w.abs().max()) for w in weights),
            "w_hh_rounding_max": max(float((w.half().float() - w).abs().max()) for w in weights)}


def minilm_fidelity(run: str, sentences: int) -> dict:
    """Held-out embedding fidelity of a saved MiniLM student with float32 and float16 W_hh."""
    from surgery.data import heldout_english, tokenizer_for
    from surgery.models import load_model
    from surgery.recipes.minilm import fidelity_columns, held_out_sentences, sentence_embeddings

    config = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").exists() else {}
    data = config.get("data") or "text:python"
    teacher = load_model("minilm").float().eval()
    tokenizer = tokenizer_for(teacher)
    held, ood = held_out_sentences(data, sentences), heldout_english()
    teacher_held, teacher_ood = (sentence_embeddings(teacher, tokenizer, held),
                                 sentence_embeddings(teacher, tokenizer, ood))
    student = surgery.load(run).float()
    result: dict = {"run": run, "data": data, "held_out_sentences": len(held), "ood_sentences": len(ood),
                    **recurrent_weight_range(student)}
    embeddings = {}
    for precision in ("float32", "float16"):
        optimize(student, recurrent_weights=precision)
        began = time.perf_counter()
        embeddings[precision] = (sentence_embeddings(student, tokenizer, held),
                                 sentence_embeddings(student, tokenizer, ood))
        result[precision] = {**fidelity_columns(teacher_held, embeddings[precision][0], teacher_ood,
                                                embeddings[precision][1]),
                             "seconds": round(time.perf_counter() - began, 2)}
    optimize(student)
    for name, index in (("held_out", 0), ("ood", 1)):
        a, b = embeddings["float32"][index], embeddings["float16"][index]
        result[f"float16_vs_float32_cosine_{name}"] = {"mean": float((a * b).sum(-1).mean()),
                                                       "min": float((a * b).sum(-1).min())}
    result["cost"] = {key: result["float16"][key] - result["float32"][key]
                      for key in ("embedding_cosine", "ood_cosine", "retrieval_top1", "ood_top1")}
    return result


def mnist_fidelity(run: str) -> list[dict]:
    """Test accuracy of each MNIST student in ``run`` with float32 and float16 W_hh."""
    from surgery.recipes.mnist import build_vit, load_digits

    _, _, test_x, test_y = load_digits()
    rows = []
    for student_dir in sorted(Path(run).iterdir()):
        stage = next((student_dir / s for s in ("stage2", "stage1") if (student_dir / s / "manifest.json").exists()),
                     None)
        if stage is None or student_dir.name == "teacher":
            continue
        student = surgery.load(stage, model=build_vit()).eval()
        logits = {}
        for precision in ("float32", "float16"):
            optimize(student, recurrent_weights=precision)
            with torch.inference_mode():
                logits[precision] = torch.cat([student(test_x[i:i + 250]) for i in range(0, len(test_x), 250)])
        optimize(student)
        accuracy = {p: 100.0 * float((v.argmax(-1) == test_y).float().mean()) for p, v in logits.items()}
        rows.append({"student": str(stage), "test_digits": len(test_y),
                     "accuracy_float32": accuracy["float32"], "accuracy_float16": accuracy["float16"],
                     "cost_points": accuracy["float16"] - accuracy["float32"],
                     "changed_predictions": int((logits["float32"].argmax(-1) != logits["float16"].argmax(-1)).sum()),
                     "max_logit_difference": float((logits["float32"] - logits["float16"]).abs().max()),
                     "max_abs_logit": float(logits["float32"].abs().max()), **recurrent_weight_range(student)})
    return rows


def deit_latency(replacements: list[str], repeats: int, warmup: int, threads: int) -> dict:
    """DeiT-T 224 px batch 1: float32 vs float16 W_hh (and attention), interleaved in one run."""
    import timm

    from surgery.measure import measure_latencies

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    models = {"attention": timm.create_model("deit_tiny_patch16_224").eval()}
    for replacement in replacements:
        model = timm.create_model("deit_tiny_patch16_224")
        surgery.replace_attention(model, replacement, x)
        surgery.finalize(model)
        half = copy.deepcopy(model)
        models[f"{replacement} float32"] = optimize(model)
        models[f"{replacement} float16"] = optimize(half, recurrent_weights="float16")
    with torch.inference_mode():  # the two precisions compute nearly the same logits
        for replacement in replacements:
            a, b = models[f"{replacement} float32"](x), models[f"{replacement} float16"](x)
            assert (a - b).abs().max() <= 1e-2 * a.abs().max(), replacement
    timing = measure_latencies(models, x, repeats=repeats, warmup=warmup, threads=threads)
    result = {"model": "deit_tiny_patch16_224", "image": 224, "batch": 1, "threads": threads,
              "repeats": repeats, "warmup": warmup, "timings": timing, "ratios": {}}
    for replacement in replacements:
        f32, f16 = timing[f"{replacement} float32"]["median_ms"], timing[f"{replacement} float16"]["median_ms"]
        attention = timing["attention"]["median_ms"]
        result["ratios"][replacement] = {"float16_over_float32": f16 / f32, "float32_over_attention": f32 / attention,
                                         "float16_over_attention": f16 / attention}
    return result


def mixer_cpu_time(replacements: list[str], repeats: int, tokens: int = 197, batch: int = 1) -> dict:
    """One DeiT-T mixer's inference form (width 192, 3 heads of 64, ``tokens`` tokens), float32 vs
    float16 W_hh, interleaved call by call; thread CPU time (``time.thread_time``, 1 thread), which
    a busy machine's preemption does not inflate as it does wall time."""
    from surgery.registry import MixerShape, get_replacement

    result = {"shape": "deit_tiny mixer: width 192, 3 heads x 64", "tokens": tokens, "batch": batch,
              "repeats": repeats, "clock": "thread CPU time", "replacements": {}}
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, 192)
    for replacement in replacements:
        mixer = get_replacement(replacement).build(MixerShape(192, 192, 3, False)).eval()
        forms = {precision: mixer.inference_form(recurrent_weights=precision) for precision in ("float32", "float16")}
        times: dict[str, list[float]] = {precision: [] for precision in forms}
        with torch.inference_mode():
            for form in forms.values():
                form(x)
            for round_ in range(repeats):
                for precision in (("float32", "float16") if round_ % 2 else ("float16", "float32")):
                    began = time.thread_time()
                    forms[precision](x)
                    times[precision].append(1e3 * (time.thread_time() - began))
        medians = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
        result["replacements"][replacement] = {"float32_ms": medians["float32"], "float16_ms": medians["float16"],
                                               "float16_over_float32": medians["float16"] / medians["float32"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", help="a saved MiniLM student directory")
    parser.add_argument("--sentences", type=int, default=1000, help="held-out sentences at most (in domain)")
    parser.add_argument("--mnist", help="an MNIST recipe run directory")
    parser.add_argument("--latency", action="store_true", help="time DeiT-T float32 vs float16 W_hh")
    parser.add_argument("--mixer", action="store_true",
                        help="CPU time of one DeiT-T mixer's inference form, float32 vs float16 W_hh")
    parser.add_argument("--replacements", nargs="+", default=["mhlstm", "gru"], help="for --latency and --mixer")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    status = kernel_status()
    result: dict = {"command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv), "kernel": status,
                    "half_weights_in_kernel": bool(status["available"]
                                                   and surgery.replacements.native.load_kernel().half_weights),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                    "threads": args.threads, "load_average_before": _load_average()}
    if args.minilm:
        result["minilm"] = minilm_fidelity(args.minilm, args.sentences)
        print(json.dumps(result["minilm"], indent=1), flush=True)
    if args.mnist:
        result["mnist"] = mnist_fidelity(args.mnist)
        print(json.dumps(result["mnist"], indent=1), flush=True)
    if args.latency:
        result["latency"] = deit_latency(args.replacements, args.repeats, args.warmup, args.threads)
        print(json.dumps(result["latency"]["ratios"], indent=1), flush=True)
    if args.mixer:
        result["mixer"] = mixer_cpu_time(args.replacements, max(args.repeats, 50))
        print(json.dumps(result["mixer"]["replacements"], indent=1), flush=True)
    result["load_average_after"] = _load_average()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
