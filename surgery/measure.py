"""Measuring models: parameters, FLOPs (MACs), CPU/GPU latency and peak memory, and side-by-side
comparisons where the original and the candidate are timed in the same run, interleaved.

Latency on a shared machine drifts by several times between runs; a ratio is only meaningful when
both models are timed in the same process, in alternating order, and summarised by medians. That is
what ``compare`` and ``measure_latencies`` do.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from surgery.inputs import as_args_kwargs
from surgery.registry import registered_flop_handles, traced_sizes
from surgery.swap import count_parameters

__all__ = [
    "compare",
    "count_flops",
    "count_parameters",
    "measure_latency",
    "measure_latencies",
    "peak_memory",
]


# ----------------------------------------------------------------------------------------- FLOPs

def _sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of ``aten::scaled_dot_product_attention``: Q K^T and (softmax) V, full score matrix."""
    query, key, value = (traced_sizes(v) for v in inputs[:3])
    if query is None or key is None or value is None:
        return 0
    batch = math.prod(query[:-2])
    length, dim = query[-2], query[-1]
    source, value_dim = key[-2], value[-1]
    return batch * length * source * (dim + value_dim)


def _baddbmm_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of ``aten::baddbmm(self, batch1, batch2)``: a batched matmul plus an add."""
    first, second = traced_sizes(inputs[1]), traced_sizes(inputs[2])
    if first is None or second is None:
        return 0
    return math.prod(first) * second[-1]


#: ops fvcore counts as 0 but that carry real work in attention; each replacement adds the handles
#: of the ops it runs (its ``flop_handles`` hook, e.g. aten::lstm / aten::gru), see ``flop_handles``
EXTRA_FLOP_HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": _sdpa_flop_jit,
    "aten::baddbmm": _baddbmm_flop_jit,
}


def flop_handles() -> dict[str, Callable]:
    """The op handles ``flop_analysis`` installs: attention's own plus every registered
    replacement's ``flop_handles`` hook."""
    return {**EXTRA_FLOP_HANDLES, **registered_flop_handles()}


class _Positional(nn.Module):
    """Calls ``model(*args, **kwargs)`` from positional tensors only and returns a tuple of tensors,
    because the JIT tracer behind fvcore accepts neither keyword inputs nor dict outputs."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.num_args = len(args)
        self.keys = list(kwargs)

    def forward(self, *flat: Any) -> tuple:
        args = flat[: self.num_args]
        kwargs = dict(zip(self.keys, flat[self.num_args:]))
        return tuple(_tensors(self.model(*args, **kwargs)))


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict) or hasattr(output, "to_tuple"):
        for value in (output.values() if isinstance(output, dict) else output.to_tuple()):
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def flop_analysis(model: nn.Module, example_inputs: Any):
    """An fvcore ``FlopCountAnalysis`` with handles for SDPA, baddbmm and the replacements' ops added.

    Use it for a per-module (``.by_module()``) or per-operator (``.by_operator()``) breakdown.

    Args:
        model: the model; traced once with ``example_inputs`` under ``torch.no_grad``.
        example_inputs: a tensor, a tuple of arguments, a dict of keyword arguments, or (args, kwargs).

    Example:
        >>> analysis = flop_analysis(nn.Linear(4, 2), torch.randn(3, 4))
        >>> analysis.total()
        24
    """
    import warnings

    with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    args, kwargs = as_args_kwargs(example_inputs)
    wrapped = _Positional(model, args, kwargs)
    analysis = FlopCountAnalysis(wrapped, (*args, *kwargs.values()))
    analysis.set_op_handle(**flop_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass (fvcore's convention: 1 flop = 1 MAC).

    fvcore counts ``aten::lstm``, ``aten::gru`` and ``aten::scaled_dot_product_attention`` as zero;
    here they get their real cost, so attention and its replacements compare fairly. Elementwise
    ops (activations, gates, softmax, adds) are left out, as fvcore does everywhere.

    Args:
        model: the model to count (its mode is left unchanged; counting runs under no_grad).
        example_inputs: a tensor, a tuple of arguments, a dict of keyword arguments, or (args, kwargs).

    Example:
        >>> count_flops(nn.LSTM(8, 16, batch_first=True), torch.randn(1, 10, 8))
        15360
    """
    # under the tracer replacements run their reference forms (no native call hides work from it)
    with torch.no_grad(), _eval(model):
        return int(flop_analysis(model, example_inputs).total())


