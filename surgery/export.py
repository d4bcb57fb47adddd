"""Export a (replaced, pruned) model to a deployable artifact and check it against PyTorch.

Formats: ``"onnx"`` (verified with onnxruntime; ``nn.LSTM``/``nn.GRU`` heads become native ONNX
``LSTM``/``GRU`` ops) and ``"torch-export"`` (a ``torch.export`` program saved as ``.pt2``, verified
by loading it back). The artifact is written to a temporary file next to ``path``, verified, and only
then moved into place, so a failed export or a failed check never leaves a file behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import ExportError
from surgery.inputs import as_args_kwargs, without_cache
from surgery.measure import _eval, _tensors

__all__ = ["ExportReport", "FORMATS", "export"]

FORMATS = ("onnx", "torch-export")


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how closely it reproduces PyTorch on the example inputs."""

    path: str
    format: str
    exporter: str
    size_bytes: int
    max_abs_error: float
    atol: float
    rtol: float
    outputs: int
    recurrent_ops: tuple[str, ...]
    ops: tuple[str, ...]
    #: example inputs the exported graph does not read (the exporter found them unused for the
    #: example, e.g. an all-ones attention mask): the artifact ignores them at inference time too
    unused_inputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, format: str = "onnx", *,
           exporter: str = "dynamo", opset: int | None = None, atol: float = 1e-4, rtol: float = 1e-4,
           verify: bool = True) -> ExportReport:
    """Export ``model`` for deployment and verify the artifact reproduces PyTorch's outputs.

    Shapes are fixed to those of ``example_inputs``. Under the exporters' tracers replacements run
    their reference forms (no native call is hidden from them; ONNX runtimes run the exported
    ``LSTM``/``GRU`` ops with their own fused kernels), or the export form their record names.

    Args:
        model: the model (exported in eval mode; its training flags are restored).
        example_inputs: a tensor, a tuple of arguments, a dict of keyword arguments, or (args, kwargs).
        path: the file to write (``.onnx`` or ``.pt2`` by convention).
        format: "onnx" or "torch-export".
        exporter: for ONNX, "dynamo" (``torch.export`` based, the default) or "torchscript" (the
            legacy tracer: faster to run, also emits native LSTM/GRU).
        opset: ONNX opset (None = the exporter's default).
        atol, rtol: the check passes when ``|exported - pytorch| <= atol + rtol * |pytorch|``.
        verify: run the check (onnxruntime for ONNX; the reloaded program for torch-export).

    Returns:
        An ``ExportReport`` (path, size, max abs error, ONNX op types and the recurrent ones).

    Raises:
        ExportError: an op with no translation (named, with the module that calls it), an unknown
            format, or outputs that differ beyond the tolerance.

    Example:
        >>> import timm, torch, surgery, tempfile, os
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> _ = surgery.replace_attention(vit, "mhlstm", x)
        >>> target = os.path.join(tempfile.mkdtemp(), "vit.onnx")
        >>> report = export(surgery.finalize(vit), x, target, exporter="torchscript")
        >>> report.recurrent_ops
        ('LSTM',)
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose 'dynamo' or 'torchscript'")
    args, kwargs = as_args_kwargs(example_inputs)
    kwargs = without_cache(model, kwargs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError("export needs tensor positional inputs; pass settings as keyword arguments")
    # non-tensor keyword settings (use_cache=False, ...) are fixed into the exported graph
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    flat = tuple((*args, *tensors.values()))
    wrapped = _Positional(model, args, tensors, constants)
    names = [f"input_{i}" for i in range(len(args))] + list(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the suffix: torch.export.load only reads files ending in .pt2
    suffix = ".pt2" if format == "torch-export" else ".onnx"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _eval(model), torch.no_grad(), _export_forms(model):
            reference = [t.detach() for t in wrapped(*flat)]
            if format == "onnx":
                _export_onnx(wrapped, flat, names, tmp, exporter, opset, model)
                got = _run_onnx(tmp, names, flat) if verify else None
                ops, graph_inputs = _onnx_ops(tmp)
                unused = tuple(n for n in names if n not in graph_inputs)
                used = exporter
            else:
                _export_program(wrapped, flat, tmp, model)
                got = [t.detach() for t in _tensors(torch.export.load(tmp).module()(*flat))] if verify else None
                ops, unused = (), ()
                used = "torch.export"
        error = _check(reference, got, atol, rtol) if verify else float("nan")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an artifact is for others to read
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    recurrent = tuple(sorted({op for op in ops if op in ("LSTM", "GRU", "RNN")}))
    return ExportReport(str(path), format, used, path.stat().st_size, error, atol, rtol, len(reference),
                        recurrent, tuple(sorted(set(ops))), unused)


class _Positional(nn.Module):
    """``model(*args, **tensors, **constants)`` called from positional tensors, returning a flat
    tuple of tensors: what both ONNX exporters and torch.export accept."""

    def __init__(self, model: nn.Module, args: tuple, tensors: dict, constants: dict) -> None:
        super().__init__()
        self.model = model
        self.num_args = len(args)
        self.keys = list(tensors)
        self.constants = dict(constants)

    def forward(self, *flat: Any) -> tuple:
        kwargs = dict(zip(self.keys, flat[self.num_args:]), **self.constants)
        return tuple(_tensors(self.model(*flat[: self.num_args], **kwargs)))


@contextlib.contextmanager
def _export_forms(model: nn.Module):
    """Each replacement traced in its export form (the registry's ``export_form`` hook), when it
    has one; under a tracer the built-ins run their reference forms by themselves."""
    from surgery.registry import get_replacement
    from surgery.swap import replaced_sites

    swapped = []
    for wrapper in replaced_sites(model):
        hook = get_replacement(wrapper.replacement).export_form
        if hook is not None:
            swapped.append((wrapper, wrapper.mixer))
            wrapper.mixer = hook(wrapper.mixer)
    try:
        yield
    finally:
        for wrapper, mixer in swapped:
            wrapper.mixer = mixer


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, warnings and C++ graph dumps (file descriptors 1 and
    2 too): the error we raise says what failed in one line."""
    buffer = io.StringIO()
    saved = []
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:
                    pass
            with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), \
                    contextlib.redirect_stderr(buffer):
                warnings.simplefilter("ignore")
                yield buffer
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _export_onnx(wrapped: nn.Module, flat: tuple, names: list[str], target: Path, exporter: str,
                 opset: int | None, model: nn.Module) -> None:
    options: dict[str, Any] = {"input_names": names, "dynamo": exporter == "dynamo"}
    if opset is not None:
        options["opset_version"] = opset
    elif exporter == "torchscript":
        options["opset_version"] = 17
    if exporter == "dynamo":
        options["external_data"] = False
    try:
        with _quiet():
            torch.onnx.export(wrapped, flat, str(target), **options)
    except Exception as error:
        raise _translation_error(error, "ONNX", wrapped, flat, model) from error


