"""surgery.export: ONNX (checked with onnxruntime) and torch.export artifacts of replaced models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from models import build
from surgery import fast
from surgery.errors import ExportError
from surgery.export import _check, export

pytest.importorskip("onnxruntime")


def _replaced(replacement="mhlstm", case="timm_vit"):
    model, inputs = build(case)
    surgery.replace_attention(model, replacement, inputs)
    return surgery.finalize(model), inputs


@pytest.mark.parametrize("replacement, native", [("mhlstm", ("LSTM",)), ("gru", ("GRU",)), ("conv", ())])
def test_onnx_round_trip_through_onnxruntime(tmp_path, replacement, native):
    model, inputs = _replaced(replacement)
    report = export(model, inputs, tmp_path / "model.onnx", exporter="torchscript")
    assert report.recurrent_ops == native
    assert report.max_abs_error <= 1e-4
    assert (tmp_path / "model.onnx").stat().st_size == report.size_bytes
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"]  # no temp files left


def test_onnx_dynamo_exporter_emits_native_lstm(tmp_path):
    model, inputs = _replaced("mhlstm")
    report = export(model, inputs, tmp_path / "model.onnx")
    assert report.exporter == "dynamo"
    assert report.recurrent_ops == ("LSTM",)
    assert "LSTM" in report.ops


def test_onnx_of_a_pruned_model(tmp_path):
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    surgery.prune(model, inputs, ratio=0.5, measure_flops=False)
    surgery.finalize(model)
    report = export(model, inputs, tmp_path / "pruned.onnx", exporter="torchscript")
    assert report.recurrent_ops == ("LSTM",)


def test_onnx_with_keyword_inputs(tmp_path):
    model, inputs = _replaced("mhlstm", "hf_bert")
    report = export(model, inputs, tmp_path / "bert.onnx", exporter="torchscript")
    assert report.outputs >= 1 and report.max_abs_error <= 1e-4


def test_torch_export_round_trip(tmp_path):
    model, inputs = _replaced("gru")
    report = export(model, inputs, tmp_path / "model.pt2", "torch-export")
    program = torch.export.load(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(inputs)[0], model(inputs), rtol=1e-5, atol=1e-5)
    assert report.format == "torch-export"


class _Mystery(nn.Module):
    """A mixer calling an op that no exporter can translate."""

    def forward(self, x, padding_mask=None):
        return torch.ops.surgery_test.mystery(x)


@pytest.fixture(scope="module")
def mystery_op():
    library = torch.library.Library("surgery_test", "DEF")
    library.define("mystery(Tensor x) -> Tensor")
    library.impl("mystery", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("surgery_test::mystery", lambda x: torch.empty_like(x), lib=library)
    yield
    library._destroy()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_unsupported_op_is_named_with_its_site(tmp_path, mystery_op, exporter):
    model, inputs = _replaced("mhlstm")
    model.blocks[1].attn.mixer = _Mystery()
    with pytest.raises(ExportError, match=r"surgery_test(::|\.)mystery in module 'blocks\.1\.attn\.mixer'"):
        export(model, inputs, tmp_path / "bad.onnx", exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_a_model_fast_in_eval_mode_exports(tmp_path):
    """optimize() no longer changes the structure: under the exporter's tracer the mixers run their
    reference forms, so the artifact has native LSTM ops and matches the fast eval forward."""
    model, inputs = _replaced("mhlstm")
    fast.optimize(model, use_kernel=False)
    report = export(model, inputs, tmp_path / "fast.onnx", exporter="torchscript")
    assert report.recurrent_ops == ("LSTM",)


def test_unknown_format_and_exporter(tmp_path):
    model, inputs = _replaced("conv")
    with pytest.raises(ExportError, match="unknown export format"):
        export(model, inputs, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ExportError, match="unknown ONNX exporter"):
        export(model, inputs, tmp_path / "m.onnx", exporter="magic")


def test_mismatch_beyond_tolerance_is_an_error():
    want = [torch.zeros(3)]
    assert _check(want, [torch.full((3,), 1e-6)], atol=1e-5, rtol=0) == pytest.approx(1e-6)
    with pytest.raises(ExportError, match="differs from PyTorch by up to"):
        _check(want, [torch.tensor([0.0, 0.5, 0.0])], atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="shape"):
        _check(want, [torch.zeros(4)], atol=1e-4, rtol=1e-4)
