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
    recurrent_weights: Annotated[str, typer.Option(
        "--recurrent-weights", help="Precision of the mhlstm/gru recurrent weights W_hh in the fast form: float32 "
        "(exact) or float16 (opt-in; see surgery.fast.optimize).")] = "float32",
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
    from surgery.fast import check_recurrent_weights

    if check_recurrent_weights(recurrent_weights) != "float32" and not fast:
        raise SurgeryError(f"--recurrent-weights {recurrent_weights} sets the fast form's precision; "
                           "--no-fast times the reference form: drop one of them")
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
    if recurrent_weights != "float32":
        from surgery.fast import optimize

        optimize(candidate, recurrent_weights=recurrent_weights)
    counted = candidate
    if not fast:  # the inference form is the default in eval mode; --no-fast times the reference form
        from surgery.fast import ReferenceForms

        candidate = ReferenceForms(candidate)
    from surgery.inputs import default_example_inputs

    rows: list[dict[str, Any]] = []

    def add(metric: str, before: float, after: float, unit: str, batch_size: int | None = None) -> None:
        rows.append({"metric": metric, "batch": batch_size, "original": before, "candidate": after,
                     "ratio": after / before if before else None, "unit": unit})

    first = _at_batch(default_example_inputs(counted, batch=batches[0]), batches[0])
    _check_same_inputs(original, candidate, first, label, reference_spec)
    add("params", measure.count_parameters(original), measure.count_parameters(counted), "count")
    if flops:
        add("flops", measure.count_flops(original, first), measure.count_flops(counted, first), "MAC",
            batches[0])
    add("parameter_memory", measure.parameter_bytes(original), measure.parameter_bytes(counted), "bytes")
    for size in batches:
        inputs = _at_batch(default_example_inputs(counted, batch=size), size)
        timing = measure.measure_latencies({"original": original, "candidate": candidate}, inputs,
                                           repeats=repeats, warmup=warmup, threads=threads)
        add("latency_median", timing["original"]["median_ms"], timing["candidate"]["median_ms"], "ms", size)
        add("latency_p25", timing["original"]["p25_ms"], timing["candidate"]["p25_ms"], "ms", size)
        add("latency_p75", timing["original"]["p75_ms"], timing["candidate"]["p75_ms"], "ms", size)
        if size > 1:  # samples per second from the medians (higher is better: the ratio is above 1)
            add("throughput", size * 1e3 / timing["original"]["median_ms"],
                size * 1e3 / timing["candidate"]["median_ms"], "samples/s", size)
        if memory:
            before = measure.peak_memory(original, inputs, threads=threads)
            after = measure.peak_memory(candidate, inputs, threads=threads)
            add("activation_memory", before["activation_bytes"], after["activation_bytes"], "bytes", size)
    import torch

    used_threads = threads or torch.get_num_threads()
    info = {"candidate": label, "original": reference_spec, "threads": used_threads, "repeats": repeats,
            "fast": fast, "recurrent_weights": recurrent_weights, "kernel": _kernel_info(fast),
            "torch": torch.__version__}
    if json_output:
        print_json({**info, "rows": rows})
        return
    print_table(f"{label} vs {reference_spec} ({used_threads} threads, {repeats} interleaved repeats"
                f"{', fast form' if fast else ', reference form'}"
                f"{'' if recurrent_weights == 'float32' else f', {recurrent_weights} recurrent weights'}"
                "; ratio = value / original)",
                ["metric", "batch", "value", "original", "ratio"], ratio_table(rows))


def ratio_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as the printed table: one latency row per batch (median, quartiles in brackets).

    Example:
        >>> ratio_table([{"metric": "params", "batch": None, "original": 2e6, "candidate": 1e6,
        ...               "ratio": 0.5, "unit": "count"}])
        [['params', '', '1.00M', '2.00M', '0.50x']]
    """
    quartiles = {(r["metric"], r["batch"]): r for r in rows if r["metric"] in ("latency_p25", "latency_p75")}
    names = {"params": "params", "flops": "MACs", "parameter_memory": "weights memory",
             "latency_median": "latency (p25-p75)", "throughput": "throughput", "activation_memory": "activation memory"}
    table = []
    for r in rows:
        if r["metric"] not in names:
            continue
        value, before = _format(r["candidate"], r["unit"]), _format(r["original"], r["unit"])
        if r["metric"] == "latency_median":
            low, high = quartiles.get(("latency_p25", r["batch"])), quartiles.get(("latency_p75", r["batch"]))
            if low is not None and high is not None:
                value += f" ({low['candidate']:.2f}-{high['candidate']:.2f})"
                before += f" ({low['original']:.2f}-{high['original']:.2f})"
        table.append([names[r["metric"]], "" if r["batch"] is None else str(r["batch"]), value, before,
                      "" if r["ratio"] is None else f"{r['ratio']:.2f}x"])
    return table


def _at_batch(inputs: Any, size: int) -> Any:
    """``inputs`` with ``size`` rows: a model's own ``example_inputs()`` has a fixed batch, so every
    tensor with that leading size is repeated (or cut) to ``size`` rows; timm/HF inputs already fit."""
    import torch

    from surgery.errors import SurgeryError
    from surgery.inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None:
        raise SurgeryError("the example inputs hold no batched tensor, so --batch cannot be applied; "
                           "give the model an example_inputs() that returns tensors")
    rows = first.shape[0]
    if rows == size:
        return args, kwargs
    index = torch.arange(size, device=first.device) % rows

    def fit(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value[index]
        return value

    return tuple(fit(a) for a in args), {k: fit(v) for k, v in kwargs.items()}


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
    """A value with a unit scaled to its size (a tiny test model and DeiT-B both read well)."""
    if unit == "count":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}k"
    if unit == "MAC":
        return f"{value / 1e9:.3f} G" if value >= 1e8 else f"{value / 1e6:.3f} M"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    if unit == "samples/s":
        return f"{value:.1f}/s"
    return f"{value:.2f} ms"
