"""Stateful decoding: prefill + token-by-token steps compute what the sequence form computes."""

import pytest
import torch

import surgery
from surgery.registry import MixerShape, get_replacement

CASES = [
    ("mhlstm", {}),
    ("mhlstm", {"num_layers": 2, "hidden_per_head": 6}),
    ("gru", {}),
    ("gru", {"num_layers": 2}),
    ("conv", {"kernel_size": 3, "layers": 2}),
    ("conv", {"kernel_size": 1, "layers": 1}),
]


def _mixer(name, config, seed=0):
    torch.manual_seed(seed)
    spec = get_replacement(name)
    mixer = spec.build(MixerShape(16, 16, 4, causal=True), config).eval()
    return spec.decoding, mixer


def _left_padded(batch=3, length=9):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False  # row 1: three pads on the left
    mask[2, :1] = False
    return mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name,config", CASES)
def test_prefill_then_steps_equal_the_sequence_form(name, config, padded):
    form, mixer = _mixer(name, config)
    assert form is not None
    x = torch.randn(3, 9, 16)
    mask = _left_padded() if padded else None
    t = 5
    with torch.no_grad():
        full = mixer(x, mask)
        y, state = form.prefill(mixer, x[:, :t], None if mask is None else mask[:, :t])
        outputs = [y]
        for i in range(t, x.shape[1]):
            y_t, state = form.step(mixer, x[:, i:i + 1], state)
            outputs.append(y_t)
    got = torch.cat(outputs, dim=1)
    real = torch.ones_like(full[..., 0], dtype=torch.bool) if mask is None else mask
    # outputs at pads are not compared (nothing reads them); every real position must match
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,config", CASES[:1] + CASES[2:3] + CASES[4:5])
def test_steps_from_the_empty_state_and_chunked_prefill(name, config):
    form, mixer = _mixer(name, config, seed=1)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        full = mixer(x)
        state = form.init_state(mixer, 2)
        steps = []
        for i in range(7):
            y_t, state = form.step(mixer, x[:, i:i + 1], state)
            steps.append(y_t)
        first, state = form.prefill(mixer, x[:, :3])
        second, state = form.prefill(mixer, x[:, 3:], None, state)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)


def test_step_with_gradients_reaches_the_weights():
    form, mixer = _mixer("mhlstm", {})
    x = torch.randn(1, 4, 16)
    _, state = form.prefill(mixer, x[:, :3])
    y, _ = form.step(mixer, x[:, 3:], state)
    y.sum().backward()
    assert mixer.heads[0].rnn.weight_hh_l0.grad is not None
    assert mixer.heads[0].rnn.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mhlstm", "conv"])
def test_a_non_causal_mixer_has_no_decoding(name):
    spec = get_replacement(name)
    mixer = spec.build(MixerShape(16, 16, 4, causal=False), {}).eval()
    with pytest.raises(surgery.SurgeryError, match="only causal sites"):
        spec.decoding.init_state(mixer, 1)
