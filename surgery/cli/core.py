"""CLI commands of the core: list, inspect, replace."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.cli.distill import (
    BatchOption, DataOption, LrOption, ModeOption, SeqLenOption, StepsOption, check_distill_options, run_distill,
)
from surgery.cli.common import (
    AllowCodeOption, CheckpointOption, ExcludeOption, JsonOption, ModelOption, OverwriteOption, PluginOption,
    RandomInitOption,
    QuietOption, SetOption, TargetsOption, console, err_console, guarded, load_plugins, parse_settings, print_json,
    print_table, rule,
)


def register(app: typer.Typer) -> None:
    app.command("list")(guarded(list_command))
    app.command("inspect")(guarded(inspect_command))
    app.command("replace")(guarded(replace_command))


def list_command(plugin: PluginOption = None, json_output: JsonOption = False) -> None:
    """List replacements, recipes and model aliases."""
    import importlib.util

    from surgery.models import ALIASES, BUNDLED
    from surgery.registry import get_replacement, list_replacements

    load_plugins(plugin)
    replacements = [{"name": n, "description": get_replacement(n).description,
                     "settings": get_replacement(n).config_class().to_dict()} for n in list_replacements()]
    recipes = _recipes()
    bundled = {name: {"model": what, "installed": importlib.util.find_spec(package) is not None}
               for name, (what, package) in BUNDLED.items()}
    if json_output:
        print_json({"replacements": replacements, "recipes": recipes, "aliases": ALIASES, "bundled": bundled})
        return
    print_table("Replacements", ["name", "description", "settings"],
                [[r["name"], r["description"], ", ".join(f"{k}={v}" for k, v in r["settings"].items())]
                 for r in replacements])
    if recipes:
        print_table("Recipes", ["name", "description"], [[r["name"], r["description"]] for r in recipes])
    print_table("Model aliases", ["alias", "model"], [[k, f"timm {v}"] for k, v in ALIASES.items()]
                + [[k, v["model"] + ("" if v["installed"] else " (package not installed)")] for k, v in bundled.items()])


def recipe_defaults(model: str) -> tuple[str, dict[str, Any]] | None:
    """The distillation route a recipe declares for a model alias, as ``(recipe module, route)``.

    A recipe module declares it in ``REPLACE_DEFAULTS`` (alias -> ``{"mode", "steps", "lr", ...,
    "distill": {key: value}}``), so the measured settings live in one place, next to the recipe.

    Example:
        >>> recipe_defaults("minilm")[1]["mode"]
        'e2e'
    """
    try:
        from surgery.recipes import list_recipes
    except ImportError:
        return None
    for recipe in list_recipes():
        table = getattr(sys.modules.get(recipe.run.__module__), "REPLACE_DEFAULTS", None) or {}
        if model in table:
            return recipe.run.__module__, table[model]
    return None


def apply_recipe_defaults(model: str, flags: dict[str, Any], settings: dict[str, Any]
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill the options the user left out (None in ``flags``, absent from ``settings``) from the
    model alias's recipe route, and say on stderr which ones were filled."""
    found = recipe_defaults(model)
    if found is None:
        return flags, settings
    recipe, route = found
    module = sys.modules.get(recipe)
    where = "/".join(Path(module.__file__).parts[-2:]) if module and getattr(module, "__file__", None) else recipe
    if flags.get("mode") is not None and flags["mode"] != route.get("mode"):
        # the route's settings were measured together in its mode; half of them would not fit another
        err_console.print(f"--model {model}: --mode {flags['mode']} is not the {route.get('mode')} route of "
                          f"{where}; its other defaults are not applied", highlight=False, soft_wrap=True)
        return flags, settings
    flags, settings, applied = dict(flags), dict(settings), []
    for key, value in route.items():
        if key in flags and flags[key] is None:
            flags[key] = value
            applied.append(f"--{key.replace('_', '-')} {value}")
    for key, value in route.get("distill", {}).items():
        if key not in settings:
            settings[key] = value
            applied.append("--distill-set " + shlex.quote(f"{key}={value}"))
    if applied:
        err_console.print(f"--model {model}: the route in {where} sets "
                          + " ".join(applied) + "; any flag overrides", highlight=False, soft_wrap=True)
    return flags, settings


