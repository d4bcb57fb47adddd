"""CPU latency and throughput of DeiT-T/S with each replacement against the original attention, timed in one run.

Run: python benchmarks/latency.py [--quick] [--models deit_tiny deit_small] [--threads 2]
     [--configs 224x1 384x1 512x1 224x8 224x32] [--repeats 9] [--json benchmarks/results/latency.json]

One configuration = image size x batch. For each model and image size every variant is built from the
same random-init original (latency does not depend on the weights); for each configuration all
variants are timed together by ``surgery.measure.measure_latencies``: interleaved rounds in rotating
order, medians, eval mode under ``torch.inference_mode``, fixed intra-op threads. Ratios are variant /
attention from the same run, so they hold on a busy machine even when the absolute milliseconds drift.

Variants: ``attention`` (timm's own), each replacement as eval mode runs it after
``replace_attention`` + ``finalize`` (``mhlstm``/``gru``/``conv``: their inference forms; ``linear``:
its one form), ``conv (reference form)`` at 224 px batch 1 (what the inference form saves), ``mhlstm
pruned`` (``surgery.prune`` at ``--prune-ratio``, magnitude importance on random weights, global over
recurrent hidden units and MLP channels), and ``no mixer``: every attention block replaced by a
module that returns zeros — the floor no replacement can go below, since everything else (patch
embedding, norms, MLPs, head) is unchanged.

Besides the whole model each configuration times block 0's mixer alone (attention module vs the
replaced site, reused output projection included) on that block's real input: ``mixer ratio``.

Writes the JSON after every configuration (a run stopped early keeps what it measured) and prints a
markdown table ready for docs/choosing-a-replacement.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import timm
import torch
from torch import nn

import surgery
from surgery.fast import ReferenceForms, kernel_status
from surgery.measure import count_flops, measure_latencies

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
REPLACEMENTS = ("mhlstm", "gru", "conv", "linear")
DEFAULT_CONFIGS = ("224x1", "384x1", "512x1", "224x8", "224x32")


class NoMixer(nn.Module):
    """Stands where attention was and returns zeros: the model's cost without any token mixing."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)


def variants(name: str, size: int, prune_ratio: float) -> dict[str, tuple[nn.Module, nn.Module]]:
    """label -> (model to time, model to count FLOPs on: the same model; its tracer runs the reference form)."""
    torch.manual_seed(0)
    original = timm.create_model(name, img_size=size).eval()
    x = torch.randn(1, 3, size, size)
    out = {"attention": (original, original)}
    for replacement in REPLACEMENTS:
        replaced = copy.deepcopy(original)
        surgery.replace_attention(replaced, replacement, x)
        surgery.finalize(replaced)
        replaced.eval()  # the only call: eval mode runs each replacement's inference form by itself
        out[replacement] = (replaced, replaced)
        if replacement == "conv" and size == 224:
            out["conv (reference form)"] = (ReferenceForms(replaced), replaced)
    if prune_ratio:
        pruned = copy.deepcopy(original)
        surgery.replace_attention(pruned, "mhlstm", x)
        surgery.prune(pruned, x, ratio=prune_ratio, measure_flops=False)
        surgery.finalize(pruned)
        out[f"mhlstm pruned {prune_ratio}"] = (pruned.eval(), pruned)
    floor = copy.deepcopy(original)
    for block in floor.blocks:
        block.attn = NoMixer()
    out["no mixer (floor)"] = (floor, floor)
    return out


def first_mixer(model: nn.Module) -> nn.Module:
    """Block 0's token mixer (timm ``attn``), through ``ReferenceForms`` when wrapped."""
    inner = model.model if isinstance(model, ReferenceForms) else model
    mixer = inner.blocks[0].attn
    return ReferenceForms(mixer) if isinstance(model, ReferenceForms) else mixer


