"""surgery.measure: FLOPs with the recurrent/SDPA handles, latency, peak memory, comparisons."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery import measure
from models import build


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rnn_class, gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_recurrent_flops_count_every_weight_once_per_token(rnn_class, gates, bidirectional):
    rnn = rnn_class(8, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    tokens = 3 * 10
    per_direction = gates * 16 * 8 + gates * 16 * 16 + (gates * 16 * 16 * directions + gates * 16 * 16)
    expected = tokens * directions * per_direction
    assert measure.count_flops(rnn, torch.randn(3, 10, 8)) == expected


def test_packed_lstm_counts_real_tokens_only():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
            return self.rnn(packed)[0].data

    assert measure.count_flops(Packed(), torch.randn(2, 5, 4)) == (5 + 3) * (24 * 4 + 24 * 6)


def test_sdpa_flops_are_counted():
    q = torch.randn(2, 3, 7, 8)
    assert measure.count_flops(_SDPA(), (q, q, q)) == 2 * 3 * 7 * 7 * (8 + 8)


def test_attention_model_flops_include_the_attention_core():
    model, inputs = build("timm_vit")
    analysis = measure.flop_analysis(model, inputs)
    assert analysis.by_operator()["scaled_dot_product_attention"] > 0
    # 17 tokens, dim 32, 2 blocks: QK^T and AV are 2 * 17 * 17 * 32 MACs per block and sample
    assert analysis.by_operator()["scaled_dot_product_attention"] == 2 * 2 * 2 * 17 * 17 * 32


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
def test_replaced_models_have_nonzero_mixer_flops(replacement):
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, replacement, inputs)
    surgery.finalize(model)
    by_module = measure.flop_analysis(model, inputs).by_module()
    assert by_module["model.blocks.0.attn.mixer"] > 0


def test_flops_accept_keyword_inputs_and_dict_outputs():
    model, inputs = build("hf_bert")
    assert isinstance(inputs, dict)
    assert measure.count_flops(model, inputs) > 0


def test_flops_leave_training_flags_alone():
    model, inputs = build("timm_vit")
    model.train()
    measure.count_flops(model, inputs)
    assert all(m.training for m in model.modules())


def test_measure_latency_reports_medians_with_fixed_threads():
    before = torch.get_num_threads()
    stats = measure.measure_latency(nn.Linear(16, 16), torch.randn(2, 16), repeats=5, warmup=1, threads=1)
    assert stats["repeats"] == 5 and stats["threads"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    assert stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"]
    assert torch.get_num_threads() == before


def test_measure_latencies_runs_each_model_repeats_times():
    calls = {"a": 0, "b": 0}

    class Counting(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls[self.name] += 1
            return x

    result = measure.measure_latencies({"a": Counting("a"), "b": Counting("b")}, torch.zeros(1),
                                       repeats=4, warmup=2)
    assert calls == {"a": 6, "b": 6}
    assert result["a"]["repeats"] == result["b"]["repeats"] == 4


def test_measure_latency_rejects_bad_counts():
    with pytest.raises(ValueError):
        measure.measure_latency(nn.Identity(), torch.zeros(1), repeats=0)


def test_peak_memory_sees_the_intermediate_activation():
    small = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    wide = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64))
    x = torch.randn(32, 64)
    small_peak = measure.peak_memory(small, x)["activation_bytes"]
    wide_peak = measure.peak_memory(wide, x)["activation_bytes"]
    assert wide_peak >= 32 * 4096 * 4 > small_peak
    assert measure.peak_memory(small, x)["parameter_bytes"] == (64 * 64 + 64) * 2 * 4


def test_compare_rows_and_ratios():
    model, inputs = build("timm_vit")
    candidate = copy.deepcopy(model)
    surgery.replace_attention(candidate, "conv", inputs)
    surgery.finalize(candidate)
    rows = {r["metric"]: r for r in measure.compare(model, candidate, inputs, repeats=3, warmup=1,
                                                    threads=1)}
    assert set(rows) == {"params", "flops", "latency_median", "latency_p25", "latency_p75",
                         "activation_memory", "parameter_memory"}
    params = rows["params"]
    assert params["original"] == surgery.count_parameters(model)
    assert params["candidate"] == surgery.count_parameters(candidate)
    assert params["ratio"] == pytest.approx(params["candidate"] / params["original"])
    assert rows["latency_median"]["original"] > 0 and rows["latency_median"]["candidate"] > 0


def test_count_parameters_is_the_core_function():
    assert measure.count_parameters is surgery.count_parameters


def test_flops_count_the_reference_form_in_eval_mode():
    """The tracer sees the reference form (no native call hides work from it), before and after optimize."""
    from surgery.fast import optimize

    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    before = measure.count_flops(surgery.finalize(model), inputs)
    optimize(model, use_kernel=False)
    assert measure.count_flops(model, inputs) == before > 0
