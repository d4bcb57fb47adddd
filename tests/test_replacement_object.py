"""A replacement is one object: its record carries every form and hook, and the module picks the
form that fits (inference form in eval mode without gradients, batched training form otherwise,
reference form under tracers and inside ``reference_forms``), all computing the same function.

The second half runs the complete example replacement of docs/how-to/custom-replacement.md (the
``my_mixers.py`` block, taken from the page itself) through distill, prune, save/load, bench and
export, with no edit anywhere else.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from models import build, main_tensor, run
from surgery import registry
from surgery.fast import kernel_status, optimize
from surgery.registry import MixerShape, get_replacement, reference_forms, replacement_of

ROOT = Path(__file__).resolve().parent.parent
TOL = {"atol": 2e-5, "rtol": 1e-4}


def _mixer(name, causal=False, layers=1, heads=2, dim=16):
    config = {} if name == "conv" else {"num_layers": layers}
    torch.manual_seed(0)
    return get_replacement(name).build(MixerShape(dim, dim, heads, causal), config)


def _masks(batch=3, length=9):
    right = torch.ones(batch, length, dtype=torch.bool)
    right[1, 6:] = False
    right[2, 2:] = False
    left = torch.ones(batch, length, dtype=torch.bool)
    left[1, :3] = False
    return {"none": None, "all-real": torch.ones(batch, length, dtype=torch.bool), "right-padded": right,
            "left-padded": left}


def _pruned(mixer, sizes):
    """Heads of different sizes, as global pruning leaves them."""
    for head, hidden in zip(mixer.heads, sizes):
        rnn = head.rnn
        head.rnn = type(rnn)(rnn.input_size, hidden, num_layers=rnn.num_layers, batch_first=True,
                             bidirectional=rnn.bidirectional)
        head.out = nn.Linear(hidden * (2 if rnn.bidirectional else 1), head.out.out_features)
    return mixer


def _reference(mixer, x, mask):
    with reference_forms(), torch.no_grad():
        return mixer(x, mask)


CASES = [(name, causal, layers) for name in ("mhlstm", "gru") for causal in (False, True) for layers in (1, 2)]


@pytest.mark.parametrize("mask_name", ["none", "all-real", "right-padded", "left-padded"])
@pytest.mark.parametrize("name, causal, layers", CASES + [("conv", False, 1), ("conv", True, 1)])
def test_eval_without_grad_and_training_compute_the_reference_function(name, causal, layers, mask_name):
    mixer = _mixer(name, causal, layers)
    x = torch.randn(3, 9, 16, requires_grad=True)
    mask = _masks()[mask_name]
    expected = _reference(mixer.eval(), x, mask)
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x.detach(), mask), expected, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, mask), expected, **TOL)
    trained = mixer.train()(x, mask)  # the batched training form, with gradients
    torch.testing.assert_close(trained.detach(), expected, **TOL)
    grad, = torch.autograd.grad(trained.square().sum(), x)
    with reference_forms():
        expected_grad, = torch.autograd.grad(mixer(x, mask).square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, **TOL)


@pytest.mark.parametrize("name", ["mhlstm", "gru"])
def test_heads_pruned_to_different_sizes_in_every_form(name):
    mixer = _pruned(_mixer(name, heads=3, dim=24), [8, 3, 5])
    x = torch.randn(2, 7, 24)
    mask = _masks(3, 7)["right-padded"][:2]
    expected = _reference(mixer.eval(), x, mask)
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x, mask), expected, **TOL)
    torch.testing.assert_close(mixer.train()(x, mask).detach(), expected, **TOL)


def test_which_form_runs():
    mixer = _mixer("mhlstm").eval()
    x = torch.randn(1, 5, 16)
    with torch.inference_mode():
        mixer(x)
    fast = mixer.inference_form(x)
    if kernel_status()["available"]:
        assert type(fast).__name__ == "FastMultiHeadRecurrent"
        assert mixer.inference_form(x) is fast  # packed once, reused
    else:  # without the native kernel the per-head reference form is the faster one
        assert fast is None
    loop = mixer.inference_form(x, use_kernel=False)  # the PyTorch loop, asked for
    assert type(loop).__name__ == "FastMultiHeadRecurrent" and loop.use_kernel is False
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x), _reference(mixer, x, None), **TOL)
    assert "_inference_cache" not in json.dumps(list(mixer.state_dict()))  # nothing of it is saved
    with torch.enable_grad():  # eval mode WITH gradients (e.g. Taylor importance) trains-style
        y = mixer(x.requires_grad_())
    assert y.requires_grad


def test_the_inference_form_follows_weight_changes():
    """An optimiser step, load_state_dict and pruning change tensor versions or storage: repacked."""
    mixer = _mixer("mhlstm").eval()
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        before = mixer(x)
    optimiser = torch.optim.SGD(mixer.parameters(), lr=0.5)
    mixer.train()(x).square().sum().backward()
    optimiser.step()
    mixer.eval()
    with torch.inference_mode():
        after = mixer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _reference(mixer, x, None), **TOL)
    other = _mixer("mhlstm")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    mixer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x), _reference(mixer, x, None), **TOL)


def test_deepcopy_and_device_moves_do_not_share_the_packed_weights():
    mixer = _mixer("gru").eval()
    x = torch.randn(1, 4, 16)
    with torch.inference_mode():
        mixer(x)
    twin = copy.deepcopy(mixer)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), _reference(twin, x, None), **TOL)
        torch.testing.assert_close(mixer(x), _reference(mixer, x, None), **TOL)


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
def test_a_whole_model_is_fast_in_eval_and_saves_loads_at_any_time(replacement, tmp_path):
    model, inputs = build("hf_bert")
    surgery.replace_attention(model, replacement, inputs)
    inputs["attention_mask"][1, 8:] = 0
    model.eval()
    with torch.inference_mode():
        fast = main_tensor(run(model, inputs))  # the inference form packs itself here
    with reference_forms(), torch.no_grad():
        reference = main_tensor(run(model, inputs))
    torch.testing.assert_close(fast, reference, **TOL)
    optimize(model)  # the compatibility call: nothing needs it, nothing breaks
    surgery.save(model, tmp_path / "run")
    again = surgery.load(tmp_path / "run", model=build("hf_bert")[0])
    assert not again.training
    with torch.inference_mode():
        torch.testing.assert_close(main_tensor(run(again, inputs)), fast, **TOL)


def test_a_pruned_model_reloads_through_the_resize_hooks(tmp_path):
    model, x = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", x, targets=["blocks.0.attn"])
    surgery.replace_attention(model, "conv", x, targets=["blocks.1.attn"])
    surgery.prune(model, x, ratio=0.4, measure_flops=False)
    surgery.finalize(model)
    hidden = [h.rnn.hidden_size for h in model.blocks[0].attn.mixer.heads]
    surgery.save(model, tmp_path / "pruned")
    again = surgery.load(tmp_path / "pruned", model=build("timm_vit")[0])
    assert [h.rnn.hidden_size for h in again.blocks[0].attn.mixer.heads] == hidden
    assert again.blocks[1].attn.mixer.pre_proj.out_features == model.blocks[1].attn.mixer.pre_proj.out_features
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model.eval()(x), **TOL)


def test_state_keys_keep_the_layout_of_earlier_versions():
    """Saved run directories from before load: the per-head nn.LSTM keys are unchanged."""
    mixer = _mixer("mhlstm", heads=2)
    assert sorted(mixer.state_dict()) == sorted(
        ["pre_proj.weight", "pre_proj.bias"]
        + [f"heads.{k}.{p}" for k in range(2) for p in (
            "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0",
            "rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0_reverse", "rnn.bias_ih_l0_reverse",
            "rnn.bias_hh_l0_reverse", "out.weight", "out.bias")])


def test_every_builtin_record_carries_its_hooks():
    for name in ("mhlstm", "gru", "conv"):
        spec = get_replacement(name)
        assert spec.make_pruner() is not None and spec.resize is not None and spec.init_from_teacher is not None
        assert spec.inference_form is not None
        assert spec.decoding is not None  # issue 13: every built-in decodes at causal sites (tests/test_decoding.py)
        assert replacement_of(spec.build(MixerShape(8, 8, 2))) is spec
    assert get_replacement("mhlstm").training_form is not None
    assert {"aten::lstm", "aten::gru"} <= set(registry.registered_flop_handles())
    with pytest.raises(surgery.SurgeryError, match="unknown hook"):
        registry.register_replacement("bad_hooks_test", resize_on_load=len)


def test_fast_false_in_distill_runs_the_reference_form():
    from surgery.distill.fastpath import fast_mixers

    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    mixer = next(surgery.swap.replaced_sites(model)).mixer
    calls = []
    original = mixer.reference_forward
    mixer.reference_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    with fast_mixers(model, enabled=False):
        mixer(torch.randn(1, 17, 32))
    assert calls
    calls.clear()
    mixer(torch.randn(1, 17, 32))  # training mode: the batched form
    assert not calls


# ------------------------------------------------------------------- the documented example

PAGE = ROOT / "docs" / "how-to" / "custom-replacement.md"


@pytest.fixture()
def my_mixers(tmp_path, monkeypatch):
    """The page's ``my_mixers.py`` block, written to a file and imported (a fresh registry copy)."""
    text = PAGE.read_text()
    block = re.search(r'```python title="my_mixers.py"\n(.*?)\n```', text, re.S)
    assert block, "docs/how-to/custom-replacement.md lost its my_mixers.py block"
    (tmp_path / "my_mixers.py").write_text(block.group(1))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_mixers", None)
    import my_mixers  # noqa: F401  (registers window_mean)

    yield sys.modules["my_mixers"]
    sys.modules.pop("my_mixers", None)


