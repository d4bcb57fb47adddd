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


# ------------------------------------------------------------------ the closed-form fast start

def _run_head(rnn, x, mask, bidirectional, pack):
    if not pack or mask is None or not bidirectional or bool(mask.all()):
        return rnn(x)[0]
    lengths = mask.sum(1)  # the old algorithm's packing: right padding only
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])
    return y


def _reference_init(mixer, evidence, pack=False):
    """The per-head algorithm the closed form replaced (kept here as the reference): for every head
    and decay RUN the cells over every batch, then one ridge fit per (forward, backward) decay pair.
    ``pack``: pack right-padded batches, as the old algorithm did (it read left padding wrongly);
    else pads stay in the stream as zeros (the closed form's layout; right for both layouts)."""
    from surgery.replacements.fitting import least_squares
    from surgery.replacements.recurrent_init import _set_moving_average

    decays = tuple(evidence.settings.get("decays", (0.0, 0.5, 0.8, 0.9, 0.97, 0.995)))
    scale = evidence.settings.get("scale", 0.5)
    mixer.pre_proj.weight.copy_(evidence.value_weight)
    mixer.pre_proj.bias.copy_(evidence.value_bias)
    head_dim = mixer.shape.head_dim
    values = []
    for hidden, mask, target in evidence.records:
        x = mixer.pre_proj(hidden)
        values.append((x if mask is None else x * mask.unsqueeze(-1).to(x.dtype), mask, target))
    directions = 2 if mixer.bidirectional else 1
    picks = []
    for k, head in enumerate(mixer.heads):
        hidden, by_decay = head.rnn.hidden_size, {}
        for decay in decays:
            _set_moving_average(head.rnn, (decay,) * directions, scale)
            features, targets = [], []
            for x, mask, target in values:
                y = _run_head(head.rnn, x[..., k * head_dim:(k + 1) * head_dim], mask, mixer.bidirectional, pack)
                goal = target[..., k * head_dim:(k + 1) * head_dim]
                if mask is not None:
                    y, goal = y[mask.bool()], goal[mask.bool()]
                features.append(y.reshape(-1, y.shape[-1]))
                targets.append(goal.reshape(-1, goal.shape[-1]))
            by_decay[decay] = torch.cat(features).double()
            goal_rows = torch.cat(targets).double()
        best = None
        pairs = [(a, b) for a in decays for b in decays] if directions == 2 else [(a,) for a in decays]
        for pair in pairs:
            parts = [by_decay[d][:, i * hidden:(i + 1) * hidden] for i, d in enumerate(pair)]
            solution, error = least_squares(torch.cat(parts, dim=1), goal_rows, evidence.ridge)
            if best is None or error < best[0]:
                best = (error, pair, solution)
        _, pair, solution = best
        _set_moving_average(head.rnn, pair, scale)
        head.out.weight.copy_(solution[:-1].T.to(head.out.weight.dtype))
        head.out.bias.copy_(solution[-1].to(head.out.bias.dtype))
        picks.append(list(pair))
    return picks


def _padded_bert_data(layout, batches=3, batch=4, length=12):
    generator = torch.Generator().manual_seed(5)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, 100, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        if layout == "right":
            mask[0, length - 4:] = 0
            mask[2, length - 7:] = 0
        elif layout == "left":
            mask[0, :4] = 0
            mask[2, :7] = 0
        data.append({"input_ids": ids, "attention_mask": mask})
    return data


def _evidence(model, data):
    """Every site's (wrapper, TeacherEvidence) as initialise_from_teacher builds them."""
    from surgery.distill.capture import TeacherCapture
    from surgery.distill.init import value_projection
    from surgery.registry import TeacherEvidence
    from surgery.swap import replaced_sites

    wrappers = list(replaced_sites(model))
    records = {w.site.name: [] for w in wrappers}
    with TeacherCapture(model) as capture:
        for batch in data:
            capture.run(lambda: model(**batch) if isinstance(batch, dict) else model(batch))
            for w in wrappers:
                r = capture.records[w.site.name]
                records[w.site.name].append((r.hidden, r.mask, r.target))
    return [(w, TeacherEvidence(*value_projection(w), records[w.site.name], ridge=1e-3, original=w.original,
                                site=w.site)) for w in wrappers]


