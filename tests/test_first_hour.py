"""A new user's first hour (issue 19): recipe routes as CLI defaults, --minutes, save/load of models
built in Python without passing the base model again, sentence-transformers use of a student."""

import json

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli import app

runner = CliRunner()


def _capture_distill(monkeypatch):
    """Replace the CLI's distillation call by a recorder: these tests check which settings reach it."""
    import surgery.cli.core as core

    calls = []
    monkeypatch.setattr(core, "run_distill", lambda run, **kwargs: calls.append(kwargs))
    return calls


# --- recipe routes as defaults -------------------------------------------------------------------

def test_minilm_alias_applies_the_recipe_route(tmp_path, monkeypatch):
    from recipes.minilm import MinilmConfig, REPLACE_DEFAULTS

    calls = _capture_distill(monkeypatch)
    result = runner.invoke(app, ["replace", "--model", "minilm", "--with", "conv", "--data", "text:builtin",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    (call,) = calls
    route, config = REPLACE_DEFAULTS["minilm"], MinilmConfig()
    assert (call["mode"], call["steps"], call["lr"]) == ("e2e", route["steps"], config.e2e_lr)
    assert (call["batch_size"], call["seq_len"]) == (config.batch_size, config.seq_len)
    assert call["settings"] == {"train": "all", "other_lr_scale": config.other_lr_scale, "init": config.init,
                                "init_batches": config.init_batches, "site_weight": config.site_weight,
                                "freeze": config.freeze, "group_by_length": config.group_by_length,
                                "max_seconds": 300}
    said = " ".join(result.stderr.split())  # the console may wrap the line
    assert "recipes/minilm.py" in said and "--mode e2e" in said, said
    assert f"--distill-set init_batches={config.init_batches}" in said
    assert "--distill-set 'freeze=*.word_embeddings.*'" in said


def test_every_flag_overrides_the_route_and_minutes_sets_max_seconds(tmp_path, monkeypatch):
    calls = _capture_distill(monkeypatch)
    result = runner.invoke(app, ["replace", "--model", "minilm", "--with", "conv", "--data", "text:builtin",
                                 "--out", str(tmp_path / "run"), "--steps", "7", "--lr", "0.01",
                                 "--distill-set", "site_weight=0.5", "--minutes", "2"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["mode"], call["steps"], call["lr"]) == ("e2e", 7, 0.01)
    assert call["settings"]["site_weight"] == 0.5 and call["settings"]["max_seconds"] == 120.0
    said = " ".join(result.stderr.split())
    assert "--steps" not in said and "site_weight" not in said and "max_seconds" not in said
    assert "--distill-set init=teacher" in said  # what was not given still comes from the route


def test_another_mode_than_the_route_s_drops_the_route(tmp_path, monkeypatch):
    calls = _capture_distill(monkeypatch)
    result = runner.invoke(app, ["replace", "--model", "minilm", "--with", "conv", "--data", "text:builtin",
                                 "--out", str(tmp_path / "run"), "--mode", "blockwise", "--steps", "3"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["mode"] == "blockwise" and call["lr"] is None and call["settings"] == {}
    assert "not applied" in " ".join(result.stderr.split())


def test_a_model_without_a_route_gets_no_defaults(tmp_path, monkeypatch):
    calls = _capture_distill(monkeypatch)
    result = runner.invoke(app, ["replace", "--model", "deit_tiny", "--random-init", "--with", "conv",
                                 "--data", "random", "--out", str(tmp_path / "run"), "--minutes", "0.5"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["mode"] is None and call["lr"] is None and call["settings"] == {"max_seconds": 30.0}
    assert "route" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--minutes", "3"], "add --data"),
    (["--data", "random", "--out", "RUN", "--minutes", "3", "--distill-set", "max_seconds=10"], "not both"),
    (["--data", "random", "--out", "RUN", "--minutes", "0"], "must be > 0"),
])
def test_minutes_errors_are_one_line(tmp_path, args, message):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    result = runner.invoke(app, ["replace", "--model", "deit_tiny", "--random-init", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- save / load alone for models built in Python -------------------------------------------------

def _round_trip(model, inputs, tmp_path, replacement="conv"):
    """Replace, save without a source, load with nothing but the directory; outputs must agree."""
    model.eval()
    surgery.replace_attention(model, replacement, inputs)
    with torch.no_grad():  # distinct weights in the mixers, so a wrong rebuild cannot pass by chance
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    surgery.save(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    again = surgery.load(tmp_path)
    assert type(again) is type(model) and not again.training
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(inputs))
    with torch.no_grad():
        expected, got = call(model), call(again)
    if not isinstance(expected, torch.Tensor):
        expected, got = expected[0], got[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return manifest["source"]


def test_timm_model_built_in_python_reloads_alone(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7)
    source = _round_trip(model, torch.randn(2, 3, 32, 32), tmp_path)
    assert source["kind"] == "timm" and source["architecture"] == "deit_tiny_patch16_224"
    assert source["kwargs"]["num_classes"] == 7 and source["kwargs"]["depth"] == 2
    assert source["kwargs"]["img_size"] == [32, 32]


def test_timm_class_built_directly_reloads_alone(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3,
                              mlp_ratio=2, num_classes=10, global_pool="avg")
    source = _round_trip(model, torch.randn(2, 1, 28, 28), tmp_path, replacement="mhlstm")
    assert source["architecture"] is None and source["kwargs"]["global_pool"] == "avg"
    assert source["kwargs"]["num_heads"] == 3


def test_hf_model_from_config_reloads_alone(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    inputs = {"input_ids": torch.randint(0, 99, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    source = _round_trip(BertModel(config), inputs, tmp_path)
    assert source["kind"] == "hf" and source["class"] == "BertModel"
    assert source["config"]["intermediate_size"] == 37


def test_torchvision_model_reloads_alone(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5)
    source = _round_trip(model, torch.randn(2, 3, 32, 32), tmp_path, replacement="gru")
    assert source["kind"] == "torchvision" and source["kwargs"]["num_classes"] == 5
    assert source["kwargs"]["num_layers"] == 2


def test_a_pruned_timm_model_built_in_python_reloads_alone(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7).eval()
    inputs = torch.randn(2, 3, 32, 32)
    surgery.replace_attention(model, "mhlstm", inputs)
    surgery.prune(model, inputs, ratio=0.3, scope="all")  # MLP widths no longer those of the architecture
    assert model.blocks[0].mlp.fc1.out_features != 768
    surgery.save(model, tmp_path)
    again = surgery.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(inputs), model.eval()(inputs), rtol=1e-5, atol=1e-5)


def test_a_description_that_does_not_fit_is_refused_in_one_line(tmp_path):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    surgery.save(model, tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"]["kwargs"]["img_size"] = [64, 64]  # as if the argument had not been recovered
    path.write_text(json.dumps(manifest))
    with pytest.raises(surgery.ManifestError, match="does not match the saved weights") as caught:
        surgery.load(tmp_path)
    assert "model=" in str(caught.value) and "\n" not in str(caught.value)


def test_an_undescribable_model_is_not_described_and_load_says_what_to_pass(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    # no position embedding: the argument is not readable from the model, and the check catches it
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="none")
    assert surgery.sources.describe_source(model) is None
    surgery.save(model, tmp_path)
    with pytest.raises(surgery.ManifestError, match=r"pass load\(directory, model="):
        surgery.load(tmp_path)
    assert type(surgery.load(tmp_path, model=VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="none"))) is VisionTransformer


def test_a_manifest_cannot_name_classes_outside_the_libraries(tmp_path):
    import timm

    surgery.save(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"] = {"kind": "timm", "class": "os.system", "architecture": None, "kwargs": {}}
    path.write_text(json.dumps(manifest))
    with pytest.raises(surgery.ManifestError, match="outside timm"):
        surgery.load(tmp_path)
    manifest["source"] = {"kind": "hf", "class": "AutoModel", "config": {"model_type": "bert"}}
    path.write_text(json.dumps(manifest))
    with pytest.raises(surgery.ManifestError, match="does not ship"):
        surgery.load(tmp_path)


# --- sentence-transformers -------------------------------------------------------------------------

SENTENCES = ["A cat sits on the mat.", "Stocks fell sharply today.",
             "The function returns a list of strings, one for each line of the file."]


def _mean_pooled(model, tokenizer, texts):
    """The library's own sentence embedding: mean over real tokens, then L2 normalisation."""
    from recipes.minilm import sentence_embeddings

    return sentence_embeddings(model, tokenizer, texts)


@pytest.fixture(scope="module")
def minilm_student():
    pytest.importorskip("sentence_transformers")
    from surgery.models import load_model

    torch.manual_seed(0)
    student = load_model("minilm")
    surgery.replace_attention(student, "conv")  # undistilled: far from the teacher, still a fine check
    return student


def test_sentence_transformer_encode_equals_the_library_embedding(minilm_student, tmp_path):
    from surgery.data import tokenizer_for
    from surgery.integrations.sentence_transformers import as_sentence_transformer

    model = as_sentence_transformer(minilm_student)
    got = model.encode(SENTENCES, convert_to_tensor=True)
    expected = _mean_pooled(minilm_student, tokenizer_for(minilm_student), SENTENCES)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    similarity = model.similarity(got, got)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(3), rtol=1e-4, atol=1e-4)
    # a run directory works too: load(), then the same wrapping (the source says which tokenizer)
    surgery.save(minilm_student, tmp_path / "run")
    again = as_sentence_transformer(tmp_path / "run").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(again.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_held_out_comparison_through_sentence_transformers(minilm_student):
    from recipes.minilm import held_out_sentences
    from surgery.data import tokenizer_for
    from surgery.integrations.sentence_transformers import as_sentence_transformer, mean_cosine
    from surgery.models import load_model

    texts = held_out_sentences("text:builtin", 40)
    teacher = load_model("minilm")
    tokenizer = tokenizer_for(teacher)
    recipe_cosine = float((_mean_pooled(minilm_student, tokenizer, texts)
                           * _mean_pooled(teacher, tokenizer, texts)).sum(-1).mean())
    through = mean_cosine(as_sentence_transformer(minilm_student), as_sentence_transformer(teacher), texts)
    assert 0 < through < 0.99  # an undistilled student: clearly not the teacher
    assert abs(through - recipe_cosine) < 1e-4


def test_any_hf_encoder_student_with_a_plain_base_directory(tmp_path):
    pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from surgery.integrations.sentence_transformers import as_sentence_transformer
    from surgery.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37, max_position_embeddings=128))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")  # a plain HF directory: no sentence-transformers config
    student = BertModel.from_pretrained(tmp_path / "base").eval()
    surgery.replace_attention(student, "gru")
    model = as_sentence_transformer(student, base=tmp_path / "base")
    got = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got.cpu(), _mean_pooled(student, tokenizer, SENTENCES), rtol=1e-4, atol=1e-5)


def test_sentence_transformer_errors_say_what_to_pass(tmp_path):
    pytest.importorskip("sentence_transformers")
    import timm
    from transformers import BertConfig, BertModel

    from surgery.errors import SurgeryError
    from surgery.integrations.sentence_transformers import as_sentence_transformer

    with pytest.raises(SurgeryError, match="needs a HuggingFace encoder"):
        as_sentence_transformer(timm.create_model("deit_tiny_patch16_224", depth=1))
    stranger = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=20))
    with pytest.raises(SurgeryError, match="pass base="):
        as_sentence_transformer(stranger)
    with pytest.raises(SurgeryError, match="not a local directory"):
        as_sentence_transformer(stranger, base=tmp_path / "missing")
    from surgery.models import minilm_path

    with pytest.raises(SurgeryError, match="does not fit"):
        as_sentence_transformer(stranger, base=minilm_path())
