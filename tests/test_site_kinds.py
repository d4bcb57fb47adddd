"""Attention that is not N-to-N self-attention is reported (kind, reason), never replaced by an
N-to-N mixer in silence; one unusual site does not stop the others; causality comes from the
mask reaching the attention core, not from what random weights happen to do (issue 17)."""

import pytest
import torch
from torch import nn

import surgery
from models import (ClassAttentionModel, DownsamplingModel, HandWrittenModel, TalkingHeadsModel,
                    TwoStreamModel, WindowedModel, ids, tiny_t5, tiny_vit)
from surgery.swap import ReplacedAttention

# name -> (factory, inputs, {site: kind} of the unusual sites, the self-attention sites)
UNUSUAL = {
    "class_attention": (ClassAttentionModel, lambda: ids(2, 12, 50), {"head": "query-subset"},
                        ["blocks.0.mixer", "blocks.1.mixer"]),
    "two_stream": (TwoStreamModel, lambda: (torch.randn(2, 6, 32), torch.randn(2, 5, 32)),
                   {"cross": "cross"}, ["image.mixer", "text.mixer"]),
    "downsampling": (DownsamplingModel, lambda: ids(2, 12, 50), {"down": "query-subset"}, ["block.mixer"]),
    "windowed_4d": (WindowedModel, lambda: ids(2, 16, 50), {"windows": "windowed"}, ["block.mixer"]),
}


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _build(case):
    factory, inputs, *_ = UNUSUAL[case]
    torch.manual_seed(0)
    return factory().eval(), inputs()


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_unusual_sites_are_found_with_their_kind(case):
    _, _, unusual, plain = UNUSUAL[case]
    model, inputs = _build(case)
    sites = {s.name: s for s in surgery.find_attention(model, inputs)}
    assert set(sites) == set(unusual) | set(plain)
    assert {name: sites[name].kind for name in unusual} == unusual
    assert all(sites[name].kind == "self" and not sites[name].causal for name in plain)
    assert all(sites[name].note for name in unusual)  # what showed the kind


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_by_default_an_unusual_site_refuses_the_whole_swap(case):
    _, _, unusual, _ = UNUSUAL[case]
    model, inputs = _build(case)
    before = _run(model, inputs)
    name = next(iter(unusual))
    with pytest.raises(surgery.UnsupportedSiteError, match=f"'{name}'.*{unusual[name]}") as error:
        surgery.replace_attention(model, "mhlstm", inputs)
    assert len(str(error.value).splitlines()) == 1
    assert not any(isinstance(m, ReplacedAttention) for m in model.modules())  # untouched
    torch.testing.assert_close(_run(model, inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("replacement", ["mhlstm", "conv"])
@pytest.mark.parametrize("case", list(UNUSUAL))
def test_skip_replaces_the_rest_and_reports_the_unusual(case, replacement):
    _, _, unusual, plain = UNUSUAL[case]
    model, inputs = _build(case)
    before = _run(model, inputs)
    report = surgery.replace_attention(model, replacement, inputs, on_unsupported="skip")
    assert [s.site.name for s in report.sites] == plain
    assert {s.name: s.kind for s in report.skipped} == unusual
    assert all(f"{replacement!r} serves self sites only" in s.reason for s in report.skipped)
    for name in unusual:
        assert not isinstance(model.get_submodule(name), ReplacedAttention)
    after = _run(model, inputs)
    assert after.shape == before.shape and torch.isfinite(after).all()
    # the unusual sites still compute what they did: only the replaced ones changed the output
    surgery.use_original_attention(model)
    torch.testing.assert_close(_run(model, inputs), before, rtol=1e-6, atol=1e-6)


def test_talking_heads_projection_is_the_one_after_the_value_product():
    torch.manual_seed(0)
    model, inputs = TalkingHeadsModel().eval(), ids(2, 12, 50)
    (site,) = surgery.find_attention(model, inputs)
    # not the Linear(heads, heads) that mixes the softmax weights across heads
    assert (site.out_proj, site.num_heads, site.head_dim, site.context_dim) == ("proj", 4, 8, 32)
    before = _run(model, inputs)
    surgery.replace_attention(model, "mhlstm", inputs, sites=[site])
    assert _run(model, inputs).shape == before.shape
    assert model.attn.proj is model.attn.original.proj  # the projection is reused


def test_timm_cait_talking_heads_replaced_class_attention_skipped():
    from timm.models.cait import Cait

    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, depth_token_only=1,
                 num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    sites = {s.name: s for s in surgery.find_attention(model, x)}
    talking, cls = sites["blocks.0.attn"], sites["blocks_token_only.0.attn"]
    assert (talking.module_type, talking.kind, talking.out_proj, talking.head_dim) == ("TalkingHeadAttn", "self", "proj", 16)
    assert (cls.module_type, cls.kind, cls.note) == ("ClassAttn", "query-subset", "17 tokens in, 1 out")
    before = _run(model, x)
    report = surgery.replace_attention(model, "mhlstm", x, on_unsupported="skip")
    assert [s.site.name for s in report.sites] == ["blocks.0.attn", "blocks.1.attn"]
    assert [s.name for s in report.skipped] == ["blocks_token_only.0.attn"]
    assert _run(model, x).shape == before.shape


def test_torchvision_swin_windowed_sites_do_not_abort_discovery():
    import torchvision

    torch.manual_seed(0)
    swin = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
        num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    sites = surgery.find_attention(swin, x)
    assert [(s.name, s.kind, s.embed_dim) for s in sites] == [
        ("features.1.0.attn", "windowed", 16), ("features.3.0.attn", "windowed", 32)]
    with pytest.raises(surgery.UnsupportedSiteError, match="can serve none.*windowed"):
        surgery.replace_attention(swin, "mhlstm", x, on_unsupported="skip")


class _NotCalled(nn.Module):
    """One block the forward never reaches: it cannot be described, the others still are."""

    def __init__(self) -> None:
        super().__init__()
        self.model = HandWrittenModel()
        self.spare = HandWrittenModel().blocks[0].mixer

    def forward(self, x):
        return self.model(x)


def test_an_undescribable_site_is_listed_as_skipped_or_raised():
    model, inputs = _NotCalled().eval(), ids(2, 10, 50)
    targets = ["model.blocks.0.mixer", "model.blocks.1.mixer", "spare"]
    sites = surgery.find_attention(model, inputs, targets=targets)
    assert [s.name for s in sites] == ["model.blocks.0.mixer", "model.blocks.1.mixer"]
    assert [(s.name, s.kind) for s in sites.skipped] == [("spare", "unsupported")]
    assert "was not called" in sites.skipped[0].reason
    with pytest.raises(surgery.SurgeryError, match="'spare' was not called"):
        surgery.find_attention(model, inputs, targets=targets, on_unsupported="raise")
    report = surgery.replace_attention(model, "conv", inputs, targets=targets, on_unsupported="skip")
    assert len(report.sites) == 2 and [s.name for s in report.skipped] == ["spare"]


def test_seq2seq_decoder_cross_attention_is_skipped_and_the_rest_replaced():
    torch.manual_seed(0)
    model = tiny_t5().eval()
    sites = {s.name: s for s in surgery.find_attention(model)}  # guessed inputs include decoder ids
    kinds = {(n.split(".")[0], s.kind, s.causal) for n, s in sites.items()}
    assert kinds == {("encoder", "self", False), ("decoder", "self", True), ("decoder", "cross", False)}
    report = surgery.replace_attention(model, "mhlstm", on_unsupported="skip")
    assert len(report.sites) == 4
    assert all("EncDecAttention" in s.name and s.kind == "cross" for s in report.skipped)
    x, y = ids(2, 9), ids(2, 4)
    assert model(input_ids=x, decoder_input_ids=y).logits.shape == (2, 4, 100)


def test_causality_comes_from_the_core_not_from_the_weights():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    assert {(s.causal, s.causal_source) for s in surgery.find_attention(vit, x)} == {(False, "graph")}
    # weights that hide every dependence fool a perturbation probe (nothing moves), not the graph
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
    sites = surgery.find_attention(vit, x)
    assert {(s.causal, s.causal_source) for s in sites} == {(False, "graph")}
    assert all("probe saw no dependence" in s.note for s in sites)
    causal = surgery.find_attention(HandWrittenModel(causal=True), ids(vocab=50))
    assert {(s.causal, s.causal_source) for s in causal} == {(True, "graph")}


def test_random_init_timm_vit_tiny_is_bidirectional_everywhere():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    sites = surgery.find_attention(model, torch.randn(1, 3, 224, 224))
    assert len(sites) == 12 and {(s.causal, s.causal_source) for s in sites} == {(False, "graph")}


# ----------------------------------------------------------------------------- verify before commit
class _DropLastToken(nn.Module):
    """A broken mixer: one token short."""

    def __init__(self, shape, config) -> None:
        super().__init__()
        self.proj = nn.Linear(shape.input_dim, shape.output_dim)

    def forward(self, x, padding_mask=None):
        return self.proj(x[:, :-1])


class _Bidirectional(nn.Module):
    """A mixer that ignores ``shape.causal``: every output reads the mean of all tokens."""

    def __init__(self, shape, config) -> None:
        super().__init__()
        self.proj = nn.Linear(shape.input_dim, shape.output_dim)

    def forward(self, x, padding_mask=None):
        return self.proj(x + x.mean(1, keepdim=True))


@pytest.fixture(scope="module")
def broken_replacements():
    surgery.register_replacement("test_drop_last_token")(_DropLastToken)
    surgery.register_replacement("test_bidirectional")(_Bidirectional)
    surgery.register_replacement("test_all_kinds", serves=("self", "query-subset"))(_Bidirectional)


def test_a_replacement_with_the_wrong_output_is_refused_before_the_swap(broken_replacements):
    model, inputs = HandWrittenModel().eval(), ids(2, 10, 50)
    with pytest.raises(surgery.UnsupportedSiteError, match="'blocks.0.mixer' failed the check.*nothing was replaced"):
        surgery.replace_attention(model, "test_drop_last_token", inputs)
    assert not any(isinstance(m, ReplacedAttention) for m in model.modules())


def test_a_non_causal_replacement_at_a_causal_site_is_refused(broken_replacements):
    model, inputs = HandWrittenModel(causal=True).eval(), ids(2, 10, 50)
    with pytest.raises(surgery.UnsupportedSiteError, match="causal"):
        surgery.replace_attention(model, "test_bidirectional", inputs)
    assert not any(isinstance(m, ReplacedAttention) for m in model.modules())
    # the same mixer is fine where attention is bidirectional
    report = surgery.replace_attention(HandWrittenModel().eval(), "test_bidirectional", inputs)
    assert len(report.sites) == 2


def test_a_declared_kind_is_still_checked(broken_replacements):
    """A replacement may declare it serves class attention; the check still catches an N-to-N
    output there (reported as skipped with on_unsupported='skip')."""
    torch.manual_seed(0)
    model, inputs = ClassAttentionModel().eval(), ids(2, 12, 50)
    report = surgery.replace_attention(model, "test_all_kinds", inputs, on_unsupported="skip")
    assert [s.site.name for s in report.sites] == ["blocks.0.mixer", "blocks.1.mixer"]
    assert [(s.name, s.kind) for s in report.skipped] == [("head", "query-subset")]
    assert "failed the check" in report.skipped[0].reason and "(2, 12, 32)" in report.skipped[0].reason


def test_unknown_kinds_are_refused_at_registration():
    with pytest.raises(surgery.SurgeryError, match="unknown site kinds"):
        surgery.register_replacement("test_bad_kinds", serves=("self", "sideways"))


# ----------------------------------------------------------------------------- mode preserved
@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
def test_replacements_take_the_training_mode_of_the_original(replacement):
    model, inputs = HandWrittenModel().eval(), ids(2, 10, 50)
    surgery.replace_attention(model, replacement, inputs)
    wrappers = [m for m in model.modules() if isinstance(m, ReplacedAttention)]
    assert wrappers and not any(m.training for w in wrappers for m in w.modules())
    model = HandWrittenModel().train()
    surgery.replace_attention(model, replacement, inputs)
    assert all(m.training for w in model.modules() if isinstance(w, ReplacedAttention) for m in w.modules())


# ----------------------------------------------------------------------------- the CLI
def _invoke(*args):
    from typer.testing import CliRunner

    from surgery.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_inspect_of_a_saved_seq2seq_reports_cross_attention_as_skipped(tmp_path):
    import json

    torch.manual_seed(0)
    tiny_t5().save_pretrained(tmp_path / "t5")
    result = _invoke("inspect", "--model", f"hf:{tmp_path / 't5'}", "--json")
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)
    assert len(sites) == 6
    skipped = [s for s in sites if s["skip_reason"]]
    assert [s["kind"] for s in skipped] == ["cross", "cross"] and all("EncDecAttention" in s["name"] for s in skipped)
    table = _invoke("inspect", "--model", f"hf:{tmp_path / 't5'}")
    assert "2 attention sites skipped" in table.stdout
    strict = _invoke("inspect", "--model", f"hf:{tmp_path / 't5'}", "--strict")
    assert strict.exit_code == 2 and "cross-attention" in strict.stderr and "Traceback" not in strict.output
    # (transformers' own weight-loading progress bar may come before the one error line)
    assert strict.stderr.strip().splitlines()[-1].startswith("error: --strict: 'mhlstm' would skip 2 site(s)")


def test_cli_replace_with_inputs_from_a_file(tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    spec = ["--model", "py:models:two_stream_factory", "--with", "conv", "--allow-code"]
    guessed = _invoke("replace", *spec)
    assert guessed.exit_code == 2 and "cannot guess example inputs" in guessed.stderr
    file = tmp_path / "inputs.safetensors"
    save_file({"0": torch.randn(2, 6, 32), "1": torch.randn(2, 5, 32)}, str(file))
    result = _invoke("replace", *spec, "--inputs", str(file), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sites"] == 2 and [s["name"] for s in summary["skipped"]] == ["cross"]
    strict = _invoke("replace", *spec, "--inputs", str(file), "--strict")
    assert strict.exit_code == 2 and "'cross'" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    torch.save({"image": torch.randn(2, 6, 32), "text": torch.randn(2, 5, 32)}, tmp_path / "named.pt")
    named = _invoke("replace", *spec, "--inputs", str(tmp_path / "named.pt"), "--json")
    assert named.exit_code == 0, named.output and json.loads(named.stdout)["sites"] == 2
    (tmp_path / "bad.pt").write_text("not tensors")
    bad = _invoke("replace", *spec, "--inputs", str(tmp_path / "bad.pt"))
    assert bad.exit_code == 2 and "cannot read example inputs" in bad.stderr


def test_cross_attention_is_told_from_the_graph_even_when_weights_hide_it():
    """Zeroed key/value projections make the output ignore the second stream, so perturbing it
    moves nothing; the graph still shows the keys read another input than the queries."""
    torch.manual_seed(0)
    model, inputs = TwoStreamModel().eval(), (torch.randn(2, 6, 32), torch.randn(2, 5, 32))
    with torch.no_grad():
        for layer in (model.cross.k, model.cross.v):
            layer.weight.zero_()
            layer.bias.zero_()
    sites = {s.name: s for s in surgery.find_attention(model, inputs)}
    assert sites["cross"].kind == "cross" and "graph" in sites["cross"].note
    assert sites["image.mixer"].kind == sites["text.mixer"].kind == "self"
