"""Replacement keeps the calling convention and output structure; save/load round-trips exactly."""

import json

import pytest
import torch

import surgery
from models import CASES, build, main_tensor, run
from surgery.swap import ReplacedAttention

REPLACEMENTS = ["mhlstm", "gru", "conv"]


def _structure(output):
    if isinstance(output, torch.Tensor):
        return ("tensor", tuple(output.shape))
    if hasattr(output, "keys"):
        return (type(output).__name__, tuple((k, _structure(v)) for k, v in output.items()))
    if isinstance(output, (tuple, list)):
        return tuple(_structure(o) for o in output)
    return type(output).__name__


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("case", list(CASES))
def test_replace_keeps_structure(case, replacement):
    model, inputs = build(case)
    with torch.no_grad():
        before = run(model, inputs)
    report = surgery.replace_attention(model, replacement, inputs)
    assert len(report.sites) == len(CASES[case][2])
    assert all(isinstance(model.get_submodule(s.site.name), ReplacedAttention) for s in report.sites)
    with torch.no_grad():
        after = run(model, inputs)
    assert _structure(after) == _structure(before)
    assert torch.isfinite(main_tensor(after)).all()
    # teacher mode reproduces the original exactly
    surgery.use_original_attention(model)
    with torch.no_grad():
        teacher = run(model, inputs)
    torch.testing.assert_close(main_tensor(teacher), main_tensor(before))


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("case", ["hf_gpt2", "hand_written_causal"])
def test_causal_sites_get_causal_replacements(case, replacement):
    model, inputs = build(case)
    surgery.replace_attention(model, replacement, inputs)
    x = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    with torch.no_grad():
        a = main_tensor(run(model, {"input_ids": x} if isinstance(inputs, dict) else x))
        b = main_tensor(run(model, {"input_ids": changed} if isinstance(inputs, dict) else changed))
    # other inputs, same shapes: fp32 agreement, not bit identity
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_mhlstm_is_bidirectional_on_encoders():
    model, inputs = build("hand_written")
    surgery.replace_attention(model, "mhlstm", inputs)
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    with torch.no_grad():
        assert not torch.allclose(model(inputs)[:, 0], model(changed)[:, 0])


def test_gradients_reach_only_what_is_asked():
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "mhlstm", inputs)
    for name, p in model.named_parameters():
        p.requires_grad_(".mixer." in name)
    model.train()
    model.forward_features(inputs).sum().backward()  # every token, not just the class token
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".mixer." in n)
    assert all(g is None for n, g in grads.items() if ".mixer." not in n)


def test_reused_projection_keeps_its_key_after_finalize():
    model, inputs = build("timm_vit")
    keys_before = set(model.state_dict())
    surgery.replace_attention(model, "mhlstm", inputs)
    surgery.finalize(model)
    keys_after = set(model.state_dict())
    removed = keys_before - keys_after
    assert removed == {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv.weight", "qkv.bias")}
    assert {k for k in keys_after - keys_before if ".mixer." not in k} == set()


def test_failed_replacement_leaves_model_untouched():
    model, inputs = build("timm_vit")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.SurgeryError):
        surgery.replace_attention(model, "mhlstm", inputs, config={"pre_projection": False,
                                                                   "hidden_per_head": -1})
    with pytest.raises(surgery.UnknownNameError, match="mhlstm"):
        surgery.replace_attention(model, "mhlsm", inputs)
    with pytest.raises(surgery.SurgeryError, match="unknown setting"):
        surgery.replace_attention(model, "mhlstm", inputs, config={"kernel": 3})
    assert not any(isinstance(m, ReplacedAttention) for m in model.modules())
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_restore_attention_undoes_the_swap():
    model, inputs = build("hf_bert")
    with torch.no_grad():
        before = main_tensor(run(model, inputs))
    surgery.replace_attention(model, "gru", inputs)
    surgery.restore_attention(model)
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(run(model, inputs)), before)