def _site_output(wrapper, hidden, mask):
    from surgery.registry import reference_forms

    with torch.no_grad(), reference_forms():
        return wrapper.mixer(hidden, mask)


INIT_CASES = [  # (model, replacement, padding layout, mixer config)
    ("hf_bert", "mhlstm", "right", {}),
    ("hf_bert", "mhlstm", "left", {}),
    ("hf_bert", "gru", "right", {}),
    ("hf_bert", "gru", "left", {}),
    ("hf_bert", "mhlstm", "left", {"hidden_per_head": 12}),  # hidden > head dim: zero channels
    ("hf_bert", "gru", "right", {"hidden_per_head": 5}),     # hidden < head dim
    ("hf_vit", "mhlstm", None, {}),
    ("hf_gpt2", "gru", None, {}),                            # causal: one direction
]


@pytest.mark.parametrize("case, replacement, layout, config", INIT_CASES)
def test_closed_form_init_equals_the_per_head_reference(case, replacement, layout, config):
    import copy

    from surgery.replacements.recurrent_init import init_from_teacher

    torch.manual_seed(0)
    model, x = build(case)
    model.eval()
    surgery.replace_attention(model, replacement, x, config=config)
    if layout is not None:
        data = _padded_bert_data(layout)
    elif case == "hf_vit":
        data = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))}
                for i in range(3)]
    else:
        data = [{"input_ids": torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(i))}
                for i in range(3)]
    for wrapper, evidence in _evidence(model, data):
        fast, slow = wrapper.mixer, copy.deepcopy(wrapper.mixer)
        with torch.no_grad():
            picked = init_from_teacher(fast, evidence)
            expected = _reference_init(slow, evidence, pack=layout == "right")
        assert picked == expected, wrapper.site.name
        for ours, theirs in zip(fast.state_dict().values(), slow.state_dict().values()):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # measured: <= 5e-7 of the largest
        # the started site computes what the fit assumed: the cells it set, run on real tokens
        for hidden, mask, _ in evidence.records:
            wrapper.mixer = fast
            ours = _site_output(wrapper, hidden, mask)
            wrapper.mixer = slow
            theirs = _site_output(wrapper, hidden, mask)
            keep = slice(None) if mask is None else mask.bool()
            torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)
        wrapper.mixer = fast


@pytest.mark.parametrize("cell", [torch.nn.LSTM, torch.nn.GRU])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_closed_form_features_equal_the_cells(cell, layout):
    from surgery.replacements.recurrent_init import _set_moving_average, moving_average_features

    torch.manual_seed(0)
    decays = (0.0, 0.5, 0.9, 0.995)
    values = torch.randn(3, 300, 5)  # 300 steps: three chunks of 128 with the state carried across
    mask = torch.ones(3, 300, dtype=torch.bool)
    if layout == "right":
        mask[0, 200:] = False
        mask[1, 7:] = False
    else:
        mask[0, :100] = False
        mask[1, :293] = False
    values = values * mask.unsqueeze(-1)
    features = moving_average_features(values.double(), decays, 0.7, cell, directions=2)
    rnn = cell(5, 5, batch_first=True, bidirectional=True)
    for d, decay in enumerate(decays):
        _set_moving_average(rnn, (decay, decay), 0.7)
        with torch.no_grad():
            run = rnn(values)[0].view(3, 300, 2, 5)
        torch.testing.assert_close(features[:, :, :, d][mask].float(), run[mask], atol=2e-6, rtol=1e-5)


