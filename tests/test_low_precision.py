"""Opt-in float16 recurrent weights (``surgery.fast.optimize(model, recurrent_weights="float16")``):
close to float32 within a stated tolerance, computing exactly the rounded-weights function it
claims, float32 exact by default, refused for bad values and where nothing would use it, undone
by asking for float32 again."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import surgery
from models import tiny_vit
from replacements.recurrence import DECODING, RECURRENT_WEIGHTS
from surgery import fast
from surgery.errors import SurgeryError
from surgery.registry import MixerShape, get_replacement, reference_forms
from surgery.swap import replaced_sites

#: float16 W_hh vs float32, on a tiny ViT with random weights: max |difference| of the logits as a
#: fraction of the largest |logit| (measured ~1e-5 for mhlstm and 3e-5 for gru; float16 keeps 11
#: significant bits, a relative rounding of at most 4.9e-4 per weight)
FLOAT16_TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=["kernel", "torch-loop"])
def use_kernel(request):
    if request.param == "torch-loop":
        return False
    required = os.environ.get("SURGERY_FAST_KERNEL") == "1"
    if shutil.which("c++") is None and shutil.which("g++") is None and not required:
        pytest.skip("no C++ compiler: the native kernel cannot be built here (the torch-loop cases still run)")
    status = fast.kernel_status()
    if not status["available"] and not required:
        pytest.skip(f"native kernel unavailable: {status['error']} (the torch-loop cases still run)")
    assert status["available"], status["error"]
    return True


def replaced_vit(replacement: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(3, 3, 32, 32)
    surgery.replace_attention(model, replacement, x)
    return surgery.finalize(model).eval(), x


def forms(model: torch.nn.Module) -> list:
    return [wrapper.mixer.inference_form() for wrapper in replaced_sites(model)]


@pytest.mark.parametrize("replacement", ["mhlstm", "gru"])
def test_float16_is_close_to_float32_and_float32_is_exact(replacement, use_kernel):
    model, x = replaced_vit(replacement)
    with torch.no_grad():
        with reference_forms():
            reference = model(x)
        default = fast.optimize(model, use_kernel=use_kernel)(x)
        assert all(form.recurrent_weights == "float32" for form in forms(model))
        assert (default - reference).abs().max() <= 1e-5
        half = fast.optimize(model, use_kernel=use_kernel, recurrent_weights="float16")(x)
    assert all(form.recurrent_weights == "float16" for form in forms(model))
    difference = (half - default).abs().max()
    assert 0 < difference <= FLOAT16_TOLERANCE * default.abs().max()  # rounded, and only that
    assert (half.argmax(-1) == default.argmax(-1)).all()


@pytest.mark.parametrize("replacement", ["mhlstm", "gru"])
def test_float16_kernel_computes_the_rounded_weights_function(replacement):
    """The kernel's float16 path equals the PyTorch loop run with W_hh rounded to float16."""
    if not fast.kernel_status()["available"] or not surgery.replacements.native.load_kernel().half_weights:
        pytest.skip("no native kernel with float16 weights (F16C) here")
    model, x = replaced_vit(replacement)
    with torch.no_grad():
        kernel = fast.optimize(model, use_kernel=True, recurrent_weights="float16")(x)
        assert all(getattr(form, "w_hh_tiled0").dtype == torch.float16 for form in forms(model))
        loop = fast.optimize(model, use_kernel=False, recurrent_weights="float16")(x)
    assert (kernel - loop).abs().max() <= 1e-5


@pytest.mark.parametrize("replacement", ["mhlstm", "gru"])
def test_switching_back_to_float32_is_exact_again(replacement, use_kernel):
    model, x = replaced_vit(replacement)
    with torch.no_grad():
        with reference_forms():
            reference = model(x)
        fast.optimize(model, use_kernel=use_kernel, recurrent_weights="float16")(x)
        back = fast.optimize(model, use_kernel=use_kernel)(x)  # the default is float32
    assert all(form.recurrent_weights == "float32" for form in forms(model))
    assert (back - reference).abs().max() <= 1e-5