@pytest.mark.parametrize("name,attention,replaced", [
    ("deit_tiny_patch16_224", 148_224, 298_560),
    ("deit_small_patch16_224", 591_360, 744_576),
    ("deit_base_patch16_224", 2_362_368, 2_078_976),
])
def test_mhlstm_parameter_counts_match_far(name, attention, replaced):
    import timm

    model = timm.create_model(name)
    report = surgery.replace_attention(model, "mhlstm")
    assert {(s.params_before, s.params_after) for s in report.sites} == {(attention, replaced)}
    surgery.finalize(model)
    assert surgery.count_parameters(model) == report.params_after == sum(p.numel() for p in model.parameters())


def test_custom_replacement_registration():
    @surgery.register_replacement("test_mean")
    class MeanMixer(torch.nn.Module):
        """Cumulative mean over tokens."""

        def __init__(self, shape, config):
            super().__init__()
            self.proj = torch.nn.Linear(shape.input_dim, shape.output_dim)

        def forward(self, x, padding_mask=None):
            steps = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
            return self.proj(x).cumsum(1) / steps

    assert "test_mean" in surgery.list_replacements()
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "test_mean", inputs)
    assert model(inputs).shape == (2, 10)


@pytest.mark.parametrize("case", ["timm_vit", "hf_bert", "torch_encoder", "hand_written"])
@pytest.mark.parametrize("finalized", [False, True])
def test_save_load_round_trip(tmp_path, case, finalized):
    model, inputs = build(case)
    surgery.replace_attention(model, "mhlstm", inputs)
    if finalized:
        surgery.finalize(model)
    surgery.save(model, tmp_path)
    base, _ = build(case)
    loaded = surgery.load(tmp_path, model=base)
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(run(loaded, inputs)), main_tensor(run(model, inputs)),
                                   rtol=0, atol=0)
    assert all(w.finalized is finalized for w in loaded.modules() if isinstance(w, ReplacedAttention))


def test_load_rebuilds_from_source(tmp_path):
    import timm

    model = timm.create_model("deit_tiny_patch16_224").eval()
    surgery.replace_attention(model, "gru")
    surgery.save(model, tmp_path, source="deit_tiny")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(surgery.load(tmp_path)(x), model(x), rtol=0, atol=0)