def _recipes() -> list[dict]:
    try:
        from surgery.recipes import list_recipes
    except ImportError:
        return []
    return [{"name": r.name, "description": r.description} for r in list_recipes()]


InputsOption = Annotated[Optional[Path], typer.Option(
    "--inputs", help="Example inputs for the model's forward: a .safetensors (or torch.save, read with "
                     "weights_only) file of tensors; dict keys are keyword arguments, keys 0, 1, ... positional.")]
StrictOption = Annotated[bool, typer.Option(
    "--strict", help="Fail (exit 2) when an attention site would be skipped (cross, class/pooling or "
                     "windowed attention, or a site that fails the check), instead of reporting it.")]


def _example_inputs(path: Optional[Path]):
    from surgery.inputs import load_example_inputs

    return load_example_inputs(path) if path is not None else None


def _print_skipped(skipped) -> None:
    from surgery.sites import SkippedSite

    if skipped:
        print_table(f"{len(skipped)} attention sites skipped (left as they are)", list(SkippedSite.COLUMNS),
                    [s.row() for s in skipped])


def inspect_command(
    run: Annotated[Optional[Path], typer.Argument(help="A saved model directory to describe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=ModelOption.__metadata__[0].help)] = None,
    random_init: RandomInitOption = False,
    checkpoint: CheckpointOption = None,
    targets: TargetsOption = None,
    exclude: ExcludeOption = None,
    method: Annotated[str, typer.Option(help="auto, fx, export or type.")] = "auto",
    allow_code: AllowCodeOption = False,
    inputs: InputsOption = None,
    with_: Annotated[str, typer.Option(
        "--with", "-w", help="Replacement whose served site kinds decide what is reported as skipped.")] = "mhlstm",
    strict: StrictOption = False,
    plugin: PluginOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the attention sites of a model (--model) or of a saved directory (RUN), and the sites
    `surgery replace --with NAME` would skip, with the reason."""
    from surgery.errors import SurgeryError
    from surgery.sites import AttentionSite

    if (run is None) == (model is None):
        raise SurgeryError("give either a saved directory (surgery inspect RUN) or --model NAME")
    if run is not None:
        from surgery.checkpoint import read_manifest
        from surgery.sources import source_text

        manifest = read_manifest(run)
        sites = [AttentionSite.from_dict(e["site"]) for e in manifest["sites"]]
        if json_output:
            print_json(manifest)
            return
        print_table(f"{run}: source {source_text(manifest.get('source'))}", ["site", "replacement", "finalized",
                    "dim", "heads", "causal"],
                    [[s.name, e["replacement"], str(e["finalized"]), str(s.embed_dim), str(s.num_heads),
                      "yes" if s.causal else "no"] for s, e in zip(sites, manifest["sites"])])
        return
    from surgery.locate import find_attention
    from surgery.models import load_model

    from surgery.swap import unserved_sites

    load_plugins(plugin)
    example = _example_inputs(inputs)
    net = load_model(model, random_init=random_init, checkpoint=checkpoint, allow_code=allow_code)
    found = find_attention(net, example, targets=rule(targets), exclude=rule(exclude), method=method,
                           on_unsupported="raise" if strict else "skip")
    skipped = unserved_sites(found, with_)
    if strict and skipped:
        raise SurgeryError(f"--strict: {with_!r} would skip {len(skipped)} site(s), first "
                           f"{skipped[0].name!r}: {skipped[0].reason}")
    if json_output:
        reasons = {s.name: s.reason for s in skipped}
        print_json([{**s.to_dict(), "skip_reason": reasons.get(s.name)} for s in found]
                   + [{**s.to_dict(), "skip_reason": s.reason} for s in found.skipped])
        return
    print_table(f"{len(found)} attention sites in {model}", list(AttentionSite.COLUMNS),
                [s.row() for s in found])
    for site in found:  # e.g. the causal probe disagreeing with the mask at the core
        if site.note and site.kind == "self":
            console.print(f"note: {site.name}: {site.note}")
    _print_skipped(skipped)


def replace_command(
    model: ModelOption,
    with_: Annotated[str, typer.Option("--with", "-w", help="Replacement name (see `surgery list`).")] = "mhlstm",
    plugin: PluginOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory to save the replaced model.")] = None,
    overwrite: OverwriteOption = False,
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
    minutes: Annotated[Optional[float], typer.Option(
        "--minutes", help="Stop distilling after this many minutes of training (the same as "
                          "--distill-set max_seconds=60*N).")] = None,
    inputs: InputsOption = None,
    strict: StrictOption = False,
    quiet: QuietOption = False,
) -> None:
    """Replace every attention block of a model and save it (originals kept for distillation);
    with --data, then distill the replacements (--steps, --mode, ...) in the --out run directory.
    A model alias with a recipe route (e.g. minilm) distills with that route's settings unless a
    flag gives another value; the run prints the defaults it applied."""
    import torch

    from surgery.checkpoint import check_output_directory, lock_directory, same_run, save
    from surgery.errors import SurgeryError
    from surgery.models import load_model
    from surgery.registry import get_replacement
    from surgery.swap import replace_attention

    load_plugins(plugin)
    get_replacement(with_)  # unknown names fail before the model is built
    if data and out is None:
        raise SurgeryError("distilling after replace needs a run directory: add --out DIR")
    given = parse_settings(distill_settings)
    if minutes is not None:
        if not data:
            raise SurgeryError("--minutes limits distillation: add --data (e.g. --data text:python)")
        if "max_seconds" in given:
            raise SurgeryError("give --minutes or --distill-set max_seconds, not both")
        if minutes <= 0:
            raise SurgeryError(f"--minutes must be > 0, not {minutes}")
        given["max_seconds"] = 60.0 * minutes
    if data:
        flags = {"mode": mode, "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len}
        flags, given = apply_recipe_defaults(model, flags, given)
        mode, steps, lr, batch_size, seq_len = (flags[k] for k in ("mode", "steps", "lr", "batch_size", "seq_len"))
        steps = 1000 if steps is None else steps  # --steps 0 means no step
        check_distill_options({k: v for k, v in dict(data=data, steps=steps, mode=mode, lr=lr, batch_size=batch_size,
                                                     seq_len=seq_len, seed=seed, **given).items() if v is not None})
    else:
        unused = [f"--{k.replace('_', '-')}" for k, v in dict(steps=steps, mode=mode, lr=lr, batch_size=batch_size,
                                                              seq_len=seq_len).items() if v is not None]
        if unused or given:
            raise SurgeryError(f"{', '.join(unused or ['--distill-set'])} only apply to distillation: add --data "
                               "(e.g. --data text:python), or leave them out to only replace")
    if out is not None and not overwrite:  # a file, or the user's own files, are refused before the model is built
        check_output_directory(out, same_run=lambda manifest: True)
    example = _example_inputs(inputs)
    torch.manual_seed(seed)  # the replacements' random initialisation is reproducible
    net = load_model(model, random_init=random_init, checkpoint=checkpoint, allow_code=allow_code)
    report = replace_attention(net, with_, example, config=parse_settings(settings), targets=rule(targets),
                               exclude=rule(exclude), on_unsupported="raise" if strict else "skip")
    if out is not None:
        record = {"model": model, "replacement": with_, "random_init": random_init, "checkpoint": checkpoint,
                  "settings": parse_settings(settings), "targets": targets, "exclude": exclude, "seed": seed}
        with lock_directory(out):
            check_output_directory(out, same_run=lambda manifest: same_run(manifest, net, "replace", record),
                                   overwrite=overwrite)
            save(net, out, extra={"replace": record})
    summary = {"model": model, "replacement": with_, "sites": len(report.sites),
               "params_before": report.params_before, "params_after": report.params_after,
               "out": str(out) if out else None, "skipped": [s.to_dict() for s in report.skipped]}
    if json_output and not data:
        print_json({**summary, "per_site": [dict(zip(report.COLUMNS, r)) for r in report.rows()]})
        return
    if not json_output:
        print_table(f"{with_} in {model}", list(report.COLUMNS), report.rows())
        _print_skipped(report.skipped)
        console.print(f"model params: {report.params_before:,} -> {report.params_after:,} "
                      f"({report.params_after / report.params_before:.2f}x)"
                      + (f"; saved to {out}" if out else ""))
    if data:
        run_distill(out, data=data, steps=steps, mode=mode, lr=lr, batch_size=batch_size,
                    seq_len=seq_len, seed=seed, settings=given, quiet=quiet,
                    json_output=json_output, allow_code=allow_code)
