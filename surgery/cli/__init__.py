"""The ``surgery`` command line (typer). The core library never imports this package."""

from __future__ import annotations

import typer

from surgery.cli import core

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Architecture surgery on pretrained transformers: replace attention, distill, prune.")
core.register(app)
from surgery.cli import recipe as _recipe  # noqa: E402
_recipe.register(app)
from surgery.cli import prune as _prune  # noqa: E402
_prune.register(app)
from surgery.cli import distill as _distill  # noqa: E402
_distill.register(app)
from surgery.cli import bench as _bench  # noqa: E402
_bench.register(app)
from surgery.cli import export as _export  # noqa: E402
_export.register(app)


def main() -> None:
    app()
