"""``surgery recipe``: list the registered recipes and run one; options are generated from each
recipe's config dataclass, so ``surgery recipe NAME --help`` always shows every setting."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.cli.common import JsonOption, OverwriteOption, QuietOption, err_console, guarded, print_json, print_table

#: written into a recipe's --out when it starts: which recipe owns the directory (a rerun resumes it)
MARKER = "recipe.json"


def register(app: typer.Typer) -> None:
    recipe_app = typer.Typer(no_args_is_help=True, help="Named, reproducible pipelines (FAR's DeiT recipe, "
                             "MNIST and MiniLM evidence runs). `surgery recipe list` shows them.")
    recipe_app.command("list")(guarded(list_command))
    try:
        from surgery.recipes import list_recipes
    except ImportError:  # the recipes package is not installed next to surgery
        recipes = []
    else:
        recipes = list_recipes()
    for recipe in recipes:
        recipe_app.command(recipe.name, help=_help(recipe), no_args_is_help=False)(guarded(_command(recipe)))
    app.add_typer(recipe_app, name="recipe")


def list_command(json_output: JsonOption = False) -> None:
    """List the recipes and their settings (defaults)."""
    from surgery.recipes import list_recipes

    rows = [{"name": r.name, "description": r.description,
             "settings": {name: default for name, default, _ in r.settings()}} for r in list_recipes()]
    if json_output:
        print_json(rows)
        return
    print_table("Recipes (surgery recipe NAME --help for settings)", ["name", "description"],
                [[r["name"], r["description"]] for r in rows])


def _help(recipe) -> str:
    return recipe.description + "\n\nEvery setting below is a field of " + \
        f"recipes.{recipe.config_class.__module__.split('.')[-1]}.{recipe.config_class.__name__}."


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _command(recipe):
    """Build a typer command whose options are the fields of the recipe's config dataclass."""
    hints = typing.get_type_hints(recipe.config_class)
    helps = getattr(recipe.config_class, "HELP", {})
    parameters = [
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option("--out", "-o", help=(
                              "Run directory: stages, checkpoints, report.json and report.md go here; "
                              "running again with the same --out resumes."))]),
    ]
    for field in dataclasses.fields(recipe.config_class):
        annotation = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else None
        origin = typing.get_origin(annotation)
        if origin is typing.Union:
            inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            annotation = Optional[inner]
        if annotation is bool:
            option = typer.Option(f"{_option_name(field.name)}/--no-{field.name.replace('_', '-')}",
                                  help=helps.get(field.name, ""))
        else:
            option = typer.Option(_option_name(field.name), help=helps.get(field.name, ""))
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[annotation, option]))
    parameters.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=Annotated[bool, typer.Option(
                                            "--overwrite", help="Run in --out even when it holds files that are "
                                            "not this recipe's run (they stay; the recipe writes its own folders).")]))
    parameters.append(inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=JsonOption))
    parameters.append(inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=QuietOption))

    def command(**values: Any) -> None:
        out = values.pop("out")
        json_output = values.pop("json_output")
        quiet = values.pop("quiet")
        overwrite = values.pop("overwrite")
        # every check (settings, data folder, checkpoint, the run directory) happens before any work
        config = recipe.make_config(**values)
        claim_run_directory(out, recipe.name, overwrite=overwrite)

        def log(message: str) -> None:
            if not quiet:
                err_console.print(message, highlight=False, soft_wrap=True)

        report = recipe.run(config, out, log=log)
        if json_output:
            print_json(report)
        else:
            from surgery.recipes.report import markdown_report

            typer.echo(markdown_report(report))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__name__ = f"recipe_{recipe.name}"
    command.__doc__ = recipe.description
    return command


def claim_run_directory(out: Path, name: str, *, overwrite: bool = False) -> None:
    """Make ``out`` recipe ``name``'s run directory, or refuse in one line before any work.

    A missing or empty directory, or one this recipe started earlier (its ``recipe.json``, or the
    ``report.json`` of a finished run), is fine: the rerun resumes it. Another recipe's run is always
    refused (its stages would be mixed with this one's). A directory holding other files is refused
    unless ``overwrite`` (the files stay). A file where the directory should be is refused.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "run"
        >>> claim_run_directory(out, "mnist")
        >>> json.loads((out / MARKER).read_text())["recipe"]
        'mnist'
        >>> claim_run_directory(out, "minilm")
        Traceback (most recent call last):
        ...
        surgery.errors.OutputExistsError: --out ... is a 'mnist' recipe run; give another --out for 'minilm'
    """
    from surgery.checkpoint import LOCK, atomic_write
    from surgery.errors import OutputExistsError, StorageError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StorageError(f"--out {out} is a file, not a directory; give a directory path")
    owner = None
    if out.is_dir():
        for marker in (MARKER, "report.json"):
            try:
                owner = json.loads((out / marker).read_text()).get("recipe")
            except (OSError, ValueError, AttributeError):
                continue
            if owner:
                break
        entries = [e.name for e in out.iterdir() if e.name != LOCK and not e.name.startswith(".")]
        if owner is not None and owner != name:
            raise OutputExistsError(f"--out {out} is a {owner!r} recipe run; give another --out for {name!r}")
        if owner is None and entries and not overwrite:
            raise OutputExistsError(f"--out {out} holds other files ({', '.join(sorted(entries)[:3])}"
                                    f"{', ...' if len(entries) > 3 else ''}); give an empty or new directory, "
                                    "or add --overwrite to run beside them")
    if owner is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / MARKER, lambda f: f.write(json.dumps({"recipe": name}).encode()))
