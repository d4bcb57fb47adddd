"""CLI command ``prune``: global structural pruning of a saved (replaced) model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli.common import (
    AllowCodeOption, JsonOption, OverwriteOption, PluginOption, console, guarded, load_plugins, print_json,
    print_table,
)


def register(app: typer.Typer) -> None:
    app.command("prune")(guarded(prune_command))


def prune_command(
    run: Annotated[Path, typer.Argument(help="A saved model directory (from `surgery replace` or `distill`).")],
    ratio: Annotated[Optional[float], typer.Option(
        "--ratio", "-r", help="Fraction of prunable units to remove, in [0, 1) (default 0.4).")] = None,
    importance: Annotated[str, typer.Option(
        "--importance", "-i", help="magnitude, taylor (uses --data or the example input) or hoyer.")] = "magnitude",
    scope: Annotated[str, typer.Option(help="all, replacements (recurrent/conv units) or mlp.")] = "all",
    global_ranking: Annotated[bool, typer.Option(
        "--global/--local", help="Rank all units together, or remove the ratio from every head/layer.")] = True,
    threshold: Annotated[Optional[float], typer.Option(
        help="With --importance hoyer: remove units whose group L2 norm is below this (instead of --ratio).")] = None,
    head_floor: Annotated[float, typer.Option(
        help="Units each head/layer keeps at least: a fraction in (0, 1) or a count >= 1.")] = 0.1,
    skip_unprunable: Annotated[bool, typer.Option(
        "--skip-unprunable", help="Leave sites whose replacement has no pruner instead of refusing.")] = False,
    data: Annotated[Optional[str], typer.Option(
        help="Data spec for Taylor importance and recovery: text:builtin, text:python, text:PATH, mnist, images:PATH, "
             "random (default: the data RUN was distilled on, if recorded).")] = None,
    recover_steps: Annotated[int, typer.Option(
        "--recover-steps", help="Distillation steps after pruning (needs --data).")] = 0,
    recover_mode: Annotated[str, typer.Option(help="Recovery distillation: blockwise or e2e.")] = "blockwise",
    lr: Annotated[float, typer.Option(help="Peak learning rate of the recovery distillation.")] = 1e-3,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Directory to save the pruned model (without it, only the report is shown).")] = None,
    overwrite: OverwriteOption = False,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="Skip FLOP counting (faster).")] = False,
    allow_code: AllowCodeOption = False,
    plugin: PluginOption = None,
    json_output: JsonOption = False,
) -> None:
    """Prune a saved model globally (replacement units and MLP channels); optionally recover and save."""
    load_plugins(plugin)
    from surgery.checkpoint import check_output_directory, load, lock_directory, read_manifest, same_run, save
    from surgery.errors import PruningError
    from surgery.inputs import default_example_inputs
    from surgery.prune import prune

    if not data:
        data = _distilled_data(run)
    if head_floor >= 1 and head_floor != int(head_floor):
        raise PruningError(f"--head-floor must be a fraction in (0, 1) or a whole count, not {head_floor}")
    floor = int(head_floor) if head_floor >= 1 else head_floor
    if recover_steps and not data:
        raise PruningError("--recover-steps needs --data (e.g. --data text:builtin or --data mnist); "
                           f"{run} records no distillation data")
    previous = read_manifest(run)
    record = {"from": str(Path(run).resolve()), "weights": previous["weights"]["sha256"], "ratio": ratio,
              "importance": importance, "scope": scope, "global": global_ranking, "threshold": threshold,
              "head_floor": head_floor, "skip_unprunable": skip_unprunable, "data": data,
              "recover_steps": recover_steps, "recover_mode": recover_mode, "lr": lr}
    if out is not None and not overwrite:  # before the work: a file, the user's files, another run are refused
        check_output_directory(out, same_run=lambda manifest: (manifest.get("extra") or {}).get("prune_command")
                               == record)
    model = load(run, allow_code=allow_code)
    example_inputs = default_example_inputs(model)
    report = prune(model, example_inputs, ratio=ratio, importance=importance, global_=global_ranking,
                   scope=scope, threshold=threshold, head_floor=floor, skip_unprunable=skip_unprunable,
                   data=data, recover_steps=recover_steps, recover_mode=recover_mode,
                   measure_flops=not no_flops, **({"lr": lr} if recover_steps else {}))
    if out is not None:
        extra = dict(previous.get("extra") or {})
        extra["prune"] = {k: v for k, v in report.to_dict().items() if k != "bundles"}
        extra["prune"]["kept_units"] = report.kept_units()
        extra["prune_command"] = record
        with lock_directory(out):
            check_output_directory(out, same_run=lambda manifest: same_run(manifest, model, "prune_command", record,
                                                                           require_record=True),
                                   overwrite=overwrite)
            save(model, out, extra=extra)
    summary = {**report.summary(), "ratio": report.ratio, "threshold": threshold, "importance": importance,
               "scope": scope, "skipped_sites": report.skipped_sites, "out": str(out) if out else None}
    if json_output:
        print_json({**summary, "kept_units": report.kept_units(),
                    "recovery": None if report.recovery is None else str(report.recovery)})
        return
    print_table(f"pruned {run} ({importance}, {'global' if global_ranking else 'local'})",
                list(report.COLUMNS), report.rows())
    line = (f"params: {report.params_before:,} -> {report.params_after:,} "
            f"({report.params_after / report.params_before:.2f}x)")
    if report.flops_before and report.flops_after is not None:
        line += (f"; FLOPs: {report.flops_before / 1e6:,.1f}M -> {report.flops_after / 1e6:,.1f}M "
                 f"({report.flops_after / report.flops_before:.2f}x)")
    if report.skipped_sites:
        line += f"; skipped (no pruner): {', '.join(report.skipped_sites)}"
    console.print(line + (f"; saved to {out}" if out else ""))


def _distilled_data(run: Path) -> str | None:
    """The data spec a distillation run directory recorded in its config.json, if any."""
    import json

    config = Path(run) / "config.json"
    try:
        data = json.loads(config.read_text()).get("data") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, str) else None
