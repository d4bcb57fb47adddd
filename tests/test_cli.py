"""The CLI: list, inspect, replace; bad input gives one line and exit code 2."""

import json
import sys

import pytest
from typer.testing import CliRunner

import surgery
from surgery.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_list_json():
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"mhlstm", "gru", "conv"} <= {r["name"] for r in data["replacements"]}
    assert data["aliases"]["deit_base"] == "deit_base_patch16_224"


def test_inspect_model_json():
    result = invoke("inspect", "--model", "deit_tiny", "--random-init", "--json")
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)
    assert len(sites) == 12 and sites[0]["name"] == "blocks.0.attn" and sites[0]["num_heads"] == 3


def test_replace_then_inspect_run(tmp_path):
    out = tmp_path / "run"
    result = invoke("replace", "--model", "deit_tiny", "--with", "mhlstm", "--random-init", "--out", str(out),
                    "--set", "hidden_per_head=32")
    assert result.exit_code == 0, result.output
    assert "blocks.11.attn" in result.stdout
    listing = invoke("inspect", str(out), "--json")
    manifest = json.loads(listing.stdout)
    assert len(manifest["sites"]) == 12
    assert manifest["sites"][0]["config"]["hidden_per_head"] == 32
    assert manifest["source"] == "deit_tiny_patch16_224"


def test_replace_minilm_table(tmp_path):
    result = invoke("replace", "--model", "minilm", "--with", "conv", "--out", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert "encoder.layer.5.attention.self" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["replace", "--model", "deit_tny", "--random-init"], "Did you mean 'deit_tiny'"),
    (["replace", "--model", "deit_tiny", "--with", "lstm", "--random-init"], "unknown replacement"),
    (["replace", "--model", "deit_tiny", "--random-init", "--set", "depth"], "key=value"),
    (["replace", "--model", "deit_tiny", "--random-init", "--set", "kernel=3"], "unknown setting"),
    (["inspect", "/nonexistent/run"], "no manifest.json"),
    (["inspect"], "either a saved directory"),
    (["inspect", "--model", "hf:/nonexistent/dir"], "offline"),
    (["replace", "--model", "deit_tiny", "--checkpoint", "/nonexistent.pth"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_py_model_spec(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--with", "gru",
                    "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sites"] == 2
    listing = invoke("inspect", str(tmp_path / "r"), "--json")
    assert json.loads(listing.stdout)["source"] == "py:models:hand_written_factory"


USER_MODEL = '''
import torch
from torch import nn


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)

    def forward(self, x):
        return self.layer(x)

    def example_inputs(self):
        return torch.randn(2, 5, 16)


def build():
    torch.manual_seed(0)
    return TinyEncoder()
'''


def test_py_model_spec_from_the_working_directory(tmp_path, monkeypatch):
    # the console script, unlike python -m, has no working directory on sys.path: py: specs look there
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_model_cwd.py").write_text(USER_MODEL)
    try:
        result = invoke("replace", "--model", "py:user_model_cwd:build", "--with", "conv", "--out", "run", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["sites"] == 1
        assert str(tmp_path) not in sys.path  # only while importing
        sys.modules.pop("user_model_cwd")  # as in a new process
        assert type(surgery.load("run", allow_code=True).layer.self_attn).__name__ == "ReplacedAttention"
        # rebuilding a saved py: source still needs the explicit opt-in
        refused = invoke("export", "run", "--out", "model.pt2")
        assert refused.exit_code == 2 and "--allow-code" in refused.stderr
    finally:
        sys.modules.pop("user_model_cwd", None)
