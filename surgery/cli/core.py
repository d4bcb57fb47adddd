"""CLI commands of the core: list, inspect, replace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli.distill import (
    BatchOption, DataOption, LrOption, ModeOption, SeqLenOption, StepsOption, run_distill,
)
from surgery.cli.common import (
    AllowCodeOption, CheckpointOption, ExcludeOption, JsonOption, ModelOption, PluginOption, RandomInitOption,
    QuietOption, SetOption, TargetsOption, console, guarded, load_plugins, parse_settings, print_json,
    print_table, rule,
)


def register(app: typer.Typer) -> None:
    app.command("list")(guarded(list_command))
    app.command("inspect")(guarded(inspect_command))
    app.command("replace")(guarded(replace_command))


def list_command(plugin: PluginOption = None, json_output: JsonOption = False) -> None:
    """List replacements, recipes and model aliases."""
    from surgery.models import ALIASES
    from surgery.registry import get_replacement, list_replacements

    load_plugins(plugin)
    replacements = [{"name": n, "description": get_replacement(n).description,
                     "settings": get_replacement(n).config_class().to_dict()} for n in list_replacements()]
    recipes = _recipes()
    if json_output:
        print_json({"replacements": replacements, "recipes": recipes, "aliases": ALIASES})
        return
    print_table("Replacements", ["name", "description", "settings"],
                [[r["name"], r["description"], ", ".join(f"{k}={v}" for k, v in r["settings"].items())]
                 for r in replacements])
    if recipes:
        print_table("Recipes", ["name", "description"], [[r["name"], r["description"]] for r in recipes])
    print_table("Model aliases", ["alias", "timm model"], [[k, v] for k, v in ALIASES.items()]
                + [["minilm", "bundled all-MiniLM-L6-v2 (HuggingFace BERT)"]])


def _recipes() -> list[dict]:
    try:
        from recipes import list_recipes
    except ImportError:
        return []
    return [{"name": r.name, "description": r.description} for r in list_recipes()]


def inspect_command(
    run: Annotated[Optional[Path], typer.Argument(help="A saved model directory to describe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=ModelOption.__metadata__[0].help)] = None,
    random_init: RandomInitOption = False,
    checkpoint: CheckpointOption = None,
    targets: TargetsOption = None,
    exclude: ExcludeOption = None,
    method: Annotated[str, typer.Option(help="auto, fx, export or type.")] = "auto",
    json_output: JsonOption = False,
) -> None:
    """Show the attention sites of a model (--model) or of a saved directory (RUN)."""
    from surgery.errors import SurgeryError
    from surgery.sites import AttentionSite

    if (run is None) == (model is None):
        raise SurgeryError("give either a saved directory (surgery inspect RUN) or --model NAME")
    if run is not None:
        from surgery.checkpoint import read_manifest

        manifest = read_manifest(run)
        sites = [AttentionSite.from_dict(e["site"]) for e in manifest["sites"]]
        if json_output:
            print_json(manifest)
            return
        print_table(f"{run}: source {manifest.get('source')}", ["site", "replacement", "finalized",
                    "dim", "heads", "causal"],
                    [[s.name, e["replacement"], str(e["finalized"]), str(s.embed_dim), str(s.num_heads),
                      "yes" if s.causal else "no"] for s, e in zip(sites, manifest["sites"])])
        return
    from surgery.locate import find_attention
    from surgery.models import load_model

    net = load_model(model, random_init=random_init, checkpoint=checkpoint)
    found = find_attention(net, targets=rule(targets), exclude=rule(exclude), method=method)
    if json_output:
        print_json([s.to_dict() for s in found])
        return
    print_table(f"{len(found)} attention sites in {model}", list(AttentionSite.COLUMNS),
                [s.row() for s in found])


def replace_command(
    model: ModelOption,
    with_: Annotated[str, typer.Option("--with", "-w", help="Replacement name (see `surgery list`).")] = "mhlstm",
    plugin: PluginOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory to save the replaced model.")] = None,
    random_init: RandomInitOption = False,
    checkpoint: CheckpointOption = None,
    targets: TargetsOption = None,
    exclude: ExcludeOption = None,
    settings: SetOption = None,
    allow_code: AllowCodeOption = False,
    json_output: JsonOption = False,
    data: DataOption = None,
    steps: StepsOption = None,
    mode: ModeOption = None,
    lr: LrOption = None,
    batch_size: BatchOption = None,
    seq_len: SeqLenOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the replacements' init and of distillation.")] = 0,
    distill_settings: Annotated[Optional[list[str]], typer.Option(
        "--distill-set", help="Distill setting key=value (repeatable), as `surgery distill --set`.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Replace every attention block of a model and save it (originals kept for distillation);
    with --data, then distill the replacements (--steps, --mode, ...) in the --out run directory."""
    import torch

    from surgery.checkpoint import save
    from surgery.errors import SurgeryError
    from surgery.models import load_model
    from surgery.registry import get_replacement
    from surgery.swap import replace_attention

    load_plugins(plugin)
    get_replacement(with_)  # unknown names fail before the model is built
    if data and out is None:
        raise SurgeryError("distilling after replace needs a run directory: add --out DIR")
    torch.manual_seed(seed)  # the replacements' random initialisation is reproducible
    net = load_model(model, random_init=random_init, checkpoint=checkpoint)
    report = replace_attention(net, with_, config=parse_settings(settings), targets=rule(targets),
                               exclude=rule(exclude))
    if out is not None:
        save(net, out, extra={"replace": {"model": model, "replacement": with_,
                                          "random_init": random_init}})
    summary = {"model": model, "replacement": with_, "sites": len(report.sites),
               "params_before": report.params_before, "params_after": report.params_after,
               "out": str(out) if out else None}
    if json_output and not data:
        print_json({**summary, "per_site": [dict(zip(report.COLUMNS, r)) for r in report.rows()]})
        return
    if not json_output:
        print_table(f"{with_} in {model}", list(report.COLUMNS), report.rows())
        console.print(f"model params: {report.params_before:,} -> {report.params_after:,} "
                      f"({report.params_after / report.params_before:.2f}x)"
                      + (f"; saved to {out}" if out else ""))
    if data:
        run_distill(out, data=data, steps=steps or 1000, mode=mode, lr=lr, batch_size=batch_size,
                    seq_len=seq_len, seed=seed, settings=parse_settings(distill_settings), quiet=quiet,
                    json_output=json_output, allow_code=allow_code)
