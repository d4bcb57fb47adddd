"""Global structural pruning: exactness, shapes, global ranking, save/load, graph coverage, refusals."""

import pytest
import torch
from torch import nn

import surgery
from models import CASES, build, main_tensor, run
from surgery.errors import PruningError
from surgery.prune import build_graph, hoyer_square
from surgery.prune.engine import _site_pruners
from surgery.swap import replaced_sites

REPLACEMENTS = ["mhlstm", "gru", "conv"]


def _replaced(replacement="mhlstm", case="timm_vit"):
    model, inputs = build(case)
    surgery.replace_attention(model, replacement, inputs)
    return model, inputs


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def _zero_recurrent_units(head, units):
    """Make hidden units contribute exactly nothing: zero gate rows, biases, recurrent and out columns."""
    rnn, hidden = head.rnn, head.rnn.hidden_size
    gates = rnn.weight_ih_l0.shape[0] // hidden
    rows = [g * hidden + u for g in range(gates) for u in units]
    with torch.no_grad():
        for suffix in ("", "_reverse"):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{name}_l0{suffix}")[rows] = 0
            getattr(rnn, f"weight_hh_l0{suffix}")[:, units] = 0
        head.out.weight[:, units] = 0
        head.out.weight[:, [hidden + u for u in units]] = 0


def _zero_conv_channels(mixer, channels):
    with torch.no_grad():
        mixer.pre_proj.weight[channels] = 0
        mixer.pre_proj.bias[channels] = 0
        for conv in mixer.convs:
            conv.weight[channels] = 0
            conv.bias[channels] = 0
        mixer.out.weight[:, channels] = 0


def _zero_mlp_channels(mlp, channels):
    with torch.no_grad():
        mlp.fc1.weight[channels] = 0
        mlp.fc1.bias[channels] = 0
        mlp.fc2.weight[:, channels] = 0


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_pruning_zero_units_keeps_outputs(replacement):
    model, x = _replaced(replacement)
    wrappers = list(replaced_sites(model))
    zeroed = 0
    if replacement == "conv":
        _zero_conv_channels(wrappers[0].mixer, [1, 5, 7])
        _zero_conv_channels(wrappers[1].mixer, [0])
        zeroed += 4
    else:
        _zero_recurrent_units(wrappers[0].mixer.heads[0], [0, 3, 9])
        _zero_recurrent_units(wrappers[1].mixer.heads[1], [15])
        zeroed += 4
    _zero_mlp_channels(model.blocks[1].mlp, [2, 4, 6, 8, 10])
    zeroed += 5
    with torch.no_grad():
        before = model(x)
    total = sum(b.before for b in surgery.prune(_replaced(replacement)[0], x, ratio=0.0,
                                                measure_flops=False).bundles)
    report = surgery.prune(model, x, ratio=(zeroed + 0.5) / total, measure_flops=False)
    assert report.params_before - report.params_after > 0
    assert sum(b.before - b.after for b in report.bundles) == zeroed
    kept = report.kept_units()
    assert kept["blocks.1.mlp.fc1"] == model.blocks[1].mlp.fc1.out_features == 64 - 5
    if replacement != "conv":
        assert wrappers[0].mixer.heads[0].rnn.hidden_size == 13
        assert wrappers[1].mixer.heads[1].rnn.hidden_size == 15
        assert wrappers[0].mixer.heads[1].rnn.hidden_size == 16
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("case", list(CASES))
def test_pruned_shapes_run_forward_and_backward(case, replacement):
    model, inputs = _replaced(replacement, case)
    report = surgery.prune(model, inputs, ratio=0.5, measure_flops=False)
    assert report.params_after < report.params_before
    # every replaced site was pruned: no replacement silently left at full size
    pruned_sites = {b.name.rpartition(".mixer")[0] for b in report.bundles if b.kind != "mlp" and b.after < b.before}
    assert pruned_sites == {w.site.name for w in replaced_sites(model)}
    model.train()
    output = main_tensor(run(model, inputs))
    output.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape, name
    for wrapper in replaced_sites(model):
        for head in getattr(wrapper.mixer, "heads", []):
            assert head.out.in_features == head.rnn.hidden_size * (2 if head.rnn.bidirectional else 1)


