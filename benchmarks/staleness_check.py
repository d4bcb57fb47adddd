"""Cost of the packed-weight staleness check of the recurrent inference / decode-step forms.

One SmolLM2-shaped ``mhlstm`` mixer (576 wide, 9 heads of 64, causal: 56 parameters), 1 thread:
``_step_form`` (the decode step's packed weights), ``inference_form``, the check alone
(``WeightsWatch.unchanged``) and one layer's decode step, each timed in a warm loop (timeit, CPU
time, best of 7) and with cold caches (a 32 MB sweep before each call, as between two layers of a
decode step; wall time, median of 40). ``--old`` also times the key earlier versions rebuilt from
every parameter on each call, for comparison.

Run:
    OMP_NUM_THREADS=1 python benchmarks/staleness_check.py --old
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402,F401
import surgery.replacements.recurrence as recurrence  # noqa: E402
from surgery.registry import MixerShape, get_replacement  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", action="store_true", help="also time the old per-call key")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = get_replacement("mhlstm")
    mixers = [spec.build(MixerShape(576, 64, 9, causal=True), {}).eval() for _ in range(4)]
    x = torch.randn(1, 1, 576)
    state = spec.decoding.init_state(mixers[0], 1)
    for mixer in mixers:
        recurrence._step_form(mixer)
        mixer.inference_form(x)

    def step(mixer):
        with torch.no_grad():
            spec.decoding.step(mixer, x, state)

    cases = {"_step_form": recurrence._step_form, "inference_form": lambda m: m.inference_form(x),
             "WeightsWatch.unchanged": lambda m: m.__dict__["_weights_watch"].unchanged(),
             "decode step (one layer)": step}
    if args.old:
        cases["old key (every parameter)"] = lambda m: tuple((p.data_ptr(), p._version, tuple(p.shape))
                                                             for p in m.parameters())
    print(f"load average {os.getloadavg()[0]:.2f}; {sum(1 for _ in mixers[0].parameters())} parameters per mixer")
    print(f"{'':28s} {'warm (CPU us)':>14s} {'cold (wall us)':>15s}")
    sweep = torch.randn(8_000_000)
    for name, call in cases.items():
        timer = timeit.Timer(lambda: call(mixers[0]), timer=time.process_time)
        number, _ = timer.autorange()
        warm = min(timer.repeat(7, number)) / number
        cold = []
        for i in range(40):
            sweep.add_(1)
            began = time.perf_counter()
            call(mixers[i % 4])
            cold.append(time.perf_counter() - began)
        print(f"{name:28s} {warm * 1e6:14.1f} {statistics.median(cold) * 1e6:15.1f}")


if __name__ == "__main__":
    main()
