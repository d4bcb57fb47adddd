"""Per-token greedy decode latency and state memory: replaced causal LMs vs the original with its KV cache.

For each model shape: the original (its KV cache) and, built from a copy, the same model with its
attention replaced at every layer (``--layers`` keeps fewer layers in both; ``surgery.replace_attention``
+ ``surgery.finalize``), decoding with the model's own cache (``surgery.decoding``). For each
context length both are prefilled once with the same prompt at batch 1; each batch size then
decodes from a copy of that cache repeated to the batch (``batch_repeat_interleave``: rows are
copies of the prompt, which costs a decode step exactly what different rows would). ``--steps``
greedy steps are timed one token at a time with ``surgery.decoding.time_steps`` (the same code
the causal-LM recipe reports with), every (model, context) pair taking its turn at each step, so
load on the machine hits the original and the replaced model, and every context, alike: both the
ratio and the flatness over context are measured in one interleaved run. Medians are reported with the ratio replaced /
original. Memory: bytes of the original's keys and values after the prompt vs bytes of the
replaced sites' states.

The floor (``no mixer (floor)``, on unless ``--no-floor``): the original with every attention module
returning zeros, everything else identical (embeddings, norms, MLPs, LM head, the model's Python),
decoded the same way in the same interleaved loop (after an 8-token prompt: its cache stays empty, so
the context does not change its step): the per-token cost no replacement can go below.
``floor_ratio`` = floor / original per context says which ratio a shape can reach at all: a
replacement's ratio is ``floor_ratio`` plus what its own step costs relative to the original.

Shapes: ``gpt2`` (GPT-2 small: 12 layers, width 768, 12 heads, vocabulary 50257), ``llama`` (a
Llama-style 1024-wide model: 16 query / 4 KV heads, SwiGLU 2816, vocabulary 32000, 8 layers),
``smollm2`` (the real SmolLM2-135M-Instruct config: 30 layers, width 576, 9 query / 3 KV heads,
vocabulary 49152; ``--weights real`` loads its real weights through the ``smollm2`` model spec).
Random weights cost the same per token as real ones.

``--profile`` adds, per shape, one breakdown of a decode step at the first context (batch 1):
time in the token mixers (attention or replaced site, incl. cache plumbing), the replacement's
own step, the MLPs, norms, the LM head, and the rest (the model's Python: masks, positions,
residuals, HF's output objects).

Run (about 25 minutes on the 2-core build machine at load average ~8, 1 thread; ~11 GB of memory
for the batch-8 caches at every context at once):
    python benchmarks/decode.py --shapes smollm2 gpt2 --weights real --profile \
        --json benchmarks/results/decode_full.json --plot docs/img/decode.png
The floor at 2048 / 8192 tokens for the real SmolLM2 and the built-in Llama shape (20 minutes at load ~6):
    OMP_NUM_THREADS=1 python benchmarks/decode.py --shapes smollm2 llama --weights real \
        --contexts 2048 8192 --batch 1 --profile --json benchmarks/results/decode_floor.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.cli.common import parse_settings  # noqa: E402
from surgery.decoding import prefill, time_steps  # noqa: E402

DEPTH = {"gpt2": 12, "llama": 8, "smollm2": 30}
FLOOR = "no mixer (floor)"


class NoMixer(torch.nn.Module):
    """The floor's token mixer: zeros in place of the attention output, no cache entry (the block
    still adds its residual, so every other module runs exactly as in the original)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def floor_model(original: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``original`` whose attention modules (Llama ``self_attn``, GPT-2 ``attn``) return zeros."""
    floor = copy.deepcopy(original)
    swapped = 0
    for module in list(floor.modules()):
        for name in ("self_attn", "attn"):
            if isinstance(getattr(module, name, None), torch.nn.Module) and not isinstance(module, NoMixer):
                setattr(module, name, NoMixer())
                swapped += 1
    if swapped != floor.config.num_hidden_layers:
        raise SystemExit(f"the floor swapped {swapped} attention modules, expected one per layer "
                         f"({floor.config.num_hidden_layers})")
    return floor


def build(shape: str, layers: int | None, context: int, vocab: int | None = None, weights: str = "random"):
    """The original model of a shape, in eval mode, float32, SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    layers = layers or DEPTH[shape]
    if shape == "gpt2":  # GPT-2 small widths (768, 12 heads)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab or 50257, n_embd=768, n_head=12, n_layer=layers,
                                          n_positions=context, attn_implementation="sdpa")).eval()
    if shape == "llama":  # Llama-shaped: GQA (16 query heads, 4 KV heads), rotary, SwiGLU
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab or 32000, hidden_size=1024, intermediate_size=2816,
                                            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                            max_position_embeddings=context, attn_implementation="sdpa")).eval()
    if shape == "smollm2":
        from surgery.gguf import dequantised_dir, smollm2_gguf

        directory = dequantised_dir(smollm2_gguf(), "smollm2", log=lambda line: print(line, file=sys.stderr))
        config = AutoConfig.from_pretrained(str(directory))
        config._attn_implementation = "sdpa"
        if vocab:
            config.vocab_size = vocab
        if weights == "real" and not vocab:
            model = AutoModelForCausalLM.from_pretrained(str(directory), config=config, dtype=torch.float32)
            if layers < config.num_hidden_layers:  # keep the first layers (the cost is what is read)
                model.model.layers = model.model.layers[:layers]
                model.config.num_hidden_layers = layers
            return model.eval()
        config.num_hidden_layers = layers
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    raise SystemExit(f"unknown shape {shape!r}; use gpt2, llama or smollm2")