def test_global_ranking_prunes_unevenly_when_importances_differ():
    model, x = _replaced("mhlstm")
    with torch.no_grad():
        for p in model.blocks[0].attn.mixer.heads.parameters():
            p.mul_(0.2)
    report = surgery.prune(model, x, ratio=0.3, scope="replacements", measure_flops=False)
    kept = report.kept_units()
    block0 = sum(v for k, v in kept.items() if k.startswith("blocks.0."))
    block1 = sum(v for k, v in kept.items() if k.startswith("blocks.1."))
    assert block0 < block1
    assert block0 + block1 == 64 - int(0.3 * 64)
    # local (non-global) pruning removes the same share everywhere
    model, x = _replaced("mhlstm")
    report = surgery.prune(model, x, ratio=0.3, scope="replacements", global_=False, measure_flops=False)
    assert set(report.kept_units().values()) == {16 - int(0.3 * 16)}


@pytest.mark.parametrize("finalized", [False, True])
@pytest.mark.parametrize("case, replacement", [("timm_vit", r) for r in REPLACEMENTS] + [("hf_bert", "gru")])
def test_save_load_of_pruned_model_is_exact(tmp_path, case, replacement, finalized):
    model, x = _replaced(replacement, case)
    if finalized:
        surgery.finalize(model)
    surgery.prune(model, x, ratio=0.45, measure_flops=False)
    surgery.save(model, tmp_path)
    torch.manual_seed(1)
    again = surgery.load(tmp_path, model=CASES[case][0]())
    model.eval()
    with torch.no_grad():
        # same weights (same layouts) through the same modules: the same computation replayed, so
        # bit for bit
        assert torch.equal(main_tensor(run(model, x)), main_tensor(run(again, x)))
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in again.state_dict().items()}


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_graph_covers_every_replacement(replacement):
    from torch_pruning import ops

    model, x = _replaced(replacement, "hf_bert")
    site_pruners, _ = _site_pruners(model, skip_unprunable=False)
    graph = build_graph(model, x, site_pruners)
    registered = surgery.registry.get_replacement(replacement).pruner
    for wrapper in replaced_sites(model):
        node = graph.module2node[wrapper.mixer]
        assert node.type == ops.OPTYPE.CUSTOMIZED
        assert isinstance(graph.get_pruner_of_module(wrapper.mixer), registered)
        # the mixer's dependencies reach the rest of the model: its input comes from the block
        assert node.inputs and graph.get_in_channels(wrapper.mixer) == 32
    # recurrent layers never enter torch-pruning's own (broken) LSTM/GRU handling
    assert not any(isinstance(m, nn.RNNBase) for m in graph.module2node)


def test_hoyer_square_and_threshold():
    model, x = _replaced("mhlstm")
    penalty = hoyer_square(model)
    penalty.backward()
    assert penalty.item() > 1 and model.blocks[0].attn.mixer.heads[0].rnn.weight_ih_l0.grad is not None
    _zero_recurrent_units(model.blocks[1].attn.mixer.heads[0], [2, 5])
    report = surgery.prune(model, x, importance="hoyer", threshold=1e-6, scope="replacements",
                           measure_flops=False)
    assert report.kept_units()["blocks.1.attn.mixer.heads.0"] == 14
    assert sum(b.before - b.after for b in report.bundles) == 2


