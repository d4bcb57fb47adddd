"""CLI command ``export``: a saved model to ONNX or a torch.export program, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli.common import (
    AllowCodeOption, JsonOption, PluginOption, console, guarded, load_plugins, print_json, print_table,
)


def register(app: typer.Typer) -> None:
    app.command("export")(guarded(export_command))


def export_command(
    run: Annotated[Path, typer.Argument(help="A saved model directory (from replace/distill/prune).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.onnx or .pt2).")],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="onnx (checked with onnxruntime) or torch-export (.pt2).")] = "onnx",
    exporter: Annotated[str, typer.Option(
        help="ONNX exporter: dynamo (torch.export based) or torchscript (legacy tracer).")] = "dynamo",
    batch: Annotated[int, typer.Option(help="Batch size of the example inputs (shapes are fixed).")] = 1,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the check.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the check.")] = 1e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out when it already exists.")] = False,
    allow_code: AllowCodeOption = False,
    plugin: PluginOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a saved model (originals dropped) and verify the artifact against PyTorch."""
    load_plugins(plugin)
    from surgery.checkpoint import check_writable, load, storage_error
    from surgery.errors import ExportError, ManifestError, OutputExistsError
    from surgery.export import FORMATS, export
    from surgery.inputs import default_example_inputs
    from surgery.swap import finalize

    if format not in FORMATS:
        raise ExportError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    if not run.is_dir():
        raise ManifestError(f"{run} is not a saved model directory; pass one written by `surgery replace`")
    if out.exists() and not out.is_dir() and not overwrite:
        raise OutputExistsError(f"--out {out} exists; give another file name or add --overwrite to replace it")
    check_writable(out)  # before the model is loaded and exported
    model = finalize(load(run, allow_code=allow_code))
    try:
        report = export(model, default_example_inputs(model, batch=batch), out, format, exporter=exporter,
                        opset=opset, atol=atol, rtol=rtol)
    except OSError as error:  # the disk filled up, or the location changed, while exporting
        raise storage_error(error, out) from None
    if json_output:
        print_json(report.to_dict())
        return
    print_table(f"exported {run}", ["path", "format", "exporter", "size", "max abs error", "recurrent ops"],
                [[report.path, report.format, report.exporter, f"{report.size_bytes / 2**20:.2f} MiB",
                  f"{report.max_abs_error:.2e}", ", ".join(report.recurrent_ops) or "-"]])
    if report.unused_inputs:
        console.print(f"note: the exported graph ignores inputs {', '.join(report.unused_inputs)} "
                      "(unused for the example inputs)")
