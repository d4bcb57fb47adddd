"""Nothing is overwritten without being asked (issue #18's follow-up): `surgery export --out` onto an
existing file and `surgery recipe --out` onto a directory that is not that recipe's run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgery.cli import app
from surgery.cli.recipe import MARKER, claim_run_directory
from surgery.errors import OutputExistsError, StorageError

HERE = Path(__file__).parent
runner = CliRunner()
FACTORY = "py:models:hand_written_factory"  # tests/models.py: two hand-written attention blocks


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_export_onto_an_existing_file_is_refused_unless_overwrite(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    run = tmp_path / "run"
    assert invoke("replace", "--model", FACTORY, "--with", "conv", "--out", run).exit_code == 0
    target = tmp_path / "model.pt2"
    target.write_bytes(b"the user's earlier export")
    one_line_error(invoke("export", run, "--out", target, "--format", "torch-export"), "exists", "--overwrite")
    assert target.read_bytes() == b"the user's earlier export"
    result = invoke("export", run, "--out", target, "--format", "torch-export", "--overwrite", "--allow-code")
    assert result.exit_code == 0, result.output
    assert target.read_bytes() != b"the user's earlier export" and target.stat().st_size > 1000


def test_recipe_out_holding_other_files_or_another_recipe_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    one_line_error(invoke("recipe", "mnist", "--out", mine), "holds other files", "thesis.tex", "--overwrite")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # nothing written
    other = tmp_path / "other"
    claim_run_directory(other, "minilm")
    one_line_error(invoke("recipe", "mnist", "--out", other), "'minilm' recipe run", "another --out")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(invoke("recipe", "mnist", "--out", afile), "is a file")


def test_a_recipe_run_directory_is_claimed_once_and_resumable(tmp_path):
    out = tmp_path / "run"
    claim_run_directory(out, "mnist")
    assert json.loads((out / MARKER).read_text()) == {"recipe": "mnist"}
    (out / "mhlstm").mkdir()  # a stage folder of the started run
    claim_run_directory(out, "mnist")  # the rerun resumes it
    with pytest.raises(OutputExistsError, match="'mnist' recipe run"):
        claim_run_directory(out, "deit")
    # a finished run from before the marker existed is recognised by its report
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"recipe": "minilm", "rows": []}))
    claim_run_directory(old, "minilm")
    with pytest.raises(OutputExistsError):
        claim_run_directory(old, "mnist")
    # --overwrite runs beside the user's files and keeps them
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("keep")
    claim_run_directory(beside, "mnist", overwrite=True)
    assert (beside / "notes.txt").read_text() == "keep" and (beside / MARKER).is_file()
    with pytest.raises(StorageError):
        claim_run_directory(beside / "notes.txt", "mnist")