def test_damaged_checkpoints_are_refused(tmp_path):
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "conv", inputs)
    hand, hand_inputs = build("hand_written")  # a class surgery cannot describe (timm's it can, issue 19)
    surgery.replace_attention(hand, "conv", hand_inputs)
    surgery.save(hand, tmp_path / "hand")
    with pytest.raises(surgery.ManifestError, match="no model source"):
        surgery.load(tmp_path / "hand")
    surgery.save(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(surgery.ManifestError, match="checksum"):
        surgery.load(tmp_path, model=build("timm_vit")[0])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(surgery.ManifestError, match="not valid JSON"):
        surgery.load(tmp_path, model=build("timm_vit")[0])
    with pytest.raises(surgery.ManifestError, match="no manifest.json"):
        surgery.load(tmp_path / "missing")


def test_manifest_that_does_not_match_the_model(tmp_path):
    model, inputs = build("timm_vit")
    surgery.replace_attention(model, "conv", inputs)
    surgery.save(model, tmp_path)
    with pytest.raises(surgery.ManifestError, match="does not match the model"):
        surgery.load(tmp_path, model=build("hf_bert")[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["source"] = "py:os:getcwd"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(surgery.ManifestError, match="allow_code"):
        surgery.load(tmp_path)


def test_incremental_decoding_with_a_cache_is_refused():
    model, inputs = build("hf_gpt2")
    reference = model(**inputs, use_cache=True).past_key_values
    surgery.replace_attention(model, "mhlstm", inputs)
    assert reference.get_seq_length() == 12
    with pytest.raises(surgery.SurgeryError, match="use_cache=False"):
        model(input_ids=inputs["input_ids"][:, :1], past_key_values=reference)
    assert isinstance(model(**inputs, use_cache=False).last_hidden_state, torch.Tensor)


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_does_not_leak_into_real_tokens(replacement, attention):
    from transformers import BertConfig, BertModel

    from models import ids

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, attn_implementation=attention)).eval()
    tokens = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    surgery.replace_attention(model, replacement, {"input_ids": tokens, "attention_mask": mask})
    with torch.no_grad():
        padded = model(input_ids=tokens, attention_mask=mask).last_hidden_state[1, :8]
        alone = model(input_ids=tokens[1:, :8]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_key_padding_mask_of_torch_encoder(replacement):
    model, inputs = build("torch_encoder")
    surgery.replace_attention(model, replacement, inputs)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        padded = model(inputs, src_key_padding_mask=pad)[1, :4]
        alone = model(inputs[1:, :4])[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def _tiny_bert(attention="sdpa"):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, attn_implementation=attention)).eval()


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_mask_without_padding_gives_exactly_no_mask(replacement):
    # the wrapper passes every mask on (no data-dependent "is there padding?" branch), so an
    # all-real mask must give bit for bit what no mask gives
    from models import ids

    model = _tiny_bert()
    tokens = ids(2, 12)
    surgery.replace_attention(model, replacement, {"input_ids": tokens})
    mixer = next(surgery.swap.replaced_sites(model)).mixer
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        assert torch.equal(mixer(x, torch.ones(2, 12, dtype=torch.bool)), mixer(x))
        masked = model(input_ids=tokens, attention_mask=torch.ones(2, 12, dtype=torch.long)).last_hidden_state
        assert torch.equal(masked, model(input_ids=tokens).last_hidden_state)


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # torch's nn.LSTM/GRU export
@pytest.mark.parametrize("replacement, config", [
    ("conv", None), ("gru", {"bidirectional": False}), ("mhlstm", {"bidirectional": False}),
])
def test_export_with_a_padded_attention_mask(replacement, config):
    from models import ids

    model = _tiny_bert()
    tokens = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    surgery.replace_attention(model, replacement, {"input_ids": tokens, "attention_mask": mask}, config=config)
    inputs = {"input_ids": tokens, "attention_mask": mask}
    program = torch.export.export(model, (), inputs, strict=False)
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state
        exported = program.module()(**inputs).last_hidden_state
    # the program is a re-trace into aten ops, not the eager call replayed: torch does not promise
    # the same kernels bit for bit, so fp32 agreement to about 1 ulp of the values
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-6)
    other = mask.clone()
    other[0, 10:] = 0  # the padding is an input of the program, not baked into it
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_ids=tokens, attention_mask=other).last_hidden_state,
                                   model(input_ids=tokens, attention_mask=other).last_hidden_state,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")
def test_export_of_a_bidirectional_recurrent_mixer_takes_unpadded_batches_only():
    # bidirectional LSTM/GRU mixers pack right-padded batches, which torch.export cannot trace
    # (nn.LSTM sizes its state by the packed batch sizes, a tensor): the program checks instead
    from models import ids

    model = _tiny_bert()
    tokens = ids(2, 12)
    ones = torch.ones(2, 12, dtype=torch.long)
    padded = ones.clone()
    padded[1, 8:] = 0
    surgery.replace_attention(model, "mhlstm", {"input_ids": tokens})
    program = torch.export.export(model, (), {"input_ids": tokens, "attention_mask": ones}, strict=False)
    with torch.no_grad():
        for inputs in ({"input_ids": tokens}, {"input_ids": tokens, "attention_mask": ones}):
            torch.testing.assert_close(program.module()(input_ids=tokens, attention_mask=ones).last_hidden_state,
                                       model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="Runtime assertion failed"):
            program.module()(input_ids=tokens, attention_mask=padded)
        # eager still packs the padded batch: real tokens do not see the pads
        alone = model(input_ids=tokens[1:, :8]).last_hidden_state[0]
        torch.testing.assert_close(model(input_ids=tokens, attention_mask=padded).last_hidden_state[1, :8],
                                   alone, rtol=1e-4, atol=1e-5)
