"""The MiniLM recipe with ``linear`` and replacement settings (``--set window=32``), plus what a window covers.

Run: OMP_NUM_THREADS=2 python benchmarks/minilm_linear.py --out runs/minilm-linear-w32 --set window=32
         [--recipe e2e_steps=120 --recipe max_seconds=600] [--json benchmarks/results/minilm_recipe_linear_w32.json]

This runs ``surgery recipe minilm --replacements linear`` (``recipes.minilm.run_minilm``: the same
data, teacher start, end-to-end route, held-out sets and report) with the ``--set`` settings as its
``replacement_settings``. It adds to the report
the token lengths of both held-out sets and, per window, the share of sentences a window covers
whole (``|i - j| < W`` for every pair: on those sentences the mixer is the original softmax
attention, nothing linear is left) and the share of token pairs inside the window; and the load
average before and after. The report (``OUT/report.json``) is copied to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def window_coverage(lengths: list[int], window: int) -> dict:
    """Share of sentences whose every token pair is inside ``|i - j| < window`` and share of pairs inside.

    Example:
        >>> window_coverage([4, 8], 4)
        {'sentences_whole': 50.0, 'pairs': 75.0}
    """
    pairs = inside = 0
    for n in lengths:
        pairs += n * n
        span = min(window, n)  # |i - j| <= span - 1
        inside += n + 2 * sum(n - d for d in range(1, span))
    whole = sum(n <= window for n in lengths)
    return {"sentences_whole": round(100.0 * whole / len(lengths), 1), "pairs": round(100.0 * inside / pairs, 1)}


def lengths_summary(lengths: list[int]) -> dict:
    values = sorted(lengths)
    at = lambda p: values[min(len(values) - 1, int(p * len(values)))]  # noqa: E731
    return {"sentences": len(values), "min": values[0], "p25": at(0.25), "median": at(0.5), "p75": at(0.75),
            "p90": at(0.9), "max": values[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (resumable, as the recipe's --out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a linear setting")
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="a MinilmConfig setting (e2e_steps=120, max_seconds=600, data=...)")
    parser.add_argument("--json", default=None, help="copy the report here")
    args = parser.parse_args()

    from surgery.data import heldout_english, tokenizer_for
    from surgery.models import load_model
    from surgery.recipes import make_config
    from surgery.recipes.minilm import MinilmConfig, held_out_sentences, run_minilm

    config = make_config(MinilmConfig, {"replacements": "linear", **dict(i.split("=", 1) for i in args.recipe),
                                        "replacement_settings": ",".join(args.set)}, "minilm")
    settings = config.settings_of["linear"]
    load_before = os.getloadavg()
    tokenizer = tokenizer_for(load_model(config.model))
    count = lambda texts: [len(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts]  # noqa: E731
    in_domain = count(held_out_sentences(config.data, config.eval_sentences))
    out_domain = count(heldout_english())
    window = int(settings.get("window", 0))

    began = time.perf_counter()
    report = run_minilm(config, args.out)
    report["linear_settings"] = settings
    report["token_lengths"] = {"in_domain": lengths_summary(in_domain), "out_of_domain": lengths_summary(out_domain),
                               "counted_with": "the MiniLM tokenizer, [CLS] and [SEP] included"}
    if window:
        report["window_coverage"] = {"window": window, "in_domain": window_coverage(in_domain, window),
                                     "out_of_domain": window_coverage(out_domain, window)}
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    report["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    report["command"] = ("OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python "
                         + " ".join(shlex.quote(a) for a in sys.argv))
    text = json.dumps(report, indent=1)
    Path(args.out, "report.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: report[k] for k in ("rows", "window_coverage", "wall_seconds", "load_average")
                      if k in report}, indent=1))


if __name__ == "__main__":
    main()