# ---------------------------------------------------------------------------------- profiling

def _profile(models: dict[str, torch.nn.Module], prompt: torch.Tensor, steps: int, replacement: str) -> dict:
    """Where a decode step's time goes, per model: forward hooks clock the mixers, MLPs, norms and LM
    head; the replacement's own ``DecodingForm.step`` is clocked inside its site; the rest is the
    model's Python around them."""
    from surgery.registry import get_replacement

    form = get_replacement(replacement).decoding
    result = {}
    for name, model in models.items():
        spent: dict[str, float] = {}
        began: dict[int, float] = {}
        handles = []

        def classify(module_name: str, module: torch.nn.Module) -> str | None:
            last = module_name.rpartition(".")[2]
            if getattr(module, "is_replaced_site", False) or last in ("self_attn", "attn"):
                return "mixer (site)"
            if last == "mlp":
                return "mlp"
            if last in ("input_layernorm", "post_attention_layernorm", "norm", "ln_1", "ln_2", "ln_f"):
                return "norms"
            if last == "lm_head":
                return "lm head"
            if last in ("embed_tokens", "wte", "wpe"):
                return "embeddings"
            return None

        for module_name, module in model.named_modules():
            kind = classify(module_name, module)
            if kind is None:
                continue

            def before(mod, args, kwargs, key=id(module)):
                began[key] = time.perf_counter()

            def after(mod, args, kwargs, output, key=id(module), kind=kind):
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - began.pop(key)

            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        original_step = form.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original_step(*args, **kwargs)
            finally:
                spent["replacement step"] = spent.get("replacement step", 0.0) + time.perf_counter() - start

        form.step = timed_step
        # the recurrent step re-checks its packed weights on every call (replacements/recurrence.py;
        # the installed module, the one the step's globals read)
        import surgery.replacements.recurrence as recurrence

        original_pack = recurrence._step_form

        def timed_pack(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original_pack(*args, **kwargs)
            finally:
                spent["  of which packed-weight check"] = spent.get("  of which packed-weight check", 0.0) + \
                    time.perf_counter() - start

        recurrence._step_form = timed_pack
        try:
            state = prefill(model, prompt)
            time_steps({name: model}, {name: state}, 2)  # warm-up (the recurrent step packs its weights once)
            spent.clear()
            start = time.perf_counter()
            row = time_steps({name: model}, {name: state}, steps)[name]
            total = time.perf_counter() - start
        finally:
            del form.step  # back to the class's method
            recurrence._step_form = original_pack
            for handle in handles:
                handle.remove()
        counted = sum(v for k, v in spent.items() if k not in ("replacement step", "  of which packed-weight check"))
        per_step = {k: round(1000 * v / steps, 3) for k, v in sorted(spent.items())}
        per_step["rest (model Python, masks, positions, outputs)"] = round(1000 * (total - counted) / steps, 3)
        result[name] = {"ms_per_step_mean": round(1000 * total / steps, 3), "median_ms": row["ms_per_token"],
                        "breakdown_ms": per_step}
        print(json.dumps({"profile": name, **result[name]}), flush=True)
    return result


# ---------------------------------------------------------------------------------- the run

def measure(shape: str, replacement: str, layers: int | None, contexts: list[int], batches: list[int], steps: int,
            vocab: int | None, weights: str, profile: bool, floor: bool = True,
            settings: dict | None = None) -> tuple[list[dict], dict | None]:
    torch.manual_seed(0)
    original = build(shape, layers, max(contexts) + steps + 8, vocab, weights)
    replaced = copy.deepcopy(original)
    vocab = original.config.vocab_size
    began = time.perf_counter()
    surgery.replace_attention(replaced, replacement, {"input_ids": torch.randint(0, vocab, (1, 8))},
                              config=settings or None)
    surgery.finalize(replaced)
    print(f"# {shape}: {original.config.num_hidden_layers} layers replaced with {replacement} in "
          f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    models = {"attention": original, replacement: replaced}
    profiled = _profile(models, torch.randint(0, vocab, (1, contexts[0])), steps, replacement) if profile else None
    if floor:
        models[FLOOR] = floor_model(original)
    rows = []
    prefilled, keyed = {}, {}
    for context in contexts:  # one batch-1 prefill per context and model, kept for every batch size
        prompt = torch.randint(0, vocab, (1, context))
        for name, model in models.items():
            # the floor keeps nothing in its cache, so a step costs it the same after any prompt: a
            # short one spares a long prefill
            prefilled[f"{name}@{context}"] = prefill(model, prompt[:, :8] if name == FLOOR else prompt)
            keyed[f"{name}@{context}"] = model
        seconds = ", ".join(f"{name} {prefilled[f'{name}@{context}']['prefill_s']:.1f} s" for name in models)
        print(f"# {shape}: prefilled {context} tokens ({seconds})", file=sys.stderr, flush=True)
    for batch in batches:
        # every context and both models take turns at each step: load hits all of them alike
        timed = time_steps(keyed, prefilled, steps, batch)
        load_now = round(os.getloadavg()[0], 2)
        for context in contexts:
            a, r = timed[f"attention@{context}"], timed[f"{replacement}@{context}"]
            row = {"shape": shape, "weights": weights if shape == "smollm2" else "random",
                   "layers": original.config.num_hidden_layers, "vocab": vocab, "replacement": replacement,
                   "context": context, "batch": batch, "steps": steps,
                   "ms_per_token_attention": a["ms_per_token"], f"ms_per_token_{replacement}": r["ms_per_token"],
                   "latency_ratio": round(r["ms_per_token"] / a["ms_per_token"], 3),
                   "memory_bytes_attention_kv": a["kv_bytes"], f"memory_bytes_{replacement}_state": r["state_bytes"],
                   "prefill_s_attention": a["prefill_s"], f"prefill_s_{replacement}": r["prefill_s"],
                   "loadavg_1min": load_now}
            if floor:
                f = timed[f"{FLOOR}@{context}"]
                row.update(ms_per_token_floor=f["ms_per_token"],
                           floor_ratio=round(f["ms_per_token"] / a["ms_per_token"], 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
        del timed
        gc.collect()
    return rows, profiled


def plot(rows: list[dict], replacement: str, path: Path, load: str) -> None:
    """ms/token vs context, one panel per batch size: each shape's original (dashed) and replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for index, shape in enumerate(dict.fromkeys(r["shape"] for r in rows)):
            chosen = sorted((r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["context"])
            if not chosen:
                continue
            label = f"{shape} ({chosen[0]['layers']} layers{', real' if chosen[0]['weights'] == 'real' else ''})"
            x = [r["context"] for r in chosen]
            colour = f"C{index}"
            axis.plot(x, [r["ms_per_token_attention"] for r in chosen], "--o", color=colour, label=f"{label}: attention + KV")
            axis.plot(x, [r[f"ms_per_token_{replacement}"] for r in chosen], "-s", color=colour,
                      label=f"{label}: {replacement} state")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("ms per token (median)")
        axis.set_title(f"greedy decode, batch {batch}")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"1 thread, 2-core CPU, load average {load}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def print_table(rows: list[dict], replacement: str) -> None:
    """ms/token of the original, the replaced model and the floor, and both ratios, one line per row."""
    print(f"{'shape':10} {'context':>7} {'batch':>5} {'attention':>10} {replacement:>10} {'floor':>10} "
          f"{'replaced/orig':>13} {'floor/orig':>10}")
    for r in rows:
        floor = r.get("ms_per_token_floor")
        print(f"{r['shape']:10} {r['context']:7d} {r['batch']:5d} {r['ms_per_token_attention']:10.1f} "
              f"{r[f'ms_per_token_{replacement}']:10.1f} {'-' if floor is None else f'{floor:.1f}':>10} "
              f"{r['latency_ratio']:13.3f} {r.get('floor_ratio', float('nan')):10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "gpt2"], choices=sorted(DEPTH))
    parser.add_argument("--weights", choices=["random", "real"], default="random",
                        help="smollm2 only: real = the real SmolLM2-135M-Instruct weights (the smollm2 spec)")
    parser.add_argument("--replacement", default="mhlstm")
    parser.add_argument("--layers", type=int, default=None, help="layers kept (default: every layer of the shape)")
    parser.add_argument("--contexts", "--lengths", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: the shape's); smaller = the LM head weighs less")
    parser.add_argument("--profile", action="store_true", help="break one decode step down per module kind")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="leave out the floor (every attention returning zeros)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the replacement's config (e.g. --set window=16 --set kv_heads=3)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="write ms/token vs context to this PNG")
    parser.add_argument("--plot-only", default=None, metavar="JSON", help="only plot the rows of an earlier --json")
    args = parser.parse_args()
    if args.plot_only:
        rows = json.loads(Path(args.plot_only).read_text())["rows"]
        loads = [r["loadavg_1min"] for r in rows]
        plot(rows, rows[0]["replacement"], Path(args.plot or "decode.png"),
             f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})")
        return
    torch.set_num_threads(args.threads)
    load, began = os.getloadavg(), time.time()
    rows, profiles = [], {}
    result = {"command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]), "threads": args.threads,
              "loadavg_before": [round(v, 2) for v in load], "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "torch": torch.__version__, "settings": parse_settings(args.set),
              "rows": rows, "profile": profiles}
    for shape in args.shapes:
        shape_rows, profiled = measure(shape, args.replacement, args.layers, args.contexts, args.batch, args.steps,
                                       args.vocab, args.weights, args.profile, args.floor,
                                       settings=parse_settings(args.set))
        rows += shape_rows
        if profiled:
            profiles[shape] = profiled
        result.update(loadavg_after=[round(v, 2) for v in os.getloadavg()], wall_s=round(time.time() - began))
        if args.json:  # after every shape: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, args.replacement)
    if args.plot:
        loads = [r["loadavg_1min"] for r in rows]
        plot(rows, args.replacement, Path(args.plot), f"{min(loads):.1f}-{max(loads):.1f} (median "
             f"{statistics.median(loads):.1f})")


if __name__ == "__main__":
    main()
