"""``surgery distill RUN``: distill (or resume distilling) the replacements of a saved run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.cli.common import (
    AllowCodeOption, JsonOption, PluginOption, QuietOption, console, err_console, guarded, load_plugins,
    parse_settings, print_json, print_table,
)
from surgery.progress import NullProgress

DataOption = Annotated[Optional[str], typer.Option(
    "--data", "-d", help="Training data: text:builtin, text:python, text:PATH, mnist, images:PATH, "
                         "timm:NAME[:ROOT] or random.")]
StepsOption = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps of this stage.")]
ModeOption = Annotated[Optional[str], typer.Option(
    "--mode", help="blockwise (teacher-forced, each replacement fed the teacher's input) or e2e.")]
LrOption = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (warm-up, then cosine).")]
BatchOption = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch and process.")]
SeqLenOption = Annotated[Optional[int], typer.Option("--seq-len", help="Maximum tokens per text sample.")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Seed of data order and initialisation.")]
TrainOption = Annotated[Optional[str], typer.Option(
    "--train", help="replacements (only the new modules) or all (e2e only: fine-tune everything).")]
MaxSecondsOption = Annotated[Optional[float], typer.Option(
    "--max-seconds", help="Stop (after a checkpoint) when this much training time has passed.")]
DistillSetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Further distill setting key=value (repeatable): cosine_weight, task_weight, temperature, "
                  "kl_weight, hoyer_weight, init, other_lr_scale, warmup, weight_decay, checkpoint_every, "
                  "eval_batches, ... (surgery.distill.DistillConfig).")]


def register(app: typer.Typer) -> None:
    app.command("distill")(guarded(distill_command))


class RichProgress(NullProgress):
    """A rich progress bar on stderr showing the loss and the live per-site losses."""

    def __init__(self, site_names: list[str]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.short = {f"site/{n}": str(i) for i, n in enumerate(site_names)}
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                            console=err_console, transient=False)
        self.task = None

    def start(self, total: int, description: str, completed: int = 0) -> None:
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=completed, losses="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        sites = " ".join(f"{self.short[k]}:{v:.3f}" for k, v in metrics.items() if k in self.short)
        text = f"loss {metrics.get('loss', float('nan')):.4f} | sites {sites}"
        if "task" in metrics:
            text += f" | task {metrics['task']:.4f}"
        self.bar.update(self.task, completed=step, losses=text)

    def message(self, text: str) -> None:
        self.bar.console.print(text)

    def finish(self) -> None:
        self.bar.stop()


def check_data_spec(spec: str, option: str = "--data") -> None:
    """The cheap checks of a data spec (its kind, and that named files exist) before anything is written."""
    from surgery.data.spec import BUILTIN_TEXT, DATA_SPECS, text_mix
    from surgery.errors import DataError

    kind, _, rest = spec.partition(":")
    if kind == "text":
        for name, _ in text_mix(rest):
            if name not in BUILTIN_TEXT and not Path(name).exists():
                raise DataError(f"{option} {spec}: {name} does not exist; give a text file, a folder of .txt "
                                f"files, or one of {', '.join('text:' + n for n in BUILTIN_TEXT)}")
    elif kind == "images":
        if not rest or not Path(rest).is_dir():
            raise DataError(f"{option} {spec}: {rest or '(nothing)'} is not a folder of images; give images:<folder>")
    elif kind not in ("mnist", "timm", "random"):
        raise DataError(f"unknown data spec {spec!r} for {option}; use one of {', '.join(DATA_SPECS)}")


def check_distill_options(chosen: dict[str, Any]) -> None:
    """Every distillation setting the command line gave, checked before anything is loaded or written."""
    import dataclasses

    from surgery.distill.engine import DistillConfig
    from surgery.distill.settings import check_names, check_settings

    check_names(chosen, [f.name for f in dataclasses.fields(DistillConfig)])
    check_settings(DistillConfig(**chosen))
    for key, option in (("data", "--data"), ("eval_data", "--eval-data")):
        if isinstance(chosen.get(key), str):
            check_data_spec(chosen[key], option)


def run_distill(run: Path, *, data: Optional[str] = None, steps: Optional[int] = None, mode: Optional[str] = None,
                lr: Optional[float] = None, batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                seed: Optional[int] = None, train: Optional[str] = None, max_seconds: Optional[float] = None,
                settings: Optional[dict[str, Any]] = None, resume: bool = False, quiet: bool = False,
                json_output: bool = False, allow_code: bool = False, eval_data: Optional[str] = None) -> dict:
    """Load the saved model in ``run``, distill it, save it back there, and print the fidelity report.

    Every setting is checked first, and the run directory is locked while it is written."""
    import os

    from surgery.checkpoint import lock_directory, read_manifest
    from surgery.distill.rundir import RunDirectory
    from surgery.errors import SurgeryError

    chosen = {k: v for k, v in dict(data=data, steps=steps, mode=mode, lr=lr, batch_size=batch_size,
                                     seq_len=seq_len, seed=seed, train=train, max_seconds=max_seconds,
                                     eval_data=eval_data).items() if v is not None}
    chosen.update(settings or {})
    if resume:
        previous = RunDirectory(run, writer=False).read_config() if (Path(run) / "config.json").is_file() else {}
        if not previous:
            raise SurgeryError(f"{run} has no distillation to resume (no config.json); run without --resume")
        previous.pop("stage", None)
        chosen = {**previous, **chosen}
    elif not chosen.get("data") and (Path(run) / "config.json").is_file():
        # a new stage in the same run directory reads the same data by default
        previous = RunDirectory(run, writer=False).read_config()
        for key in ("data", "eval_data", "batch_size", "seq_len"):
            if previous.get(key) is not None and key not in chosen:
                chosen[key] = previous[key]
    if not chosen.get("data"):
        raise SurgeryError("give training data with --data (e.g. --data text:builtin, --data mnist)")
    chosen.setdefault("steps", 1000)
    check_distill_options(chosen)  # before the model is loaded or a file written
    read_manifest(run)  # a missing run is an error here, not a new directory made by the lock
    # only the main process writes (torchrun sets RANK for every process)
    with lock_directory(run) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        return _distill_locked(run, chosen, resume=resume, quiet=quiet, json_output=json_output,
                               allow_code=allow_code)


def _distill_locked(run: Path, chosen: dict[str, Any], *, resume: bool, quiet: bool, json_output: bool,
                    allow_code: bool) -> dict:
    import surgery
    from surgery.distill.distributed import init_from_env
    from surgery.swap import replaced_sites

    model = surgery.load(run, allow_code=allow_code)
    names = [w.site.name for w in replaced_sites(model)]
    world = init_from_env()
    progress = NullProgress() if quiet or not world.main else RichProgress(names)
    if not quiet and world.main and not json_output:
        err_console.print(f"distilling {len(names)} sites of {run} ({chosen.get('mode', 'blockwise')}, "
                          f"{chosen['steps']} steps, data {chosen['data']})")
    keywords = dict(chosen)
    result = surgery.distill(None, model, keywords.pop("data"), steps=keywords.pop("steps"), run_dir=run,
                             resume=resume, progress=progress, **keywords)
    summary = result.to_dict()
    if not world.main:
        return summary
    if json_output:
        print_json(summary)
        return summary
    rows = [[s.name, f"{s.relative_mse_before:.4f}", f"{s.relative_mse_after:.4f}", f"{s.cosine_before:.4f}",
             f"{s.cosine_after:.4f}"] for s in result.sites]
    held = "held-out" if result.fidelity.held_out else "training (no held-out split)"
    print_table(f"fidelity per site ({held} data, teacher-forced)",
                ["site", "rel. MSE before", "rel. MSE after", "cosine before", "cosine after"], rows)
    before, after = result.fidelity_before.summary(), result.fidelity.summary()
    print_table("end to end vs the teacher", ["measure", "before", "after"],
                [[k, f"{before.get(k, float('nan')):.4f}", f"{v:.4f}"] for k, v in after.items()
                 if not k.startswith("mean_site")])
    console.print(f"{result.steps} steps ({result.mode}) in {result.seconds:.0f} s "
                  f"(+ {result.setup_seconds:.0f} s before the first step); saved to {run}"
                  + (" (stopped early: max seconds)" if result.stopped_early else ""))
    return summary


def distill_command(
    run: Annotated[Path, typer.Argument(help="A run directory written by `surgery replace --out`.")],
    data: DataOption = None,
    mode: ModeOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    batch_size: BatchOption = None,
    seq_len: SeqLenOption = None,
    seed: SeedOption = None,
    train: TrainOption = None,
    max_seconds: MaxSecondsOption = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data spec for the report.")] = None,
    settings: DistillSetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run's last checkpoint (same settings).")] = False,
    allow_code: AllowCodeOption = False,
    plugin: PluginOption = None,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Distill a replaced model's attention replacements against the originals, then report fidelity."""
    load_plugins(plugin)
    run_distill(run, data=data, steps=steps, mode=mode, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                train=train, max_seconds=max_seconds, settings=parse_settings(settings), resume=resume,
                quiet=quiet, json_output=json_output, allow_code=allow_code, eval_data=eval_data)