def _export_program(wrapped: nn.Module, flat: tuple, target: Path, model: nn.Module) -> None:
    try:
        with _quiet():
            program = torch.export.export(wrapped, flat, strict=False)
            torch.export.save(program, str(target))
    except Exception as error:
        raise _translation_error(error, "torch.export", wrapped, flat, model) from error


#: how exporters name an op in their errors: aten::foo, aten.foo.default, op='ns.foo', ns::foo
_OP_PATTERNS = (
    re.compile(r"op='([\w.]+)'"),
    re.compile(r"\b([a-z_]\w*::\w+)"),
    re.compile(r"\b(aten\.\w+\.\w+)"),
)


def _op_from_message(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).rstrip(".")
    return None


def _translation_error(error: Exception, target: str, wrapped: nn.Module, flat: tuple,
                       model: nn.Module) -> ExportError:
    """An ``ExportError`` naming the failing op and the module (site) that calls it."""
    message = " ".join(str(error).split())
    if "DataDependent" in type(error).__name__ or "data-dependent" in message or "data dependent" in message:
        return ExportError(f"cannot export {type(model).__name__} with {target}: the model branches on "
                           "tensor values (e.g. a padding-mask check), which torch.export cannot "
                           "capture; use format='onnx' with exporter='torchscript' (it fixes the "
                           "branch the example inputs take)")
    op = _op_from_message(message)
    site = _site_of(op, wrapped, flat) if op else None
    where = f" in module {site!r}" if site else ""
    if op:
        return ExportError(f"cannot export to {target}: operator {op}{where} has no translation; "
                           "replace that module, or use the other format/exporter")
    short = message[:300] + ("..." if len(message) > 300 else "")
    return ExportError(f"cannot export {type(model).__name__} to {target}: {short}")


def _site_of(op: str, wrapped: nn.Module, flat: tuple) -> str | None:
    """The innermost module that calls ``op``, from a ``torch.export`` graph's nn_module_stack."""
    key = re.sub(r"^aten::|::", ".", op).strip(".")
    key = key.split(".default")[0]
    short = key.split(".")[-1] if key.startswith("aten") else key
    try:
        with _quiet():
            graph = torch.export.export(wrapped, flat, strict=False).graph
    except Exception:
        return None
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if short in name or key in name:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                path = re.sub(r"^L\['self'\]\.?", "", path)
                return re.sub(r"^model\.?", "", path) or "<root>"
    return None


def _run_onnx(path: Path, names: list[str], flat: tuple) -> list[torch.Tensor]:
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError("verifying ONNX needs onnxruntime: pip install 'surgery[export]'") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = {i.name for i in session.get_inputs()}
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, flat) if name in expected}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _onnx_ops(path: Path) -> tuple[list[str], set[str]]:
    """The op types of an ONNX file (functions included) and the names of its graph inputs."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    for function in proto.functions:  # the dynamo exporter may keep functions; look inside them
        ops += [n.op_type for n in function.node]
    return ops, {i.name for i in proto.graph.input}


def _check(reference: list[torch.Tensor], got: list[torch.Tensor], atol: float, rtol: float) -> float:
    if len(got) != len(reference):
        raise ExportError(f"the exported model returns {len(got)} outputs, PyTorch {len(reference)}")
    worst = 0.0
    for index, (want, have) in enumerate(zip(reference, got)):
        have = have.to(want.dtype).cpu()
        want = want.cpu()
        if have.shape != want.shape:
            raise ExportError(f"exported output {index} has shape {tuple(have.shape)}, PyTorch "
                              f"{tuple(want.shape)}")
        if not want.is_floating_point():
            if not torch.equal(want, have):
                raise ExportError(f"exported output {index} differs from PyTorch (integer output)")
            continue
        diff = (have - want).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        bad = diff > atol + rtol * want.abs()
        if bool(bad.any()):
            raise ExportError(f"exported output {index} differs from PyTorch by up to "
                              f"{float(diff.max()):.3g} (atol={atol}, rtol={rtol}); the artifact was "
                              "not written")
    return worst