def _small_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def test_the_documented_example_plugs_into_everything(my_mixers, tmp_path):
    from surgery.export import export
    from surgery.measure import compare, count_flops

    spec = get_replacement("window_mean")
    assert spec.make_pruner() is not None and spec.init_from_teacher is not None and spec.resize is None
    teacher = _small_vit().eval()
    images = torch.randn(4, 3, 32, 32)
    data = [torch.randn(4, 3, 32, 32) for _ in range(6)]
    student = copy.deepcopy(teacher)
    surgery.replace_attention(student, "window_mean", images, config={"window": 3})

    # distill: the teacher-derived start, then a few steps; both lower the site error
    before = surgery.evaluate_fidelity(None, student, data[4:])
    result = surgery.distill(None, student, data[:4], steps=4, init="teacher", init_batches=2, lr=1e-3,
                             eval_batches=2)
    after = surgery.evaluate_fidelity(None, student, data[4:])
    assert result.steps == 4
    assert sum(s.relative_mse for s in after.sites) < sum(s.relative_mse for s in before.sites)

    # prune: its units in the global ranking, tensors really shrink
    report = surgery.prune(student, images, ratio=0.5, scope="replacements", measure_flops=False)
    widths = [w.mixer.pre_proj.out_features for w in surgery.swap.replaced_sites(student)]
    assert sum(widths) < 2 * 64 and report.params_after < report.params_before

    # save / load: the pruned widths come back by plain Linear resizing
    surgery.finalize(student)
    surgery.save(student, tmp_path / "run")
    again = surgery.load(tmp_path / "run", model=_small_vit())
    assert [w.mixer.pre_proj.out_features for w in surgery.swap.replaced_sites(again)] == widths
    with torch.inference_mode():
        torch.testing.assert_close(again(images), student.eval()(images), **TOL)

    # bench: parameters, FLOPs and latency against the original, in one run
    rows = {r["metric"]: r for r in compare(teacher, again, images[:1], repeats=2, warmup=1, memory=False)}
    assert rows["params"]["ratio"] < 1 and rows["flops"]["candidate"] == count_flops(again, images[:1]) > 0

    # export: ONNX through the exporter, checked against PyTorch
    exported = export(again, images[:1], tmp_path / "window.onnx", exporter="torchscript")
    assert exported.max_abs_error <= 1e-4 and (tmp_path / "window.onnx").is_file()


def test_a_pruned_run_saved_by_an_earlier_version_loads_fast_and_equal():
    """tests/data/run_e77ba96_mhlstm_pruned: timm_vit + mhlstm, pruned at 0.4 (heads of different
    sizes), finalized and saved by commit e77ba96 (before a replacement was one object)."""
    from safetensors.torch import load_file

    run_dir = ROOT / "tests" / "data" / "run_e77ba96_mhlstm_pruned"
    expected = load_file(str(run_dir / "expected.safetensors"))
    again = surgery.load(run_dir, model=build("timm_vit")[0])
    assert not again.training
    sizes = {h.rnn.hidden_size for w in surgery.swap.replaced_sites(again) for h in w.mixer.heads}
    assert len(sizes) > 1  # pruned heads of different sizes came back
    with torch.inference_mode():
        torch.testing.assert_close(again(expected["inputs"]), expected["outputs"], **TOL)
