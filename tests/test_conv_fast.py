"""conv's inference form (tokens-last, oneDNN depthwise convolution with the GELU fused) computes what
its reference (training) form computes, within 1e-5 in float32, wherever eval mode runs it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import surgery
from models import build, main_tensor, run
from surgery.fast import ReferenceForms
from surgery.registry import MixerShape, reference_forms
from surgery.replacements import conv as conv_module
from surgery.replacements.conv import FastTokenConvolution, TokenConvolution, TokenConvolutionConfig

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["native", "fused", "unfused"])
def path(request, monkeypatch):
    """Every inference path: the native token-convolution kernel (where it compiles), oneDNN's fused
    op (where this build has it) and conv2d + GELU."""
    if request.param == "native" and conv_module._native_kernel() is None:
        pytest.skip(f"native kernel unavailable: {surgery.fast.kernel_status()['error']} "
                    "(the oneDNN and conv2d cases still run)")
    if request.param == "fused" and not conv_module._fused_op_available():
        pytest.skip("this torch build has no oneDNN fused convolution (the unfused case still runs)")
    monkeypatch.setitem(conv_module._FUSED, "native", request.param == "native")
    monkeypatch.setitem(conv_module._FUSED, "available", request.param == "fused")
    return request.param


def _mixer(dim=24, causal=False, kernel=7, layers=2, seed=0) -> TokenConvolution:
    torch.manual_seed(seed)
    mixer = TokenConvolution(MixerShape(dim, dim, 3, causal), TokenConvolutionConfig(kernel, layers)).eval()
    with torch.no_grad():  # a trained-looking mixer: non-zero kernels and biases of either sign
        for conv in mixer.convs:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.3)
    return mixer


def _masks(batch: int, length: int) -> list[torch.Tensor | None]:
    right = torch.ones(batch, length, dtype=torch.bool)
    right[0, length - 3:] = False
    left = torch.ones(batch, length, dtype=torch.bool)
    left[-1, :2] = False
    return [None, right, left]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel, layers", [(7, 2), (4, 1), (3, 3), (1, 1)])
@pytest.mark.parametrize("batch, length", [(1, 197 // 8), (3, 10), (2, 1)])
def test_inference_form_equals_the_reference_form(path, causal, kernel, layers, batch, length):
    mixer = _mixer(causal=causal, kernel=kernel, layers=layers)
    x = torch.randn(batch, length, 24) * 2
    for mask in _masks(batch, length) if length > 3 else [None]:
        with torch.inference_mode():
            fast = mixer(x, mask)
            expected = mixer.reference_forward(x, mask)
            with reference_forms():
                assert torch.equal(mixer(x, mask), expected)
        torch.testing.assert_close(fast, expected, **TOLERANCE)
        assert conv_module._PACKED[mixer][1][0] == path


def test_the_fast_path_runs_only_in_eval_without_gradients():
    mixer = _mixer()
    x = torch.randn(2, 9, 24)
    out = mixer.train()(x)
    out.sum().backward()  # training form: gradients reach the kernels
    assert mixer.convs[0].weight.grad is not None and mixer not in conv_module._PACKED
    with torch.no_grad():
        mixer.eval()(x)
    assert mixer in conv_module._PACKED


def test_cached_kernels_follow_weight_changes(path):
    mixer = _mixer()
    x = torch.randn(2, 11, 24)
    with torch.inference_mode():
        before = mixer(x)
    with torch.no_grad():
        mixer.convs[1].weight.mul_(-2)  # an optimiser step changes the version
    with torch.inference_mode():
        after = mixer(x)
        torch.testing.assert_close(after, mixer.reference_forward(x), **TOLERANCE)
    assert not torch.allclose(before, after)
    mixer.load_state_dict(_mixer(seed=1).state_dict())  # new storage
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x), mixer.reference_forward(x), **TOLERANCE)


def test_pruned_width(path):
    mixer = _mixer(dim=24)
    shapes = {"pre_proj.weight": (10, 24), "pre_proj.bias": (10,), "out.weight": (24, 10), "out.bias": (24,),
              "convs.0.weight": (10, 1, 7), "convs.0.bias": (10,), "convs.1.weight": (10, 1, 7),
              "convs.1.bias": (10,)}
    conv_module.resize(mixer, shapes)
    x = torch.randn(2, 13, 24)
    with torch.inference_mode():
        torch.testing.assert_close(mixer(x), mixer.reference_forward(x), **TOLERANCE)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated; fvcore still uses it
def test_tracer_sees_the_reference_form():
    mixer = _mixer()
    x = torch.randn(1, 8, 24)
    with torch.no_grad():
        traced = torch.jit.trace(mixer, (x,))
    graph = str(traced.inlined_graph)
    assert "_convolution_pointwise" not in graph and "aten::_convolution" in graph
    torch.testing.assert_close(traced(x), mixer.reference_forward(x), **TOLERANCE)


def test_fast_module_folds_a_following_projection(path):
    mixer = _mixer()
    projection = nn.Linear(24, 24)
    x = torch.randn(2, 12, 24)
    mask = _masks(2, 12)[1]
    with torch.inference_mode():
        expected = projection(mixer.reference_forward(x, mask))
        torch.testing.assert_close(FastTokenConvolution(mixer, projection)(x, mask), expected, **TOLERANCE)
        torch.testing.assert_close(FastTokenConvolution(mixer)(x, mask), mixer.reference_forward(x, mask),
                                   **TOLERANCE)


def test_other_dtypes_use_the_reference_form():
    mixer = _mixer().double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(mixer(x), mixer.reference_forward(x))
    assert mixer not in conv_module._PACKED


@pytest.mark.parametrize("case", ["timm_vit", "hand_written_causal", "hf_bert"])
def test_whole_model_eval_equals_the_reference_form(path, case):
    model, inputs = build(case)
    surgery.replace_attention(model, "conv", inputs)
    surgery.finalize(model)
    if isinstance(inputs, dict):
        inputs["attention_mask"][0, 9:] = 0
    with torch.no_grad():
        for wrapper in surgery.swap.replaced_sites(model):
            for conv in wrapper.mixer.convs:
                conv.weight.normal_(0, 0.3)
    model.eval()
    copy.deepcopy(model)  # packed kernels are not module state: copies (and pickles) still work
    torch.save(model, io.BytesIO())
    with torch.inference_mode():
        expected = main_tensor(run(ReferenceForms(copy.deepcopy(model)), inputs))
        got = main_tensor(run(model, inputs))
    torch.testing.assert_close(got, expected, **TOLERANCE)


def _vit_with_conv():
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "conv", inputs)
    surgery.finalize(model)
    with torch.no_grad():
        for wrapper in surgery.swap.replaced_sites(model):
            for conv in wrapper.mixer.convs:
                conv.weight.normal_(0, 0.3)
    return model.eval(), inputs


def _count_projection_calls(wrapper) -> list[int]:
    """Count the reused projection's forward calls (an instance attribute, not a hook: a hook
    would itself switch the fold off)."""
    calls = [0]
    projection = wrapper.out_projection
    original = type(projection).forward

    def counted(x):
        calls[0] += 1
        return original(projection, x)

    projection.forward = counted
    return calls


def test_site_folds_the_projection_into_conv_in_eval(path):
    """In eval mode without gradients a conv site runs one folded form (projection multiplied into
    ``out``) instead of the mixer and then the projection, with the same outputs within 1e-5; the
    fold follows weight changes of the projection and of the mixer."""
    model, inputs = _vit_with_conv()
    wrappers = list(surgery.swap.replaced_sites(model))
    calls = _count_projection_calls(wrappers[0])
    with torch.inference_mode():
        expected = main_tensor(run(ReferenceForms(model), inputs))
        assert calls[0] == 1  # the reference form runs the projection
        got = main_tensor(run(model, inputs))
    assert calls[0] == 1, "the folded form should have replaced the projection's own call"
    assert all(w.mixer in conv_module._FOLDED for w in wrappers)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    for change in (wrappers[0].out_projection.weight, wrappers[0].mixer.out.bias):
        with torch.no_grad():
            change.mul_(1.5)  # bumps the version: the next call folds again
        with torch.inference_mode():
            expected = main_tensor(run(ReferenceForms(model), inputs))
            got = main_tensor(run(model, inputs))
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_fold_steps_aside_for_hooks_gradients_and_training():
    """A hook on the projection (or the mixer) must see its module run, gradients and training need
    the modules themselves: in each case the site runs the mixer and then the projection."""
    model, inputs = _vit_with_conv()
    wrapper = next(iter(surgery.swap.replaced_sites(model)))
    calls = _count_projection_calls(wrapper)
    seen = []
    handle = wrapper.out_projection.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.inference_mode():
        run(model, inputs)
    assert calls[0] == 1 and len(seen) == 1
    handle.remove()
    handle = wrapper.mixer.pre_proj.register_forward_pre_hook(lambda module, args: None)
    with torch.inference_mode():
        run(model, inputs)
    assert calls[0] == 2
    handle.remove()
    main_tensor(run(model, inputs)).sum().backward()  # eval mode, gradients on
    assert calls[0] == 3 and wrapper.out_projection.weight.grad is not None
    model.train()
    with torch.no_grad():
        run(model, inputs)
    assert calls[0] == 4
    model.eval()
    with torch.inference_mode():
        run(model, inputs)
    assert calls[0] == 4  # folded again


@pytest.mark.parametrize("channels", [192, 20, 8, 1])
@pytest.mark.parametrize("kernel, left", [(7, 3), (7, 6), (4, 1), (1, 0)])
def test_native_token_convolution_paths_equal_the_reference(channels, kernel, left):
    """The native kernel's AVX-512 path (taken where the CPU has it) and its AVX2 path both compute
    y + gelu(depthwise(y)) as conv1d and the exact GELU do, within 1e-5: masked channel tails, taps
    past either end, sequences shorter than the kernel."""
    native = conv_module._native_kernel()
    if native is None:
        pytest.skip(f"native kernel unavailable: {surgery.fast.kernel_status()['error']}")
    generator = torch.Generator().manual_seed(channels + kernel)
    for length in (1, 3, 29):
        y = torch.randn(2, length, channels, generator=generator) * 3
        weight = torch.randn(channels, 1, kernel, generator=generator) * 0.4
        bias = torch.randn(channels, generator=generator)
        padded = torch.nn.functional.pad(y.transpose(1, 2), (left, kernel - 1 - left))
        expected = torch.nn.functional.gelu(torch.nn.functional.conv1d(padded, weight, bias, groups=channels))
        expected = expected.transpose(1, 2) + y
        packed = weight[:, 0, :].T.contiguous()
        wide = native.token_conv_gelu(y, packed, bias, left)
        try:
            native.use_avx512(False)
            narrow = native.token_conv_gelu(y, packed, bias, left)
            no_bias = native.token_conv_gelu(y, packed, torch.empty(0), left)
        finally:
            native.use_avx512(True)
        torch.testing.assert_close(wide, expected, **TOLERANCE)
        torch.testing.assert_close(narrow, expected, **TOLERANCE)
        bias_free = torch.nn.functional.gelu(torch.nn.functional.conv1d(padded, weight, None, groups=channels))
        torch.testing.assert_close(no_bias, bias_free.transpose(1, 2) + y, **TOLERANCE)


def test_gelu_of_the_native_kernel_over_a_wide_range():
    """The kernel's GELU against float64 over [-30, 30] (1 tap of weight 1, no bias): within 2e-6."""
    native = conv_module._native_kernel()
    if native is None:
        pytest.skip(f"native kernel unavailable: {surgery.fast.kernel_status()['error']}")
    x = torch.linspace(-30, 30, 16 * 2001).view(1, 2001, 16).contiguous()
    for wide in (True, False):
        try:
            native.use_avx512(wide)
            got = native.token_conv_gelu(x, torch.ones(1, 16), torch.zeros(16), 0) - x
        finally:
            native.use_avx512(True)
        error = (got.double() - torch.nn.functional.gelu(x.double())).abs().max().item()
        assert error < 2e-6, (wide, error)