def test_taylor_importance_uses_the_teacher_and_needs_a_loss_after_finalize():
    model, x = _replaced("gru")
    for p in model.blocks.parameters():  # frozen weights are scored too (and stay frozen)
        p.requires_grad_(False)
    report = surgery.prune(model, x, ratio=0.3, importance="taylor", data=[x, x], measure_flops=False)
    assert report.params_after < report.params_before
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.blocks[0].mlp.parameters())
    surgery.finalize(model)
    with pytest.raises(PruningError, match="taylor"):
        surgery.prune(model, x, ratio=0.3, importance="taylor", measure_flops=False)
    report = surgery.prune(model, x, ratio=0.3, importance="taylor", measure_flops=False,
                           loss_fn=lambda m, batch: m(batch).pow(2).mean())
    assert report.params_after < report.params_before


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": -0.1}, "ratio must be"),
    ({"ratio": 1.0}, "ratio must be"),
    ({"ratio": "0.4"}, "ratio must be"),
    ({"ratio": True}, "ratio must be"),
    ({"ratio": 0.4, "importance": "l1"}, "importance must be"),
    ({"ratio": 0.4, "head_floor": 0}, "head_floor"),
    ({"ratio": 0.95}, "floors"),
    ({"ratio": 0.5, "global_": False, "head_floor": 0.6}, "floor"),
    ({"ratio": 0.4, "threshold": 0.1}, "either ratio or threshold"),
    ({"ratio": 0.4, "recover_steps": 3}, "needs data"),
])
def test_bad_requests_are_refused_and_leave_the_model_untouched(kwargs, message):
    model, x = _replaced("mhlstm")
    state = _state(model)
    with pytest.raises(PruningError, match=message) as info:
        surgery.prune(model, x, measure_flops=False, **kwargs)
    assert "\n" not in str(info.value)
    _assert_same_state(model, state)


def test_unprunable_site_is_refused_or_skipped(monkeypatch):
    surgery.list_replacements()  # built-ins registered before the registry is swapped for a copy
    monkeypatch.setattr(surgery.registry, "_REGISTRY", dict(surgery.registry._REGISTRY))

    @surgery.register_replacement("mean_mixer_for_prune_test")
    class MeanMixer(nn.Module):
        """Running mean over tokens (no pruner)."""

        def __init__(self, shape, config):
            super().__init__()
            self.shape = shape
            self.proj = nn.Linear(shape.input_dim, shape.output_dim)

        def forward(self, x, padding_mask=None):
            return self.proj(x).cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)

    model, x = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", x, targets=["blocks.0.attn"])
    surgery.replace_attention(model, "mean_mixer_for_prune_test", x, targets=["blocks.1.attn"])
    state = _state(model)
    with pytest.raises(PruningError, match=r"blocks\.1\.attn \(mean_mixer_for_prune_test\).*skip_unprunable"):
        surgery.prune(model, x, ratio=0.3, measure_flops=False)
    _assert_same_state(model, state)
    report = surgery.prune(model, x, ratio=0.3, skip_unprunable=True, measure_flops=False)
    assert report.skipped_sites == ["blocks.1.attn (mean_mixer_for_prune_test)"]
    assert not any(b.name.startswith("blocks.1.attn") for b in report.bundles)
    assert model.blocks[1].attn.mixer.proj.weight.shape == (32, 32)


def test_failure_midway_is_undone(monkeypatch):
    import replacements.recurrent as recurrent

    model, x = _replaced("mhlstm")
    state = _state(model)
    with torch.no_grad():
        before = model(x)
    real = recurrent._prune_hidden_units
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        real(*args)

    monkeypatch.setattr(recurrent, "_prune_hidden_units", flaky)
    with pytest.raises(PruningError, match="undone.*simulated failure"):
        surgery.prune(model, x, ratio=0.4, measure_flops=False)
    _assert_same_state(model, state)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # undone exactly: the same weights, the same computation
    assert all(h.rnn.hidden_size == 16 for w in replaced_sites(model) for h in w.mixer.heads)


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_external_channel_pruners_keep_shapes_consistent(replacement):
    model, x = _replaced(replacement)
    wrapper = next(replaced_sites(model))
    pruner = surgery.registry.get_replacement(replacement).pruner()
    hidden = torch.randn(2, 5, 32)
    pruner.prune_in_channels(wrapper.mixer, [0, 3])
    pruner.prune_out_channels(wrapper.mixer, [1, 2, 20])
    assert pruner.get_in_channels(wrapper.mixer) == 30
    assert pruner.get_out_channels(wrapper.mixer) == 29
    assert wrapper.mixer(hidden[..., 2:]).shape == (2, 5, 29)


