"""Recipes take each replacement's settings (``replacement_settings``) and, for MNIST, a teacher-derived
start; both are checked before any work and recorded so a rerun cannot mix settings."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import surgery
from recipes import claim_settings, replacement_settings
from recipes.causal_lm import CausalLmConfig
from recipes.minilm import MinilmConfig
from recipes.mnist import MnistConfig, build_vit, run_mnist
from surgery.cli import app
from surgery.errors import SurgeryError

runner = CliRunner()


def test_settings_apply_to_every_replacement_or_to_the_one_named():
    assert replacement_settings("hidden_per_head=16", ["mhlstm", "gru"]) == \
        {"mhlstm": {"hidden_per_head": 16}, "gru": {"hidden_per_head": 16}}
    assert replacement_settings("linear.window=8, linear.feature_map=relu, mhlstm.hidden_per_head=8",
                                ["mhlstm", "linear"]) == \
        {"mhlstm": {"hidden_per_head": 8}, "linear": {"window": 8, "feature_map": "relu"}}
    assert replacement_settings(" ", ["conv"]) == {"conv": {}}


@pytest.mark.parametrize("text, message", [
    ("linear.windw=8", "unknown setting"),          # a typo in the key, named with the known ones
    ("window=8", "unknown setting"),                # applies to mhlstm too, which has no window
    ("gru.hidden_per_head=8", "does not use"),      # a replacement this run does not build
    ("window", "KEY=VALUE"),
])
def test_bad_settings_are_one_line_errors(text, message):
    with pytest.raises(SurgeryError, match=message) as error:
        replacement_settings(text, ["mhlstm", "linear"])
    assert "\n" not in str(error.value)


def test_recipe_configs_check_the_settings_before_any_work():
    with pytest.raises(SurgeryError, match="unknown setting"):
        MinilmConfig(replacements="linear", replacement_settings="linear.windw=8").check()
    with pytest.raises(SurgeryError, match="unknown setting"):
        MnistConfig(replacements="conv", replacement_settings="window=8").check()
    with pytest.raises(SurgeryError, match="unknown setting"):
        CausalLmConfig(replacement="gru", replacement_settings="window=8").check()
    assert MinilmConfig(replacements="linear,conv", replacement_settings="linear.window=8").settings_of == \
        {"linear": {"window": 8}, "conv": {}}
    assert CausalLmConfig(replacement="linear", replacement_settings="window=64").settings_of == {"window": 64}
    with pytest.raises(SurgeryError, match="init must be"):
        MnistConfig(init="value").check()


def test_cli_refuses_a_bad_setting_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["recipe", "minilm", "--replacements", "linear", "--replacement-settings",
                                 "linear.windw=8", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "unknown setting" in result.output
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    claim_settings(tmp_path / "linear", {"window": 8})
    claim_settings(tmp_path / "linear", {"window": 8})  # the same settings: a resume
    with pytest.raises(SurgeryError, match="started with replacement settings"):
        claim_settings(tmp_path / "linear", {"window": 4})
    (tmp_path / "old" / "stage1").mkdir(parents=True)  # a run from before settings were recorded
    with pytest.raises(SurgeryError, match="default settings"):
        claim_settings(tmp_path / "old", {"window": 4})
    claim_settings(tmp_path / "fresh", {})
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / "recipe.json").write_text("{}")  # the CLI's claim of the run directory
    claim_settings(tmp_path / "claimed", {"window": 4})


def test_mnist_linear_starts_from_the_teachers_qkv_with_its_settings(tmp_path):
    torch.manual_seed(0)
    config = MnistConfig(replacements="linear", replacement_settings="window=4", init="teacher", init_batches=1,
                         teacher_epochs=1, batch_size=16, stage1_epochs=1, stage1_lr=1e-12, stage2_epochs=0,
                         limit=32)
    report = run_mnist(config, tmp_path, log=lambda _: None)
    assert [(r["replacement"], r["stage"]) for r in report["rows"]] == \
        [("attention (teacher)", "teacher"), ("linear", "stage1")]
    teacher = surgery.load(tmp_path / "teacher", model=build_vit())
    student = surgery.load(tmp_path / "linear" / "stage1", model=build_vit())
    mixers = [m for m in student.modules() if type(m).__name__ == "GatedLinearAttention"]
    assert len(mixers) == len(teacher.blocks) and all(m.config.window == 4 for m in mixers)
    # init=teacher copied each block's query projection (the first third of timm's fused qkv);
    # stage 1 ran at lr 1e-12, so the copy is what is left
    width = teacher.blocks[0].attn.qkv.out_features // 3
    for block, mixer in zip(teacher.blocks, mixers):
        query = [m for n, m in mixer.named_modules() if n.endswith("q_proj") or n == "q"]
        assert query, [n for n, _ in mixer.named_modules()]
        torch.testing.assert_close(query[0].weight, block.attn.qkv.weight[:width], atol=1e-6, rtol=0)
    # the same directory with other settings is refused, not silently reloaded
    with pytest.raises(SurgeryError, match="replacement settings"):
        run_mnist(MnistConfig(**{**config.__dict__, "replacement_settings": "window=2"}), tmp_path,
                  log=lambda _: None)
