"""Recipes end to end at toy scale (a few steps, tiny data), their registry, CLI and bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import recipes
from recipes.deit import DeitConfig, check_image_folder, run_deit
from recipes.minilm import MinilmConfig, retrieval_agreement, run_minilm
from recipes.mnist import MnistConfig, run_mnist
from surgery.cli import app
from surgery.errors import DataError, SurgeryError, UnknownNameError

runner = CliRunner()


def quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------ registry

def test_registry_lists_builtins_and_rejects_unknown_names():
    assert [r.name for r in recipes.list_recipes()] == ["causal-lm", "deit", "minilm", "mnist"]
    with pytest.raises(UnknownNameError, match="did you mean|Did you mean"):
        recipes.get_recipe("mnsit")


def test_make_config_checks_names_and_coerces_strings():
    recipe = recipes.get_recipe("mnist")
    config = recipe.make_config(stage1_lr="0.01", limit="12", replacements="conv")
    assert config.stage1_lr == 0.01 and config.limit == 12
    with pytest.raises(SurgeryError, match="unknown setting"):
        recipe.make_config(stage_one_lr=1.0)
    with pytest.raises(SurgeryError, match="not a valid"):
        recipe.make_config(seed="three")
    with pytest.raises(SurgeryError, match="unknown replacement"):
        recipe.make_config(replacements="mhlstm,transformer")
    names = {name for name, _, _ in recipe.settings()}
    assert {"replacements", "prune_ratio", "stage1_epochs"} <= names
    assert all(help_text for _, _, help_text in recipe.settings())


def test_deit_learning_rates_scale_with_batch_size():
    tiny, small = DeitConfig(model="deit_tiny", batch_size=1024), DeitConfig(model="deit_small", batch_size=256)
    assert tiny.lr_stage1 == pytest.approx(1e-3) and tiny.lr_stage2 == pytest.approx(1e-4)
    assert small.lr_stage1 == pytest.approx(2.5e-4) and small.lr_stage2 == pytest.approx(1e-5)
    assert small.lr_recovery == pytest.approx(2.5e-6)


def test_retrieval_agreement_counts_neighbour_matches():
    base = torch.nn.functional.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert retrieval_agreement(base, base) == {"top1": 100.0, "top5": 100.0}
    shuffled = torch.nn.functional.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    noisy = retrieval_agreement(base, shuffled)
    assert 0 <= noisy["top1"] <= noisy["top5"] < 100


# ------------------------------------------------------------------------------------ MNIST

@pytest.mark.slow
def test_mnist_recipe_end_to_end_with_pruning_and_resume(tmp_path):
    config = MnistConfig(replacements="conv", teacher_epochs=1, batch_size=16, stage1_epochs=1,
                         stage2_epochs=0.5, prune_ratio=0.3, recovery_epochs=0.5, limit=32)
    report = run_mnist(config, tmp_path, log=quiet)
    stages = [(r["replacement"], r["stage"]) for r in report["rows"]]
    assert stages == [("attention (teacher)", "teacher"), ("conv", "stage1"), ("conv", "stage2"),
                      ("conv", "prune"), ("conv", "recovery")]
    by_stage = {r["stage"]: r for r in report["rows"]}
    assert all(0 <= r["test_accuracy"] <= 100 for r in report["rows"])
    assert by_stage["stage1"]["steps"] == 2 and by_stage["recovery"]["steps"] == 1
    assert by_stage["prune"]["params"] < by_stage["stage2"]["params"]
    assert -1 <= by_stage["stage1"]["site_cosine"] <= 1
    for path in ("teacher/manifest.json", "conv/stage1/fidelity.json", "conv/stage2/manifest.json",
                 "conv/prune/manifest.json", "conv/recovery/model.safetensors", "report.json", "report.md"):
        assert (tmp_path / path).is_file(), path
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert "| conv | recovery |" in (tmp_path / "report.md").read_text()
    # a second run with the same directory reloads every finished stage: same models, same numbers
    again = run_mnist(config, tmp_path, log=quiet)
    assert [r["test_accuracy"] for r in again["rows"]] == [r["test_accuracy"] for r in report["rows"]]
    assert [r["params"] for r in again["rows"]] == [r["params"] for r in report["rows"]]
    # a stage directory run with other settings is never silently reused
    with pytest.raises(SurgeryError, match="other settings"):
        run_mnist(MnistConfig(**{**config.__dict__, "stage1_lr": 0.5}), tmp_path, log=quiet)


# ------------------------------------------------------------------------------------ DeiT

def _image_folder(root: Path, classes: int = 2, per_class: int = 4, val: bool = True) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val") if val else ("train",):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_deit_recipe_end_to_end_on_an_image_folder(tmp_path):
    data = _image_folder(tmp_path / "data")
    config = DeitConfig(model="deit_tiny", data=str(data), random_init=True, replacement="conv", batch_size=4,
                        stage1_steps=2, stage2_steps=1, workers=0, eval_images=4)
    report = run_deit(config, tmp_path / "run", log=quiet)
    assert [r["stage"] for r in report["rows"]] == ["teacher", "stage1", "stage2"]
    assert all(0 <= r["val_accuracy"] <= 100 for r in report["rows"])
    assert report["plan"]["stage1_lr"] == pytest.approx(5e-4 * 4 / 512)
    assert report["notes"], "the deviations from FAR's reference must be reported"
    for path in ("conv/stage1/checkpoint.pt", "conv/stage2/manifest.json", "final/manifest.json", "report.md"):
        assert (tmp_path / "run" / path).is_file(), path


def test_deit_bad_inputs_fail_in_one_line_before_work(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_image_folder(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no train/"):
        check_image_folder(str(tmp_path / "flat"))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        check_image_folder(str(tmp_path / "empty"))
    data = _image_folder(tmp_path / "data", val=False)
    wrong = tmp_path / "wrong.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), wrong)
    result = runner.invoke(app, ["recipe", "deit", "--model", "deit_tiny", "--data", str(data),
                                 "--checkpoint", str(wrong), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "does not fit" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "mhlstm").exists(), "no stage may start after a bad checkpoint"
    result = runner.invoke(app, ["recipe", "deit", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["recipe", "deit", "--model", "vit_tiny", "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a DeiT" in result.output


# ------------------------------------------------------------------------------------ MiniLM

@pytest.mark.slow
def test_minilm_recipe_end_to_end(tmp_path):
    # text:builtin: the default mix (text:python+english) costs ~1 min of tokenising here; the mix
    # itself is tested in test_data_english.py
    config = MinilmConfig(replacements="conv", data="text:builtin", blockwise_steps=2, e2e_steps=1, batch_size=4,
                          seq_len=16, eval_sentences=40)
    report = run_minilm(config, tmp_path, log=quiet)
    teacher, student = report["rows"]
    assert teacher["retrieval_top1"] == 100.0 and teacher["embedding_cosine"] == 1.0
    assert student["replacement"] == "conv"
    assert -1 <= student["embedding_cosine"] <= 1 and math.isfinite(student["embedding_cosine"])
    assert 0 <= student["retrieval_top1"] <= student["retrieval_top5"] <= 100
    assert (tmp_path / "conv" / "e2e" / "manifest.json").is_file() and (tmp_path / "report.json").is_file()
    assert not (tmp_path / "conv" / "e2e" / "teacher_cache").exists()  # removed once the phase is done


def test_minilm_rejects_a_missing_text_source(tmp_path):
    result = runner.invoke(app, ["recipe", "minilm", "--data", "text:/no/such/file.txt", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output


# ------------------------------------------------------------------------------------ CLI

def test_cli_lists_recipes_and_explains_settings():
    result = runner.invoke(app, ["recipe", "list", "--json"])
    assert result.exit_code == 0
    listed = {r["name"]: r for r in json.loads(result.output)}
    assert set(listed) == {"causal-lm", "deit", "minilm", "mnist"}
    assert listed["deit"]["settings"]["base_lr_stage1"] == 5e-4
    result = runner.invoke(app, ["recipe", "deit", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--data", "--checkpoint", "--prune-ratio", "--batch-size"):
        assert option in result.output
    result = runner.invoke(app, ["recipe", "mnist", "--out", "x", "--no-such-setting", "1"])
    assert result.exit_code == 2


def test_minilm_rejects_no_steps_at_all(tmp_path):
    result = runner.invoke(app, ["recipe", "minilm", "--blockwise-steps", "0", "--e2e-steps", "0",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not both 0" in result.output