def test_report_counts_flops():
    model, x = _replaced("mhlstm")
    report = surgery.prune(model, x, ratio=0.5)
    assert report.flops_after < report.flops_before
    assert report.summary()["params_ratio"] < 1


def test_recovery_distills_against_the_unpruned_teacher():
    pytest.importorskip("surgery.distill")
    model, x = _replaced("mhlstm")
    data = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    report = surgery.prune(model, x, ratio=0.4, recover_steps=3, data=data, measure_flops=False, lr=1e-3)
    assert [s.name for s in report.recovery.sites] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(torch.isfinite(torch.tensor(s.relative_mse_after)) for s in report.recovery.sites)
    # the kept originals are still the teachers for later distillation; the MLPs stay pruned
    assert all(w.original is not None for w in replaced_sites(model))
    assert model.blocks[0].mlp.fc1.out_features < 64


def test_hoyer_square_training_sparsifies_then_threshold_prunes():
    """FAR's route: the Hoyer-Square penalty drives whole units toward zero; a global threshold on
    group norms then removes them."""
    model, x = _replaced("mhlstm")
    params = [p for w in replaced_sites(model) for p in w.mixer.heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    start = hoyer_square(model).item()
    for _ in range(60):
        optimizer.zero_grad()
        hoyer_square(model).backward()
        optimizer.step()
    assert hoyer_square(model).item() < 0.8 * start
    report = surgery.prune(model, x, importance="hoyer", threshold=0.05, scope="replacements",
                           measure_flops=False)
    assert sum(b.before - b.after for b in report.bundles) > 0
    assert report.output_cosine is not None and report.output_cosine > 0.9


def test_pruning_twice_keeps_shrinking_heads_of_different_sizes():
    model, x = _replaced("mhlstm")
    surgery.prune(model, x, ratio=0.3, measure_flops=False)
    first = [h.rnn.hidden_size for w in replaced_sites(model) for h in w.mixer.heads]
    report = surgery.prune(model, x, ratio=0.3, measure_flops=False)
    second = [h.rnn.hidden_size for w in replaced_sites(model) for h in w.mixer.heads]
    assert sum(second) < sum(first) and report.params_after < report.params_before
    assert model(x).shape == (2, 10)


def test_a_pruner_without_units_is_not_silently_skipped(monkeypatch):
    from replacements.recurrent import MultiHeadRecurrentPruner

    model, x = _replaced("mhlstm")
    monkeypatch.setattr(MultiHeadRecurrentPruner, "unit_bundles", lambda self, layer, name: [])
    state = _state(model)
    with pytest.raises(PruningError, match="offers no units at site 'blocks.0.attn'"):
        surgery.prune(model, x, ratio=0.3, measure_flops=False)
    _assert_same_state(model, state)
    report = surgery.prune(model, x, ratio=0.3, skip_unprunable=True, measure_flops=False)
    assert report.skipped_sites == ["blocks.0.attn (mhlstm)", "blocks.1.attn (mhlstm)"]


def test_unreplaced_attention_is_left_alone():
    model, x = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", x, targets=["blocks.0.attn"])
    attention = {k: v.shape for k, v in model.blocks[1].attn.state_dict().items()}
    report = surgery.prune(model, x, ratio=0.4, measure_flops=False)
    assert {b.name for b in report.bundles if b.kind == "mlp"} == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    assert {k: v.shape for k, v in model.blocks[1].attn.state_dict().items()} == attention
    assert model(x).shape == (2, 10)
