"""surgery.distill.init: the teacher-derived start of multi-head LSTM and GRU replacements."""

import pytest
import torch

import surgery
from models import build
from surgery.distill import evaluate_fidelity
from surgery.distill.init import initialise_from_teacher
from test_distill import bert_data


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
def test_init_from_teacher_lowers_every_site_error(replacement):
    torch.manual_seed(0)
    model, x = build("hf_bert")
    surgery.replace_attention(model, replacement, x)
    data = bert_data()
    before = evaluate_fidelity(None, model, data[4:])
    chosen = initialise_from_teacher(model, data[:4])
    after = evaluate_fidelity(None, model, data[4:])
    assert sorted(chosen) == sorted(s.name for s in before.sites)
    for site_name, picks in chosen.items():
        if replacement == "conv":
            assert picks == [0.0]  # zero kernels: each token's own values
        else:
            assert all(len(pair) == 2 for pair in picks), site_name  # forward and backward decay per head
    for b, a in zip(before.sites, after.sites):
        assert a.relative_mse < 0.5 * b.relative_mse, (b, a)
        assert a.cosine > b.cosine


def test_init_leaves_other_mixers_alone():
    model, x = build("hf_bert")
    surgery.replace_attention(model, "mhlstm", x, config={"num_layers": 2})  # stacked: no closed-form start
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert initialise_from_teacher(model, bert_data()[:2]) == {}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_gru_moving_average_is_what_the_init_sets():
    from surgery.replacements.recurrent_init import _set_moving_average

    gru = torch.nn.GRU(4, 4, batch_first=True)
    _set_moving_average(gru, (0.5,), scale=1.0)
    x = torch.randn(1, 3, 4) * 0.1
    y, _ = gru(x)
    expected, h = [], torch.zeros(4)
    for t in range(3):
        h = 0.5 * h + 0.5 * torch.tanh(x[0, t])
        expected.append(h)
    assert torch.allclose(y[0], torch.stack(expected), atol=1e-4)
