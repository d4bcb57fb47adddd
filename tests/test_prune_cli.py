"""The ``surgery prune`` command: prune a saved run, save it, reload it; refusals are one line."""

import json

import torch
from typer.testing import CliRunner

import surgery
from surgery.cli import app

runner = CliRunner()


def _replaced_run(tmp_path, monkeypatch, replacement="mhlstm"):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    run = tmp_path / "replaced"
    result = runner.invoke(app, ["replace", "--model", "py:models:hand_written_factory", "--with", replacement,
                                 "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    return run


def test_prune_saves_a_model_that_reloads_with_pruned_shapes(tmp_path, monkeypatch):
    run = _replaced_run(tmp_path, monkeypatch)
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(run), "--ratio", "0.5", "--out", str(out), "--allow-code", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["params_after"] < summary["params_before"]
    assert summary["flops_after"] < summary["flops_before"]
    model = surgery.load(out, allow_code=True)
    assert surgery.count_parameters(model) == summary["params_after"]
    heads = model.blocks[0].mixer.mixer.heads
    assert [h.rnn.hidden_size for h in heads] == [summary["kept_units"][f"blocks.0.mixer.mixer.heads.{k}"]
                                                 for k in range(len(heads))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["prune"]["importance"] == "magnitude"
    ids = torch.randint(0, 50, (2, 12))
    assert torch.isfinite(model(ids)).all()


def test_prune_table_output(tmp_path, monkeypatch):
    run = _replaced_run(tmp_path, monkeypatch, "conv")
    result = runner.invoke(app, ["prune", str(run), "--ratio", "0.3", "--scope", "replacements", "--allow-code",
                                 "--no-flops"])
    assert result.exit_code == 0, result.output
    assert "blocks.1.mixer.mixer" in result.stdout and "params:" in result.stdout


def test_prune_bad_input_is_one_line(tmp_path, monkeypatch):
    run = _replaced_run(tmp_path, monkeypatch)
    for args, message in [(["--ratio", "1.5"], "ratio must be"), (["--importance", "l2"], "importance must be"),
                          (["--recover-steps", "5"], "needs --data")]:
        result = runner.invoke(app, ["prune", str(run), "--allow-code", *args])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_prune_recovers_on_the_data_the_run_was_distilled_on(tmp_path, monkeypatch):
    run = _replaced_run(tmp_path, monkeypatch, "conv")
    (run / "config.json").write_text(json.dumps({"data": "random:4", "steps": 5}))
    result = runner.invoke(app, ["prune", str(run), "--ratio", "0.3", "--recover-steps", "2", "--allow-code",
                                 "--no-flops", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recovery"] is not None and summary["output_cosine_recovered"] is not None
