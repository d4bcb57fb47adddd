"""surgery.fast: the inference form of mhlstm/gru computes what the training form computes."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

import surgery
from models import build, main_tensor, run
from replacements.gru import MultiHeadGRU, MultiHeadGRUConfig
from replacements.mhlstm import MultiHeadLSTM, MultiHeadLSTMConfig
from surgery import fast
from surgery.errors import SurgeryError
from surgery.registry import MixerShape

MIXERS = {"mhlstm": (MultiHeadLSTM, MultiHeadLSTMConfig), "gru": (MultiHeadGRU, MultiHeadGRUConfig)}


@pytest.fixture(scope="module", params=["kernel", "torch-loop"])
def use_kernel(request):
    # The PyTorch loop ("torch-loop") is the reference and runs everywhere. The native kernel is
    # optional (it needs a compiler and headers, and SURGERY_FAST_KERNEL=0 turns it off), so its
    # cases skip, saying why, where it is unavailable, unless SURGERY_FAST_KERNEL=1 asks for it.
    if request.param == "torch-loop":
        return False
    required = os.environ.get("SURGERY_FAST_KERNEL") == "1"
    if shutil.which("c++") is None and shutil.which("g++") is None and not required:
        pytest.skip("no C++ compiler: the native kernel cannot be built here (the torch-loop cases still run)")
    status = fast.kernel_status()  # compiles once per machine (cached by torch_extensions)
    if not status["available"] and not required:
        pytest.skip(f"native kernel unavailable: {status['error']} (the torch-loop cases still run; "
                    "SURGERY_FAST_KERNEL=1 makes this a failure)")
    assert status["available"], status["error"]
    return True


def _mixer(kind, causal=False, layers=1, heads=2, dim=16):
    cls, config = MIXERS[kind]
    return cls(MixerShape(dim, dim, heads, causal), config(num_layers=layers)).eval()


def _prune_heads(mixer, hidden_sizes):
    """Give each head its own hidden size, as global pruning leaves them (new random weights)."""
    for head, hidden in zip(mixer.heads, hidden_sizes):
        rnn = head.rnn
        head.rnn = type(rnn)(rnn.input_size, hidden, num_layers=rnn.num_layers, batch_first=True,
                             bidirectional=rnn.bidirectional)
        head.out = nn.Linear(hidden * (2 if rnn.bidirectional else 1), head.out.out_features)
    return mixer.eval()


def _masks(batch=3, length=9):
    right = torch.ones(batch, length, dtype=torch.bool)
    right[1, 6:] = False
    right[2, 2:] = False
    left = torch.ones(batch, length, dtype=torch.bool)
    left[1, :3] = False
    return {"none": None, "right-padded": right, "left-padded": left}


@pytest.mark.parametrize("mask_name", ["none", "right-padded", "left-padded"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["mhlstm", "gru"])
def test_fast_form_equals_training_form(kind, causal, layers, mask_name, use_kernel):
    mixer = _mixer(kind, causal, layers)
    x = torch.randn(3, 9, 16)
    mask = _masks()[mask_name]
    with torch.inference_mode():
        expected = mixer(x, mask)
        got = fast.FastMultiHeadRecurrent(mixer, use_kernel=use_kernel)(x, mask)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mhlstm", "gru"])
def test_batches_larger_than_one_sample_group(kind, use_kernel):
    mixer = _mixer(kind, layers=1)
    x = torch.randn(7, 11, 16)
    lengths = torch.tensor([11, 3, 9, 11, 1, 6, 10])
    mask = torch.arange(11).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.inference_mode():
        for m in (None, mask):
            torch.testing.assert_close(fast.FastMultiHeadRecurrent(mixer, use_kernel=use_kernel)(x, m),
                                       mixer(x, m), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mhlstm", "gru"])
def test_heads_pruned_to_different_sizes(kind, use_kernel):
    mixer = _prune_heads(_mixer(kind, heads=3, dim=24, layers=2), [8, 3, 5])
    x = torch.randn(2, 7, 24)
    mask = _masks(3, 7)["right-padded"][:2]
    with torch.inference_mode():
        expected = mixer(x, mask)
        got = fast.FastMultiHeadRecurrent(mixer, use_kernel=use_kernel)(x, mask)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_heads_with_different_output_widths(use_kernel):
    mixer = _mixer("mhlstm", heads=2, dim=16)
    mixer.heads[1].out = nn.Linear(mixer.heads[1].out.in_features, 5)  # a pruned head output
    x = torch.randn(1, 6, 16)
    with torch.inference_mode():
        expected = mixer(x)
        got = fast.FastMultiHeadRecurrent(mixer, use_kernel=use_kernel)(x)
    assert got.shape == (1, 6, 8 + 5)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("replacement", ["mhlstm", "gru"])
def test_optimize_whole_model_keeps_outputs(replacement, use_kernel):
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, replacement, inputs)
    surgery.finalize(model)
    optimized = fast.optimize(copy.deepcopy(model), use_kernel=use_kernel)
    assert not optimized.training  # optimize keeps the structure: the mixers dispatch by themselves
    with torch.inference_mode():
        torch.testing.assert_close(run(optimized, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)


def test_optimize_padded_bert_batch(use_kernel):
    model, inputs = build("hf_bert")
    surgery.replace_attention(model, "mhlstm", inputs)
    inputs["attention_mask"][1, 8:] = 0
    optimized = fast.optimize(copy.deepcopy(model), use_kernel=use_kernel)
    with torch.inference_mode():
        expected = main_tensor(run(model, inputs))
        got = main_tensor(run(optimized, inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("replacement", ["mhlstm", "conv"])
def test_optimize_keeps_the_structure_and_outputs(replacement, fold):
    """fold_projection is accepted for compatibility; the reused projection stays (saves load again)."""
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, replacement, inputs)
    surgery.finalize(model)
    optimized = fast.optimize(copy.deepcopy(model), fold_projection=fold, use_kernel=False)
    wrapper = next(surgery.swap.replaced_sites(optimized))
    assert type(wrapper.mixer) is type(next(surgery.swap.replaced_sites(model)).mixer)
    assert not isinstance(wrapper.out_projection, nn.Identity)
    assert set(optimized.state_dict()) == set(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(run(optimized, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["hand_written_causal", "hf_bert"])
def test_fast_conv_keeps_causal_padding_and_masks(case):
    model, inputs = build(case)
    surgery.replace_attention(model, "conv", inputs)
    if isinstance(inputs, dict):
        inputs["attention_mask"][0, 9:] = 0
    optimized = fast.optimize(copy.deepcopy(model))
    with torch.inference_mode():
        torch.testing.assert_close(main_tensor(run(optimized, inputs)), main_tensor(run(model, inputs)),
                                   atol=1e-5, rtol=1e-5)


def test_fast_form_refuses_gradients():
    mixer = _mixer("mhlstm")
    fast_form = fast.FastMultiHeadRecurrent(mixer, use_kernel=False)
    with pytest.raises(SurgeryError, match="inference-only"):
        fast_form(torch.randn(1, 4, 16))


def test_kernel_status_reports():
    status = fast.kernel_status()
    assert set(status) == {"available", "error"}
    assert status["available"] or status["error"]


def test_optimize_pads_pruned_mlp_widths_exactly():
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    surgery.prune(model, inputs, ratio=0.3, measure_flops=False)
    surgery.finalize(model)
    for block in model.blocks:  # an odd width, as global pruning leaves them
        mlp = block.mlp
        keep = mlp.fc1.out_features - 3
        mlp.fc1 = nn.Linear(mlp.fc1.in_features, keep)
        mlp.fc2 = nn.Linear(keep, mlp.fc2.out_features)
    model.eval()
    optimized = fast.optimize(copy.deepcopy(model), use_kernel=False, pad_mlp=True)
    assert all(block.mlp.fc1.out_features % 8 == 0 for block in optimized.blocks)
    with torch.inference_mode():
        torch.testing.assert_close(run(optimized, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)


def _native_with_avx512():
    from replacements.native import load_kernel

    kernel = load_kernel()
    if kernel is None and os.environ.get("SURGERY_FAST_KERNEL") != "1":
        pytest.skip(f"native kernel unavailable: {fast.kernel_status()['error']} (SURGERY_FAST_KERNEL=1 "
                    "makes this a failure)")
    assert kernel is not None, fast.kernel_status()["error"]
    if not kernel.avx512:
        pytest.skip("this CPU has no AVX-512: the kernel runs its AVX2 path only (tested above)")
    return kernel


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("is_lstm", [True, False])
@pytest.mark.parametrize("hidden, batch", [(64, 1), (64, 5), (24, 1), (136, 6), (8, 2), (40, 3)])
def test_avx512_recurrence_equals_avx2_and_the_loop(is_lstm, hidden, batch, precision):
    """The AVX-512 mat-vec and gates (taken by default where the CPU has them) compute what the
    8-wide AVX2 ones and the PyTorch loop compute: every tiling (256-, 64- and 8-column blocks), a
    masked last gate vector (24, 136 = odd multiples of 8), pruned units, right-padded lengths, and
    float16 weights (the loop given the same rounded weights)."""
    from replacements.recurrence import _recurrence_torch, tile_columns

    kernel = _native_with_avx512()
    generator = torch.Generator().manual_seed(hidden + batch)
    heads, steps, directions, gates = 3, 17, 2, 4 if is_lstm else 3
    units = heads * directions
    sizes = [hidden] * units
    sizes[1] = max(1, hidden - 7)  # a pruned unit: zero rows and columns past its size
    w_hh = torch.randn(units, hidden, gates * hidden, generator=generator) * 0.3
    for unit, size in enumerate(sizes):
        w_hh[unit, size:] = 0
        for g in range(gates):
            w_hh[unit, :, g * hidden + size:(g + 1) * hidden] = 0
    b_hh = torch.randn(units, gates * hidden, generator=generator) * 0.1
    xg = torch.randn(heads, batch, steps, directions, gates * hidden, generator=generator)
    lengths = torch.tensor([steps - (3 * b) % steps for b in range(batch)])
    if precision == "float16":
        w_hh = w_hh.half().float()
    reference = _recurrence_torch(xg, w_hh, b_hh, lengths, is_lstm)
    tiled = tile_columns(w_hh).half() if precision == "float16" else tile_columns(w_hh)
    args = (xg, tiled, b_hh, torch.tensor(sizes), lengths, is_lstm)
    try:
        assert kernel.use_avx512(False) is False
        narrow = kernel.recurrence(*args)
    finally:
        assert kernel.use_avx512(True) is True
    wide = kernel.recurrence(*args)
    torch.testing.assert_close(narrow, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(wide, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(wide, narrow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mhlstm", "gru"])
def test_avx512_decode_step_equals_avx2(kind):
    """The decode step's AVX-512 path (both mat-vecs and the gates) gives the AVX2 path's states."""
    kernel = _native_with_avx512()
    from surgery.replacements.recurrence import DECODING

    mixer = _mixer(kind, causal=True, heads=3, dim=48)
    x = torch.randn(2, 1, 48)
    state = DECODING.init_state(mixer, 2)
    with torch.no_grad():
        _, state = DECODING.prefill(mixer, torch.randn(2, 5, 48), None, state)
        wide = DECODING.step(mixer, x, state)
        try:
            kernel.use_avx512(False)
            narrow = DECODING.step(mixer, x, state)
        finally:
            kernel.use_avx512(True)
        expected = DECODING.prefill(mixer, x, None, state)
    for got in (wide, narrow):
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
        for a, b in zip(got[1], expected[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