def block_input(original: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What block 0's attention sees: norm1 of the embedded tokens."""
    with torch.inference_mode():
        tokens = original.norm_pre(original._pos_embed(original.patch_embed(x)))
        return original.blocks[0].norm1(tokens).clone()


def parse_config(text: str) -> tuple[int, int]:
    size, _, batch = text.partition("x")
    try:
        return int(size), int(batch or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIZExBATCH (e.g. 224x8)") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        help="image size x batch, e.g. 224x1 512x1 224x32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per configuration (batch 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (a first look; noisy)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "latency.json"),
                        help="where the rows go (written after every configuration)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    status = kernel_status()
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "native_kernel": status,
            "command": "python benchmarks/latency.py " + " ".join(_argv()),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    rows: list[dict] = []
    began = time.time()
    for alias in args.models:
        for size in sorted({s for s, _ in args.configs}):
            built = variants(MODELS[alias], size, args.prune_ratio)
            flops = {label: count_flops(counted, torch.randn(1, 3, size, size)) for label, (_, counted) in built.items()}
            for batch in [b for s, b in args.configs if s == size]:
                rows.extend(_measure(alias, size, batch, built, flops, args))
                meta["seconds"] = round(time.time() - began)
                meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
                _write(args.json, meta, rows)
    print(markdown(meta, rows))
    print(f"wrote {args.json}")


def _measure(alias: str, size: int, batch: int, built: dict, flops: dict, args) -> list[dict]:
    started = time.time()
    load_before = os.getloadavg()
    x = torch.randn(batch, 3, size, size)
    # big batches: fewer rounds (each is long; the spread shrinks with the work per call)
    repeats = max(3, args.repeats // 2) if batch >= 8 and not args.quick else args.repeats
    timing = measure_latencies({k: v[0] for k, v in built.items()}, x, repeats=repeats, warmup=args.warmup,
                               threads=args.threads)
    hidden = block_input(built["attention"][0], x)
    mixers = {k: first_mixer(v[0]) for k, v in built.items() if not k.startswith("no mixer")}
    mixer_timing = measure_latencies(mixers, hidden, repeats=max(repeats, 15), warmup=args.warmup,
                                     threads=args.threads)
    load_after = os.getloadavg()
    base, mixer_base = timing["attention"]["median_ms"], mixer_timing["attention"]["median_ms"]
    rows = []
    for label, (_, counted) in built.items():
        t = timing[label]
        mixer = mixer_timing.get(label)
        rows.append({
            "model": alias, "size": size, "batch": batch, "tokens": (size // 16) ** 2 + 1, "variant": label,
            "params": surgery.count_parameters(counted), "gmacs": round(flops[label] * batch / 1e9, 3),
            "median_ms": round(t["median_ms"], 2), "p25_ms": round(t["p25_ms"], 2), "p75_ms": round(t["p75_ms"], 2),
            "ratio": round(t["median_ms"] / base, 3),
            "images_per_s": round(batch * 1e3 / t["median_ms"], 1),
            "mixer_median_ms": None if mixer is None else round(mixer["median_ms"], 3),
            "mixer_ratio": None if mixer is None else round(mixer["median_ms"] / mixer_base, 3),
            "repeats": repeats, "threads": t["threads"],
            "load_average_before": round(load_before[0], 2), "load_average_after": round(load_after[0], 2),
        })
    print(f"# {alias} {size}px batch {batch}: {time.time() - started:.0f} s, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}: " + ", ".join(f"{r['variant']} {r['ratio']:.2f}x" for r in rows), flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    """The rows as the docs' table (one per model, size and batch; ratios to attention in the same run)."""
    lines = [f"torch {meta['torch']}, {meta['threads']} threads, {meta['repeats']} interleaved rounds "
             f"(half at batch >= 8), {meta['cpu_count']} CPUs, load average {meta['load_average_start'][0]} at the "
             f"start, {meta.get('load_average_end', ['?'])[0]} at the end, native kernel: "
             f"{meta['native_kernel']['available']}",
             "", "| model | px | batch | variant | params | GMACs | median ms (p25-p75) | vs attention "
             "| img/s | mixer alone vs attention |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"deit_tiny": "DeiT-T", "deit_small": "DeiT-S"}
    for r in rows:
        mixer = "" if r["mixer_ratio"] is None else f"{r['mixer_ratio']:.2f}x"
        speed = f"{r['images_per_s']:.1f}" if r["batch"] > 1 else ""
        lines.append(f"| {names.get(r['model'], r['model'])} | {r['size']} | {r['batch']} | {r['variant']} "
                     f"| {r['params'] / 1e6:.2f}M | {r['gmacs']} | {r['median_ms']} ({r['p25_ms']}-{r['p75_ms']}) "
                     f"| {r['ratio']:.2f}x | {speed} | {mixer} |")
    return "\n".join(lines)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _write(path: str, meta: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