# --------------------------------------------------------------------------------------- latency

@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration, then each submodule's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _caller(model: nn.Module, example_inputs: Any) -> Callable[[], Any]:
    args, kwargs = as_args_kwargs(example_inputs)
    return lambda: model(*args, **kwargs)


def _summary(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median_ms": statistics.median(ordered), "mean_ms": statistics.fmean(ordered),
            "min_ms": ordered[0], "max_ms": ordered[-1], "p25_ms": quartiles[0],
            "p75_ms": quartiles[2], "repeats": len(ordered)}


def measure_latencies(models: dict[str, nn.Module], example_inputs: Any, *, repeats: int = 20,
                      warmup: int = 3, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Time several models on the same inputs, interleaved: each round runs every model once, in an
    order that rotates, so drift on a shared machine hits all of them alike.

    Args:
        models: name -> model (each run in eval mode under ``torch.inference_mode``).
        example_inputs: inputs all models accept (tensor, tuple, dict or (args, kwargs)).
        repeats: timed rounds; the median is the figure to quote.
        warmup: untimed rounds first (allocator, oneDNN primitive caches, lazy init).
        threads: torch intra-op threads during the measurement (None = leave as is).

    Returns:
        name -> {median_ms, mean_ms, min_ms, max_ms, p25_ms, p75_ms, repeats, threads}.

    Example:
        >>> result = measure_latencies({"a": nn.Linear(8, 8), "b": nn.Identity()}, torch.randn(1, 8),
        ...                            repeats=3, warmup=1)
        >>> sorted(result)
        ['a', 'b']
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    names = list(models)
    calls = {name: _caller(model, example_inputs) for name, model in models.items()}
    devices = {name: _device_of(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(_eval(model))
        stack.enter_context(_threads(threads))
        stack.enter_context(torch.inference_mode())
        for _ in range(warmup):
            for name in names:
                calls[name]()
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                _synchronize(devices[name])
                start = time.perf_counter()
                calls[name]()
                _synchronize(devices[name])
                times[name].append((time.perf_counter() - start) * 1e3)
        used = torch.get_num_threads()
    return {name: {**_summary(times[name]), "threads": used} for name in names}


def measure_latency(model: nn.Module, example_inputs: Any, *, repeats: int = 20, warmup: int = 3,
                    threads: int | None = None) -> dict[str, float]:
    """Latency of one forward pass: median (and spread) of ``repeats`` timed calls after ``warmup``.

    Runs in eval mode under ``torch.inference_mode`` with ``threads`` intra-op threads. To compare
    two models use ``compare`` (same run, interleaved), never two separate calls of this.

    Args:
        model: the model (its training flags are restored afterwards).
        example_inputs: a tensor, a tuple of arguments, a dict of keyword arguments, or (args, kwargs).
        repeats: timed calls.
        warmup: untimed calls first.
        threads: torch intra-op threads (None = leave as is).

    Returns:
        {median_ms, mean_ms, min_ms, max_ms, p25_ms, p75_ms, repeats, threads}.

    Example:
        >>> stats = measure_latency(nn.Linear(8, 8), torch.randn(1, 8), repeats=3, warmup=1, threads=1)
        >>> stats["threads"], stats["repeats"]
        (1, 3)
    """
    return measure_latencies({"model": model}, example_inputs, repeats=repeats, warmup=warmup,
                             threads=threads)["model"]


# ---------------------------------------------------------------------------------------- memory

def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers the model keeps (originals kept for
    distillation included if they are still there: they are in memory)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def peak_memory(model: nn.Module, example_inputs: Any, *, threads: int | None = None) -> dict[str, int]:
    """Peak memory of one forward pass beyond the weights, in bytes, plus the weights' own bytes.

    On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On CPU:
    every allocation and free of the PyTorch CPU allocator recorded by the profiler
    (``profile_memory=True``), replayed in time order; the peak of the running total is the
    activation memory. (``ru_maxrss`` only ever grows and ``tracemalloc`` does not see tensor
    storage, so neither measures one call.)

    Args:
        model: the model (eval mode, ``torch.inference_mode``, one warm-up call first).
        example_inputs: a tensor, a tuple of arguments, a dict of keyword arguments, or (args, kwargs).
        threads: torch intra-op threads during the call (None = leave as is).

    Returns:
        {"activation_bytes": peak beyond the weights, "parameter_bytes": weights and buffers}.

    Example:
        >>> memory = peak_memory(nn.Linear(256, 256), torch.randn(64, 256))
        >>> memory["activation_bytes"] >= 64 * 256 * 4
        True
    """
    call = _caller(model, example_inputs)
    device = _device_of(model)
    with _eval(model), _threads(threads), torch.inference_mode():
        call()  # warm-up: lazy initialisation allocations are not the model's working memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = _cpu_peak_bytes(call)
    return {"activation_bytes": int(peak), "parameter_bytes": parameter_bytes(model)}


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Kineto writes profiler_start/stop lines straight to file descriptor 2; keep them off the
    user's terminal (Python-level redirection cannot catch them)."""
    import os
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(call: Callable[[], Any]) -> int:
    import os

    from torch.profiler import ProfilerActivity, profile

    # kineto logs a harmless "gpuGetDeviceCount failed" ERROR line on machines without a GPU
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _silenced_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = call()
    del output
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------------- comparison

def compare(original: nn.Module, candidate: nn.Module, example_inputs: Any, *, repeats: int = 20,
            warmup: int = 3, threads: int | None = None, flops: bool = True,
            memory: bool = True) -> list[dict[str, Any]]:
    """Parameters, FLOPs, latency and peak memory of ``candidate`` against ``original``.

    Latencies come from one interleaved run (``measure_latencies``), so the ratio holds even on a
    busy machine. Ratios are candidate / original (below 1 = the candidate is cheaper).

    Args:
        original: the reference model (e.g. the unmodified transformer).
        candidate: the replaced (and maybe pruned) model.
        example_inputs: inputs both accept.
        repeats, warmup, threads: as in ``measure_latencies``.
        flops: count FLOPs (one JIT trace per model; off for speed).
        memory: measure peak activation memory (one profiled call per model).

    Returns:
        Rows ``{"metric", "original", "candidate", "ratio", "unit"}`` for params, flops,
        latency_median, latency_p25, latency_p75, activation_memory, parameter_memory.

    Example:
        >>> rows = compare(nn.Linear(8, 8), nn.Linear(8, 4), torch.randn(1, 8), repeats=3, warmup=1)
        >>> [r["ratio"] for r in rows if r["metric"] == "params"]
        [0.5]
    """
    rows: list[dict[str, Any]] = []

    def add(metric: str, before: float, after: float, unit: str) -> None:
        ratio = after / before if before else (1.0 if after == before else math.inf)
        rows.append({"metric": metric, "original": before, "candidate": after, "ratio": ratio,
                     "unit": unit})

    add("params", count_parameters(original), count_parameters(candidate), "count")
    if flops:
        add("flops", count_flops(original, example_inputs), count_flops(candidate, example_inputs), "MAC")
    timing = measure_latencies({"original": original, "candidate": candidate}, example_inputs,
                               repeats=repeats, warmup=warmup, threads=threads)
    for key in ("median_ms", "p25_ms", "p75_ms"):
        add(f"latency_{key[:-3]}", timing["original"][key], timing["candidate"][key], "ms")
    if memory:
        first, second = peak_memory(original, example_inputs, threads=threads), peak_memory(
            candidate, example_inputs, threads=threads)
        add("activation_memory", first["activation_bytes"], second["activation_bytes"], "bytes")
        add("parameter_memory", first["parameter_bytes"], second["parameter_bytes"], "bytes")
    return rows
