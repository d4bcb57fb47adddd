"""Shared CLI pieces: option types (defined once), consoles, error handling, output helpers."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from surgery.errors import SurgeryError

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

ModelOption = Annotated[str, typer.Option(
    "--model", "-m",
    help="timm name or alias (deit_tiny, deit_base, vit_small), 'minilm' (bundled real model), "
         "'hf:<local dir or hub id>' or 'py:<module>:<factory>'.")]
RandomInitOption = Annotated[bool, typer.Option(
    "--random-init", help="Build with random weights (explicit; never a silent fallback).")]
CheckpointOption = Annotated[Optional[str], typer.Option(
    "--checkpoint", help="Local weights file (.safetensors, or .pth/.bin read with weights_only).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
TargetsOption = Annotated[Optional[list[str]], typer.Option(
    "--targets", help="Module-name suffix to replace (repeatable), or one full-match regex.")]
ExcludeOption = Annotated[Optional[list[str]], typer.Option(
    "--exclude", help="Module-name suffix to leave alone (repeatable), or one full-match regex.")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Replacement setting as key=value (repeatable), e.g. --set hidden_per_head=32.")]
PluginOption = Annotated[Optional[list[str]], typer.Option(
    "--plugin", metavar="MODULE",
    help="Import MODULE first (repeatable): your module that registers replacements with "
         "surgery.register_replacement; found like `python -m` does (working directory first). "
         "Installed packages can use the entry point group surgery.replacements instead.")]
AllowCodeOption = Annotated[bool, typer.Option(
    "--allow-code", help="Allow code named by files to run: a saved py:<module>:<factory> source, or an hf: "
                         "directory whose config names its own Python code (auto_map). Off: refused, never asked.")]
OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Write --out even when it holds other files or another run (that run's files are "
                        "replaced; files surgery did not write stay).")]


def guarded(function: Callable) -> Callable:
    """Turn SurgeryError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SurgeryError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def load_plugins(modules: Optional[list[str]]) -> None:
    """Import the --plugin modules (each registers its replacements); one-line error otherwise."""
    from surgery.registry import load_plugin

    for module in modules or []:
        load_plugin(module)


def rule(values: Optional[list[str]]) -> str | list[str] | None:
    """CLI --targets/--exclude to the Python form: one value with regex characters is a regex."""
    if not values:
        return None
    if len(values) == 1 and any(c in values[0] for c in "*+?[](){}|^$\\"):
        return values[0]
    return list(values)


def parse_settings(values: Optional[list[str]]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values parsed as JSON when they can be (numbers, bools)."""
    settings: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SurgeryError(f"--set {item!r} must look like key=value")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def print_table(title: str, columns: list[str] | tuple[str, ...], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