def test_left_padded_site_output_is_the_padding_free_one():
    """A left-padded sentence's real tokens see exactly what the same sentence without pads sees."""
    torch.manual_seed(0)
    model, x = build("hf_bert")
    surgery.replace_attention(model, "mhlstm", x)
    initialise_from_teacher(model.eval(), _padded_bert_data("left"))
    wrapper = model.get_submodule("encoder.layer.0.attention.self")
    hidden = torch.randn(1, 9, 32)
    padded = torch.cat([torch.zeros(1, 3, 32), hidden], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 9], dtype=torch.bool)
    torch.testing.assert_close(_site_output(wrapper, padded, mask)[:, 3:], _site_output(wrapper, hidden, None),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("factory", ["tiny_llama_lm", "tiny_gpt2_lm"])
def test_grouped_v_proj_and_gpt2_c_attn_are_read(factory):
    import models
    from surgery.distill.init import value_projection

    torch.manual_seed(0)
    model = getattr(models, factory)().eval()  # llama: 4 query heads, 2 key/value heads of 8
    surgery.replace_attention(model, "mhlstm", {"input_ids": models.ids(1, 5)})
    data = [{"input_ids": models.ids(2, 9)} for _ in range(2)]
    chosen = initialise_from_teacher(model, data, batches=2)
    assert len(chosen) == 2 and not chosen.kept_default
    for name, picks in chosen.items():
        wrapper = model.get_submodule(name)
        assert len(picks) == 4 and all(len(p) == 1 for p in picks)  # causal: one direction per head
        original = wrapper.original
        if factory == "tiny_llama_lm":  # HF repeat_kv: key/value head g serves query heads 2g, 2g + 1
            weight = original.v_proj.weight.view(2, 1, 8, 32).expand(-1, 2, -1, -1).reshape(32, 32)
            bias = torch.zeros(32)
        else:  # Conv1D: x @ weight [D, 3C] + bias, value = the last C columns
            weight, bias = original.c_attn.weight[:, 64:].T, original.c_attn.bias[64:]
        torch.testing.assert_close(wrapper.mixer.pre_proj.weight, weight, atol=0, rtol=0)
        torch.testing.assert_close(wrapper.mixer.pre_proj.bias, bias, atol=0, rtol=0)
        torch.testing.assert_close(value_projection(wrapper)[0], weight, atol=0, rtol=0)


class _Notes:
    def __init__(self):
        self.lines = []

    def start(self, total, description, completed=0):
        pass

    def update(self, step, metrics):
        pass

    def message(self, text):
        self.lines.append(text)

    def finish(self):
        pass


def test_sites_without_a_value_projection_are_named_and_required_raises():
    from surgery.errors import SurgeryError

    torch.manual_seed(0)
    model, x = build("hf_bert")
    surgery.replace_attention(model, "mhlstm", x)
    hidden = model.get_submodule("encoder.layer.1.attention.self").original
    hidden.value = torch.nn.Identity()  # still runs (32 -> 32), but no Linear to read
    notes = _Notes()
    chosen = initialise_from_teacher(model.eval(), bert_data()[:1], batches=1, progress=notes)
    assert list(chosen) == ["encoder.layer.0.attention.self"]
    assert list(chosen.kept_default) == ["encoder.layer.1.attention.self"]
    assert "initialising site 1/1: encoder.layer.0.attention.self" in notes.lines
    assert notes.lines[-1] == ("kept their default start (1 of 2 sites): encoder.layer.1.attention.self "
                               f"(no readable value projection in {type(hidden).__name__})")
    model.get_submodule("encoder.layer.0.attention.self").original.value = torch.nn.Identity()
    assert initialise_from_teacher(model, bert_data()[:1], batches=1) == {}  # not asked for: no error
    with pytest.raises(SurgeryError, match=r"init='teacher' could start no site: .*encoder.layer.0.*init='none'"):
        initialise_from_teacher(model, bert_data()[:1], batches=1, required=True)
