"""The bench and export commands: tables/JSON from the CLI, one-line errors on bad runs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from surgery.cli import app

runner = CliRunner()
SOURCE = "py:models:hand_written_factory"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    result = invoke("replace", "--model", SOURCE, "--with", "mhlstm", "--allow-code", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_bench_json_compares_with_the_source(run_dir):
    result = invoke("bench", run_dir, "--allow-code", "--batch", "1", "--batch", "2", "--repeats", "2",
                    "--warmup", "0", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["original"] == SOURCE and data["threads"] == 1 and data["fast"] is True
    rows = {(r["metric"], r["batch"]): r for r in data["rows"]}
    params = rows[("params", None)]
    assert params["candidate"] > params["original"] > 0  # a full-width mhlstm has more params
    assert params["ratio"] == pytest.approx(params["candidate"] / params["original"])
    for batch in (1, 2):
        latency = rows[("latency_median", batch)]
        assert latency["original"] > 0 and latency["candidate"] > 0
        assert rows[("activation_memory", batch)]["candidate"] > 0
    assert rows[("flops", 1)]["original"] > 0


def test_bench_ratio_table_has_a_latency_row_per_batch(run_dir):
    """The printed table: params, MACs, weights, then per batch latency (+ throughput) and memory."""
    result = invoke("bench", run_dir, "--allow-code", "--batch", "1", "--batch", "8", "--repeats", "2",
                    "--warmup", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("value" in line and "original" in line and "ratio" in line for line in lines)
    for metric in ("params", "MACs", "weights memory", "throughput"):
        assert any(metric in line and line.rstrip(" │|").endswith("x") for line in lines), metric
    latency = [line for line in lines if "latency" in line and "ms" in line]
    memory = [line for line in lines if "activation memory" in line]
    assert len(latency) == 2 and len(memory) == 2
    assert "│ 1 " in latency[0] and "│ 8 " in latency[1]


def test_bench_batch_reaches_a_model_with_its_own_example_inputs(run_dir):
    """hand_written_factory's example_inputs() has 2 rows; --batch 8 must still time 8."""
    result = invoke("bench", run_dir, "--allow-code", "--batch", "1", "--batch", "8", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--no-flops", "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["metric"], r["batch"]): r for r in json.loads(result.stdout)["rows"]}
    one, eight = rows[("activation_memory", 1)], rows[("activation_memory", 8)]
    assert eight["original"] > 3 * one["original"] and eight["candidate"] > 3 * one["candidate"]
    throughput, latency = rows[("throughput", 8)], rows[("latency_median", 8)]
    assert throughput["candidate"] == pytest.approx(8e3 / latency["candidate"])
    assert ("throughput", 1) not in rows and rows[("parameter_memory", None)]["ratio"] > 1


def test_bench_table(run_dir):
    result = invoke("bench", run_dir, "--allow-code", "--repeats", "1", "--warmup", "0", "--no-flops",
                    "--no-memory", "--no-fast")
    assert result.exit_code == 0, result.output
    assert "latency" in result.stdout and "params" in result.stdout and "reference form" in result.stdout


def test_bench_missing_run_is_one_line(tmp_path):
    result = invoke("bench", tmp_path / "nope" / "run")
    assert result.exit_code == 2
    assert "not a saved model directory" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_directory_without_manifest(tmp_path):
    result = invoke("bench", tmp_path)
    assert result.exit_code == 2 and "manifest.json" in result.stderr


def test_bench_run_that_does_not_match_the_original(run_dir):
    result = invoke("bench", run_dir, "--allow-code", "--vs", "vit_tiny", "--repeats", "1")
    assert result.exit_code == 2, result.output
    assert "do not take the same inputs" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # a 'made from' note, then the error line


def test_bench_refuses_code_without_allow_code(run_dir):
    result = invoke("bench", run_dir)
    assert result.exit_code == 2 and "allow" in result.stderr.lower()


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torch-export", "model.pt2")])
def test_export_command(run_dir, tmp_path, fmt, name):
    target = tmp_path / name
    result = invoke("export", run_dir, "--format", fmt, "--exporter", "torchscript", "--out", target,
                    "--allow-code", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert target.is_file() and report["format"] == fmt
    if fmt == "onnx":
        assert report["recurrent_ops"] == ["LSTM"]


def test_export_bad_format_and_missing_run(run_dir, tmp_path):
    result = invoke("export", run_dir, "--format", "tflite", "--out", tmp_path / "m")
    assert result.exit_code == 2 and "unknown --format" in result.stderr
    result = invoke("export", tmp_path / "missing", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "not a saved model directory" in result.stderr
