"""Parameter counts of DeiT-T/S/B before and after replacing attention (stored = used parameters).

Run: python benchmarks/param_counts.py [--json OUT.json]
Counts come from the model's real tensors (random init; counts don't depend on the weights).
"""

from __future__ import annotations

import argparse
import json

import timm

import surgery

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--replacements", nargs="+", default=surgery.list_replacements())
    args = parser.parse_args()
    rows = []
    for name in MODELS:
        original = sum(p.numel() for p in timm.create_model(name).parameters())
        for replacement in args.replacements:
            model = timm.create_model(name)
            report = surgery.replace_attention(model, replacement)
            surgery.finalize(model)
            stored = sum(p.numel() for p in model.parameters())
            assert stored == report.params_after, "report must equal the stored count"
            site = report.sites[0]
            rows.append({"model": name, "replacement": replacement, "model_params": original,
                         "replaced_params": stored, "ratio": round(stored / original, 3),
                         "attention_block": site.params_before, "replacement_block": site.params_after})
    print("| model | replacement | params (original) | params (replaced) | ratio | attention per block "
          "| replacement per block |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['replacement']} | {r['model_params']:,} | {r['replaced_params']:,} | "
              f"{r['ratio']:.2f}x | {r['attention_block']:,} | {r['replacement_block']:,} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