def test_the_choice_survives_a_weight_change(use_kernel):
    """A changed weight rebuilds the cached inference form in the chosen precision, not float32."""
    model, x = replaced_vit("mhlstm")
    fast.optimize(model, use_kernel=use_kernel, recurrent_weights="float16")
    before = forms(model)
    with torch.no_grad():
        for wrapper in replaced_sites(model):
            wrapper.mixer.heads[0].rnn.weight_hh_l0.mul_(0.5)
        model(x)
    after = forms(model)
    assert all(a is not b for a, b in zip(after, before))
    assert all(form.recurrent_weights == "float16" for form in after)


def test_a_bad_value_is_one_line_naming_the_choices():
    model, x = replaced_vit("gru")
    with pytest.raises(SurgeryError) as error:
        fast.optimize(model, recurrent_weights="bfloat16")
    message = str(error.value)
    assert "\n" not in message and "bfloat16" in message
    assert all(repr(choice) in message for choice in RECURRENT_WEIGHTS)
    assert all(form.recurrent_weights == "float32" for form in forms(model))  # nothing changed


def test_float16_without_recurrent_replacements_is_refused():
    model, x = replaced_vit("conv")
    with pytest.raises(SurgeryError, match="applies to recurrent replacements.*conv"):
        fast.optimize(model, recurrent_weights="float16")
    fast.optimize(model)  # the float32 default is accepted everywhere


def test_float16_where_no_inference_form_runs_is_refused():
    """A float64 model runs the reference form: float16 would be a silent no-op, so it is refused."""
    model, x = replaced_vit("mhlstm")
    model.double()
    with pytest.raises(SurgeryError, match="needs the CPU float32 inference form"):
        fast.optimize(model, recurrent_weights="float16")
    assert all("_recurrent_weights" not in wrapper.mixer.__dict__
               or wrapper.mixer.__dict__["_recurrent_weights"] == "float32" for wrapper in replaced_sites(model))


@pytest.mark.parametrize("replacement", ["mhlstm", "gru"])
def test_the_decode_step_follows_the_choice(replacement):
    """The decode step's packed weights use the chosen precision and go back to exact float32."""
    torch.manual_seed(0)
    mixer = get_replacement(replacement).build(MixerShape(32, 32, 2, True)).eval()
    prompt, token = torch.randn(2, 4, 32), torch.randn(2, 1, 32)
    with torch.no_grad():
        _, state = DECODING.prefill(mixer, prompt)  # a nonzero state: W_hh h matters from here
        reference, _ = DECODING.prefill(mixer, token, None, state)
        exact, _ = DECODING.step(mixer, token, state)
        mixer.inference_form(recurrent_weights="float16")
        half, _ = DECODING.step(mixer, token, state)
        mixer.inference_form(recurrent_weights="float32")
        back, _ = DECODING.step(mixer, token, state)
    assert (exact - reference).abs().max() <= 1e-5
    assert (back - reference).abs().max() <= 1e-5
    assert 0 < (half - exact).abs().max() <= FLOAT16_TOLERANCE * exact.abs().max()


def test_bench_cli_times_float16_recurrent_weights(tmp_path):
    import json

    from typer.testing import CliRunner

    from surgery.cli import app

    runner, out = CliRunner(), tmp_path / "run"
    result = runner.invoke(app, ["replace", "--model", "py:models:hand_written_factory", "--with", "gru",
                                 "--allow-code", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["bench", str(out), "--allow-code", "--recurrent-weights", "float16", "--repeats",
                                 "1", "--warmup", "0", "--threads", "1", "--no-flops", "--no-memory", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recurrent_weights"] == "float16"
    for bad in (["--recurrent-weights", "int8"], ["--recurrent-weights", "float16", "--no-fast"]):
        result = runner.invoke(app, ["bench", str(out), "--allow-code", *bad])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
