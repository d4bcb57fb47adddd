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


# ------------------------------------------------------------------------------ plain PyTorch

def _causal_stack(replacement, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    example = torch.randn(1, 6, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(6)
    report = surgery.replace_attention(model, replacement, ((example,), {"mask": mask, "is_causal": True}))
    assert all(s.site.causal for s in report.sites)
    return model


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv", "linear"])
def test_plain_pytorch_stack_decodes_token_by_token(replacement):
    model = _causal_stack(replacement)
    x = torch.randn(2, 10, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    with torch.no_grad():
        full = model(x, mask=mask, is_causal=True)
        with surgery.decoding.stateful(model) as state:
            parts = [model(x[:, :4])]
            parts += [model(x[:, i:i + 1]) for i in range(4, 8)]
            parts.append(model(x[:, 8:]))  # a chunk continues from the state too
            assert state.tokens == 10
            memory = state.nbytes
            state.reset()
            again = model(x[:, :3])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, full[:, :3], atol=1e-5, rtol=1e-5)
    assert memory > 0
    with torch.no_grad():  # outside the block the model is stateless again
        torch.testing.assert_close(model(x, mask=mask, is_causal=True), full, atol=1e-6, rtol=1e-6)


def test_plain_pytorch_select_keeps_rows_and_a_wrong_batch_is_refused():
    model = _causal_stack("mhlstm", seed=2)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        full = model(x[[2, 0]], mask=torch.nn.Transformer.generate_square_subsequent_mask(6), is_causal=True)
        with surgery.decoding.stateful(model) as state:
            first = model(x[:, :4])
            state.select(torch.tensor([2, 0]))
            rest = model(x[[2, 0], 4:])
            with pytest.raises(surgery.SurgeryError, match="batch of 2, got 3 rows") as error:
                model(x[:, 4:5])
    assert len(str(error.value).splitlines()) == 1
    torch.testing.assert_close(torch.cat([first[[2, 0]], rest], 1), full, atol=1e-5, rtol=1e-5)


def test_stateful_refuses_a_site_without_a_decoding_form():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    surgery.replace_attention(model, "mhlstm", torch.randn(1, 6, 16))  # no mask: bidirectional
    with pytest.raises(surgery.SurgeryError, match="has no decoding form") as error:
        with surgery.decoding.stateful(model):
            pass
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("name", ["mhlstm", "gru"])
def test_pruned_heads_of_different_sizes_decode(name):
    torch.manual_seed(0)
    spec = get_replacement(name)
    mixer = spec.build(MixerShape(16, 16, 4, causal=True), {"hidden_per_head": 8}).eval()
    pruner = spec.make_pruner()
    bundles = pruner.unit_bundles(mixer, "mixer")
    bundles[0].apply([[0, 1, 2]])
    bundles[2].apply([[5]])
    pruner.prune_out_channels(mixer, [0, 1])  # head 0 keeps 2 of its 4 output channels
    assert [h.rnn.hidden_size for h in mixer.heads] == [5, 8, 7, 8]
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        full = mixer(x, mask)
        y, state = spec.decoding.prefill(mixer, x[:, :4], mask[:, :4])
        outputs = [y]
        for i in range(4, 9):
            y_t, state = spec.decoding.step(mixer, x[:, i:i + 1], state)
            outputs.append(y_t)
    got = torch.cat(outputs, 1)
    assert got.shape == full.shape == (2, 9, 14)
    torch.testing.assert_close(got[mask], full[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv", "linear"])
def test_exported_decode_step_with_explicit_states_matches_for_16_steps(replacement):
    model = _causal_stack(replacement, seed=4)
    step = surgery.decoding.DecodeStep(model).eval()
    states = step.initial_states(1)
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        with surgery.decoding.stateful(model):
            reference = torch.cat([model(x[:, i:i + 1]) for i in range(16)], 1)
        program = torch.export.export(step, (x[:, :1], *states), strict=False)
        assert len(program.graph_signature.user_inputs) == 1 + len(states)
        assert len(program.graph_signature.user_outputs) == 1 + len(states)
        run, outputs = program.module(), []
        for i in range(16):
            y, *states = run(x[:, i:i + 1], *states)
            outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), reference, atol=1e-5, rtol=1e-5)


def test_decode_step_refuses_a_wrong_number_of_states():
    step = surgery.decoding.DecodeStep(_causal_stack("mhlstm"))
    with pytest.raises(surgery.SurgeryError, match="takes 4 state tensors") as error:
        step(torch.randn(1, 1, 16))
    assert len(str(error.value).splitlines()) == 1


# ------------------------------------------------------------------- packed weights stay current

def _change_weights(name, mixer, how, seed):
    """Change ``mixer``'s weights the way ``how`` names, after a decode step packed them."""
    torch.manual_seed(seed)
    if how == "optimizer step":
        optimizer = torch.optim.SGD(mixer.parameters(), lr=0.5)
        mixer.reference_forward(torch.randn(1, 4, 16)).square().sum().backward()
        optimizer.step()  # in place: same Parameter objects, same storage, new versions
    elif how == "pruned":
        get_replacement(name).make_pruner().unit_bundles(mixer, "mixer")[0].apply([[0, 2]])  # new Parameters, new shapes
    elif how == "parameter replaced":
        out = mixer.heads[1].out
        out.weight = torch.nn.Parameter(torch.randn_like(out.weight))  # torch-pruning's way
    elif how == "load_state_dict":
        mixer.load_state_dict({k: torch.randn_like(v) for k, v in mixer.state_dict().items()})
    elif how == "data assigned twice":
        weight = mixer.heads[0].rnn.weight_hh_l0
        weight.data = weight.data * 2  # no version bump; twice, so the allocator may reuse an address
        weight.data = weight.data * 2
    elif how == "to float64 and back":
        mixer.double()
        with torch.no_grad():
            mixer.heads[2].rnn.bias_ih_l0.add_(1.0)
        mixer.float()


@pytest.mark.parametrize("how", ["optimizer step", "pruned", "parameter replaced", "load_state_dict",
                                 "data assigned twice", "to float64 and back"])
@pytest.mark.parametrize("name", ["mhlstm", "gru"])
def test_a_weight_change_after_a_decode_step_reaches_the_next_step(name, how):
    form, mixer = _mixer(name, {})
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, state = form.prefill(mixer, x[:, :3])
        before, _ = form.step(mixer, x[:, 3:4], state)  # packs the weights
        mixer(x)  # and the inference form
    _change_weights(name, mixer.train(), how, seed=7)
    mixer.eval()
    with torch.no_grad():
        got, got_state = form.step(mixer, x[:, 3:4], state)
        want, want_state = form.prefill(mixer, x[:, 3:4], None, state)  # the per-head networks
        full = mixer(x)
    assert not torch.allclose(got, before, atol=1e-4)  # the change matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for k, head in enumerate(mixer.heads):  # lanes past a pruned head's size are never read
        size = head.rnn.hidden_size
        for g, w in zip(got_state, want_state):
            torch.testing.assert_close(g[:, :, k, :size], w[:, :, k, :size], atol=1e-5, rtol=1e-5)
    with surgery.registry.reference_forms(), torch.no_grad():
        torch.testing.assert_close(full, mixer(x), atol=1e-5, rtol=1e-5)


def test_a_copied_mixer_packs_its_own_weights():
    import copy
    import pickle

    form, mixer = _mixer("mhlstm", {})
    x = torch.randn(1, 4, 16)
    state = form.init_state(mixer, 1)
    with torch.no_grad():
        original, _ = form.step(mixer, x[:, :1], state)
        for twin in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
            with torch.no_grad():
                twin.heads[0].out.weight.mul_(-1)
            got, _ = form.step(twin, x[:, :1], state)
            want, _ = form.prefill(twin, x[:, :1], None, state)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got, original, atol=1e-4)
        again, _ = form.step(mixer, x[:, :1], state)
    torch.testing.assert_close(again, original)


@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
def test_onnx_decode_step_with_explicit_states_matches_for_16_steps(replacement, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # the dynamo ONNX exporter
    from surgery.export import export

    model = _causal_stack(replacement, seed=5)
    step = surgery.decoding.DecodeStep(model).eval()
    x = torch.randn(1, 16, 16)
    with torch.no_grad(), surgery.decoding.stateful(model):
        reference = torch.cat([model(x[:, i:i + 1]) for i in range(16)], 1)
    report = export(step, (x[:, :1], *step.initial_states(1)), tmp_path / "step.onnx", format="onnx")
    assert report.recurrent_ops == {"mhlstm": ("LSTM",), "gru": ("GRU",), "conv": ()}[replacement]
    session = onnxruntime.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    states, outputs = [s.numpy() for s in step.initial_states(1)], []
    assert len(names) == 1 + len(states) and len(session.get_outputs()) == 1 + len(states)
    for i in range(16):  # the runtime carries the states from one call to the next
        y, *states = session.run(None, dict(zip(names, [x[:, i:i + 1].numpy(), *states])))
        outputs.append(torch.from_numpy(y))
    torch.testing.assert_close(torch.cat(outputs, 1), reference, atol=1e-5, rtol=1e-5)
