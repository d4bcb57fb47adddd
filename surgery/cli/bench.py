"""CLI command ``bench``: params, FLOPs, latency and peak memory of a model against its original."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.cli.common import (
    AllowCodeOption, JsonOption, PluginOption, console, err_console, guarded, load_plugins, print_json,
    print_table,
)


def register(app: typer.Typer) -> None:
    app.command("bench")(guarded(bench_command))


def bench_command(
    run_or_model: Annotated[str, typer.Argument(
        metavar="RUN_OR_MODEL", help="A saved model directory, or a model spec (e.g. deit_small).")],
    vs: Annotated[Optional[str], typer.Option(
        "--vs", help="The model to compare against (default: the saved run's source model).")] = None,
    batch: Annotated[Optional[list[int]], typer.Option(
        "--batch", "-b", help="Batch size to time (repeatable; default 1).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed rounds per batch size (interleaved; medians).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 2,
    threads: Annotated[Optional[int], typer.Option(
        help="torch intra-op threads while timing (default: torch's current setting).")] = None,
    fast: Annotated[bool, typer.Option(
        "--fast/--no-fast", help="Time the replacements' inference form (what eval mode runs) or, with --no-fast, "
        "their reference form (mhlstm/gru: one nn.LSTM/GRU per head).")] = True,
    flops: Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs (fvcore, 1 flop = 1 MAC).")] = True,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak activation memory.")] = True,
    allow_code: AllowCodeOption = False,
    plugin: PluginOption = None,
    json_output: JsonOption = False,
) -> None:
    """Compare a replaced/pruned model with its original: params, FLOPs, latency, peak memory.

    Both models are timed in the same process, interleaved, with fixed threads: ratios hold on a
    busy machine. The original is built with random weights (costs do not depend on the values).
    """
    load_plugins(plugin)
    from surgery import measure
    from surgery.errors import SurgeryError
    from surgery.swap import finalize

    batches = sorted(set(batch or [1]))
    if any(b < 1 for b in batches) or repeats < 1 or warmup < 0:
        raise SurgeryError("--batch and --repeats must be >= 1 and --warmup >= 0")
    candidate, label, source = _load_candidate(run_or_model, allow_code)
    reference_spec = vs or source
    if not reference_spec:
        raise SurgeryError(f"{run_or_model} names no source model; pass --vs MODEL")
    if vs and source and _canonical(vs) != _canonical(source):
        err_console.print(f"note: {label} was made from {source}, compared with {vs}", highlight=False,
                          soft_wrap=True)
    from surgery.models import load_model

    if reference_spec.startswith("py:") and not allow_code:
        raise SurgeryError(f"the model to compare with, {reference_spec!r}, would import and run code; "
                           "pass --allow-code if you trust it")
    original = load_model(reference_spec, random_init=True)
    finalize(candidate)
    counted = candidate
    if not fast:  # the inference form is the default in eval mode; --no-fast times the reference form
        from surgery.fast import ReferenceForms

        candidate = ReferenceForms(candidate)
    from surgery.inputs import default_example_inputs

    rows: list[dict[str, Any]] = []

    def add(metric: str, before: float, after: float, unit: str, batch_size: int | None = None) -> None:
        rows.append({"metric": metric, "batch": batch_size, "original": before, "candidate": after,
                     "ratio": after / before if before else None, "unit": unit})

    first = default_example_inputs(counted, batch=batches[0])
    _check_same_inputs(original, candidate, first, label, reference_spec)
    add("params", measure.count_parameters(original), measure.count_parameters(counted), "count")
    if flops:
        add("flops", measure.count_flops(original, first), measure.count_flops(counted, first), "MAC",
            batches[0])
    for size in batches:
        inputs = default_example_inputs(counted, batch=size)
        timing = measure.measure_latencies({"original": original, "candidate": candidate}, inputs,
                                           repeats=repeats, warmup=warmup, threads=threads)
        add("latency_median", timing["original"]["median_ms"], timing["candidate"]["median_ms"], "ms", size)
        add("latency_p25", timing["original"]["p25_ms"], timing["candidate"]["p25_ms"], "ms", size)
        add("latency_p75", timing["original"]["p75_ms"], timing["candidate"]["p75_ms"], "ms", size)
        if memory:
            before = measure.peak_memory(original, inputs, threads=threads)
            after = measure.peak_memory(candidate, inputs, threads=threads)
            add("activation_memory", before["activation_bytes"], after["activation_bytes"], "bytes", size)
    import torch

    used_threads = threads or torch.get_num_threads()
    info = {"candidate": label, "original": reference_spec, "threads": used_threads, "repeats": repeats,
            "fast": fast, "kernel": _kernel_info(fast)}
    if json_output:
        print_json({**info, "rows": rows})
        return
    print_table(f"{label} vs {reference_spec} ({used_threads} threads, {repeats} interleaved repeats"
                f"{', fast form' if fast else ''})", ["metric", "batch", "original", "candidate", "ratio"],
                [[r["metric"], "" if r["batch"] is None else str(r["batch"]), _format(r["original"], r["unit"]),
                  _format(r["candidate"], r["unit"]), "" if r["ratio"] is None else f"{r['ratio']:.2f}x"]
                 for r in rows])


def _canonical(spec: str) -> str:
    from surgery.models import ALIASES

    return ALIASES.get(spec, spec)


def _load_candidate(run_or_model: str, allow_code: bool) -> tuple[Any, str, str | None]:
    """(model, label, source spec) from a saved directory or a model spec."""
    from surgery.checkpoint import MANIFEST, SOURCE_ATTRIBUTE, load
    from surgery.errors import ManifestError

    path = Path(run_or_model)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise ManifestError(f"{path} is not a saved model directory (no {MANIFEST}); "
                                "pass a directory written by `surgery replace`/`distill`/`prune`")
        model = load(path, allow_code=allow_code)
        return model, str(path), getattr(model, SOURCE_ATTRIBUTE, None)
    if path.exists() or ("/" in run_or_model and not run_or_model.startswith(("hf:", "py:"))):
        raise ManifestError(f"{run_or_model} is not a saved model directory; pass a directory written "
                            "by `surgery replace`/`distill`/`prune`, or a model name")
    from surgery.models import load_model

    return load_model(run_or_model, random_init=True), run_or_model, run_or_model


def _check_same_inputs(original: Any, candidate: Any, inputs: Any, label: str, reference: str) -> None:
    import torch

    from surgery.errors import SurgeryError
    from surgery.inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    try:
        with torch.inference_mode():
            original.eval()(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure means the two models don't match
        raise SurgeryError(f"{label} and --vs {reference} do not take the same inputs "
                           f"({type(error).__name__}); compare a run with the model it was made from") from None


def _kernel_info(fast: bool) -> dict | None:
    if not fast:
        return None
    from surgery.fast import kernel_status

    return kernel_status()


def _format(value: float, unit: str) -> str:
    if unit == "count":
        return f"{value / 1e6:.2f}M"
    if unit == "MAC":
        return f"{value / 1e9:.3f} G"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.2f} ms"
