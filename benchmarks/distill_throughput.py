"""Distillation throughput: teacher-forced (block-wise) without and with the teacher activation cache,
vs end-to-end, on DeiT-Tiny with mhlstm at batch 32. Samples/s and peak memory, ratios in one run.

Samples/s are given per wall second and per CPU second of the process (on a shared machine the
second is far steadier). Each mode runs in its own subprocess so peak memory (RSS on CPU, max allocated on CUDA) is its own.
The cached mode first fills the cache with ``--distinct`` batches (one epoch), then is timed on a
second epoch that reads the teacher records from disk instead of running the teacher.

    python benchmarks/distill_throughput.py --steps 4 --threads 2          # CPU
    python benchmarks/distill_throughput.py --device cuda --steps 20       # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("blockwise", "blockwise+cache", "e2e")


def worker(mode: str, steps: int, distinct: int, batch: int, device: str, threads: int) -> dict:
    import torch

    import surgery
    from surgery.models import load_model
    from surgery.progress import NullProgress

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model("deit_tiny", random_init=True)  # weights do not change the cost
    surgery.replace_attention(model, "mhlstm")
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, 224, 224, generator=generator) for _ in range(distinct)]
    stamps: list[float] = []
    cpu: list[float] = []  # process CPU time: on a shared machine it is far steadier than wall time

    class Clock(NullProgress):
        def update(self, step, metrics):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    # untimed first epoch for the cached mode (it fills the cache); one warm-up step otherwise
    skip = distinct if mode == "blockwise+cache" else 1
    settings = {}
    if mode == "blockwise+cache":
        settings["cache"] = tempfile.mkdtemp(prefix="teacher_cache_")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    surgery.distill(None, model, data, mode="e2e" if mode == "e2e" else "blockwise", steps=skip + steps,
                    lr=1e-4, progress=Clock(), eval_batches=1, device=device, **settings)
    timed = stamps[-1] - stamps[skip - 1]
    cpu_timed = cpu[-1] - cpu[skip - 1]
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "samples_per_s": steps * batch / timed, "seconds_per_step": timed / steps,
            "samples_per_cpu_s": steps * batch / cpu_timed, "cpu_seconds_per_step": cpu_timed / steps,
            "peak_memory_mb": peak / 2 ** 20, "total_seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    parser.add_argument("--distinct", type=int, default=3, help="distinct batches (the cached epoch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/distill_throughput.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.distinct, args.batch, args.device, args.threads)))
        return
    rows = []
    for mode in MODES:
        command = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps), "--distinct",
                   str(args.distinct), "--batch", str(args.batch), "--device", args.device, "--threads",
                   str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode:16s} {rows[-1]['samples_per_s']:8.2f} samples/s  {rows[-1]['seconds_per_step']:7.2f} s/step  "
              f"{rows[-1]['cpu_seconds_per_step']:7.2f} CPU s/step  peak {rows[-1]['peak_memory_mb']:8.0f} MB",
              flush=True)
    base = rows[0]
    for row in rows:
        row["speed_vs_blockwise"] = row["samples_per_s"] / base["samples_per_s"]
        row["cpu_speed_vs_blockwise"] = row["samples_per_cpu_s"] / base["samples_per_cpu_s"]
        row["memory_vs_blockwise"] = row["peak_memory_mb"] / base["peak_memory_mb"]
    print("ratios vs teacher-forced without cache: " + ", ".join(
        f"{r['mode']} speed x{r['speed_vs_blockwise']:.2f} (CPU time x{r['cpu_speed_vs_blockwise']:.2f}) "
        f"memory x{r['memory_vs_blockwise']:.2f}" for r in rows))
    result = {"model": "deit_tiny_patch16_224 + mhlstm (random init)", "batch": args.batch, "device": args.device,
              "threads": args.threads, "timed_steps": args.steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
