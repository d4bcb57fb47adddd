"""Replacements of the user's own: ``--plugin MODULE`` and installed ``surgery.replacements`` entry points."""

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery import registry
from surgery.cli import app

runner = CliRunner()

MIXER = '''
import torch
from torch import nn

from surgery import register_replacement


@register_replacement("{name}")
class RunningMean(nn.Module):
    """Running mean over real tokens (a user's own replacement)."""

    def __init__(self, shape, config):
        super().__init__()
        self.proj = nn.Linear(shape.input_dim, shape.output_dim)

    def forward(self, x, padding_mask=None):
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return self.proj(x).cumsum(1) / steps
'''


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    """Each test starts from the built-ins only; modules it imports are forgotten afterwards."""
    surgery.list_replacements()  # built-ins registered before the snapshot
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LOADED_ENTRY_POINTS", set())
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("user_plugin_"):
            del sys.modules[name]


def write_module(directory, module, body):
    (directory / f"{module}.py").write_text(textwrap.dedent(body))
    return module


def fake_entry_points(monkeypatch, *entries):
    """Make importlib.metadata report ``entries`` (name, value) in the surgery.replacements group."""
    calls = []

    def entry_points(**selection):
        calls.append(selection)
        group = selection.get("group")
        return [importlib.metadata.EntryPoint(name, value, group) for name, value in entries
                if group == registry.ENTRY_POINT_GROUP]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def invoke(*args):
    return runner.invoke(app, list(args))


def test_plugin_option_on_replace_and_list(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "user_plugin_mean", MIXER.format(name="user_mean"))
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--plugin", "user_plugin_mean",
                    "--with", "user_mean", "--out", str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["replacement"] == "user_mean"
    assert json.loads(result.stdout)["sites"] == 2
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {site["replacement"] for site in manifest["sites"]} == {"user_mean"}
    listing = invoke("list", "--plugin", "user_plugin_mean", "--json")
    assert listing.exit_code == 0, listing.output
    assert "Running mean over real tokens" in {r["name"]: r["description"] for r in
                                               json.loads(listing.stdout)["replacements"]}["user_mean"]


def test_plugin_is_found_in_the_working_directory(tmp_path, monkeypatch):
    # the console script has no working directory on sys.path; --plugin looks there as python -m would
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    write_module(tmp_path, "user_plugin_cwd", MIXER.format(name="user_cwd"))
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--plugin", "user_plugin_cwd",
                    "--with", "user_cwd", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sites"] == 2
    assert str(tmp_path) not in sys.path  # only while importing


def test_without_the_plugin_the_name_is_unknown_and_the_error_says_how(tmp_path):
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--with", "user_missing")
    assert result.exit_code == 2, result.output
    assert "unknown replacement 'user_missing'" in result.stderr
    assert "--plugin MODULE" in result.stderr and "surgery.replacements" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("body, message", [
    (None, "ModuleNotFoundError: No module named 'user_plugin_bad'"),
    ("raise RuntimeError('needs a GPU library\\nsecond line')", "RuntimeError: needs a GPU library"),
    ("def broken(:\n", "SyntaxError"),
])
def test_broken_plugin_is_one_line_naming_it(tmp_path, monkeypatch, body, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    if body is not None:
        write_module(tmp_path, "user_plugin_bad", body)
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--plugin", "user_plugin_bad")
    assert result.exit_code == 2, result.output
    assert "replacement plugin 'user_plugin_bad' failed to load" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_entry_point_is_loaded_only_when_a_name_is_missing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "user_plugin_installed", MIXER.format(name="user_installed"))
    calls = fake_entry_points(monkeypatch, ("mean_mixers", "user_plugin_installed"))
    assert registry.get_replacement("conv").name == "conv"
    assert calls == [] and "user_plugin_installed" not in sys.modules  # built-ins need no plugin
    spec = registry.get_replacement("user_installed")
    assert spec.module_class.__module__ == "user_plugin_installed"
    assert calls == [{"group": "surgery.replacements"}]


def test_entry_point_replacement_from_the_cli_and_in_a_saved_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "user_plugin_entry", MIXER.format(name="user_entry"))
    fake_entry_points(monkeypatch, ("mean_mixers", "user_plugin_entry:RunningMean"))
    listing = invoke("list", "--json")
    assert "user_entry" in {r["name"] for r in json.loads(listing.stdout)["replacements"]}
    out = tmp_path / "run"
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--with", "user_entry",
                    "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    # a later process knows nothing of the plugin until a lookup of its name needs it
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "user_entry"})
    monkeypatch.setattr(registry, "_LOADED_ENTRY_POINTS", set())
    del sys.modules["user_plugin_entry"]
    model = surgery.load(out, allow_code=True)
    wrappers = list(surgery.swap.replaced_sites(model))
    assert [w.replacement for w in wrappers] == ["user_entry", "user_entry"]
    assert model(model.example_inputs()).shape[0] == 2


def test_broken_entry_point_is_one_line_naming_it(monkeypatch):
    fake_entry_points(monkeypatch, ("gpu_mixers", "user_plugin_absent.mixers"))
    with pytest.raises(surgery.SurgeryError, match=r"replacement plugin 'gpu_mixers' \(user_plugin_absent.mixers, "
                       r"entry point group 'surgery.replacements'\) failed to load: ModuleNotFoundError"):
        registry.get_replacement("user_gpu")
    assert registry.get_replacement("mhlstm").name == "mhlstm"  # the built-ins still work
    result = invoke("replace", "--model", "py:models:hand_written_factory", "--with", "user_gpu")
    assert result.exit_code == 2 and "gpu_mixers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plugin_replacement_sees_the_padding_mask(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "user_plugin_masked", MIXER.format(name="user_masked"))
    registry.load_plugin("user_plugin_masked")
    mixer = registry.get_replacement("user_masked").build(registry.MixerShape(8, 8, 2))
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    # different batch shapes: BLAS may round differently per shape and CPU, so fp32 to ~1 ulp
    # of the values, not bit for bit
    torch.testing.assert_close(mixer(x, mask)[1, :3], mixer(x[1:, :3])[0], rtol=1e-5, atol=1e-6)
    # the running mean is causal, so the real positions alone cannot show the mask arrived: the
    # padded positions average zeros instead of the padding's values
    assert not torch.allclose(mixer(x, mask)[1, 3:], mixer(x)[1, 3:], atol=1e-3)


@pytest.mark.parametrize("command", ["distill", "prune", "bench", "export"])
def test_commands_on_saved_runs_take_plugins_first(tmp_path, monkeypatch, command):
    # a saved run made with a plugin replacement needs the plugin before it is loaded
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "imported"
    module = write_module(tmp_path, f"marker_plugin_{command}", f"open({str(marker)!r}, 'w').close()\n")
    extra = ["--out", str(tmp_path / "model.onnx")] if command == "export" else []
    result = invoke(command, str(tmp_path / "no-such-run"), *extra, "--plugin", module)
    assert marker.is_file(), result.output
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    broken = invoke(command, str(tmp_path / "no-such-run"), *extra, "--plugin", "no_such_plugin_module_xyz")
    assert broken.exit_code == 2 and "no_such_plugin_module_xyz" in broken.output
