"""HuggingFace generate() with use_cache=True on replaced causal models: the state lives in the
model's own Cache and gives the tokens (and logits) of the uncached computation."""

import pytest
import torch

import surgery
from models import ids, tiny_gpt2_lm, tiny_llama_lm



def tiny_mistral_lm():
    """Mistral-shaped: a sliding window (4) shorter than the prompts, so hybrids keep a sliding KV layer."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                            bos_token_id=0, eos_token_id=0, pad_token_id=0))


FAMILIES = {"gpt2": tiny_gpt2_lm, "llama": tiny_llama_lm, "mistral": tiny_mistral_lm}
HYBRID = {"gpt2": ["transformer.h.1.attn"], "llama": ["model.layers.0.self_attn"],
          "mistral": ["model.layers.1.self_attn"]}


def _model(family, replacement="mhlstm", targets=None, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    surgery.replace_attention(model, replacement, {"input_ids": ids(1, 5)}, targets=targets)
    return model


def _prompt():
    prompt = ids(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return prompt, mask


def _greedy_uncached(model, prompt, mask, steps):
    tokens, scores = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            scores.append(logits)
            chosen = logits.clone()
            chosen[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            tokens = torch.cat([tokens, chosen.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return tokens, torch.stack(scores, 1)


def _generate(model, prompt, mask, steps, **options):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **options)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("replacement", ["mhlstm", "gru", "conv"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_generate_equals_uncached(family, replacement, hybrid):
    model = _model(family, replacement, HYBRID[family] if hybrid else None)
    assert model.generation_config.use_cache is True  # every replaced site decodes
    prompt, mask = _prompt()
    cached = _generate(model, prompt, mask, 8, use_cache=True)
    uncached = _generate(model, prompt, mask, 8, use_cache=False)
    tokens, scores = _greedy_uncached(model, prompt, mask, 8)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, tokens)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(cached.logits, 1), scores, atol=1e-5, rtol=1e-5)
    cache = cached.past_key_values
    assert cache.get_seq_length() == prompt.shape[1] + 7  # the last token is not fed back
    from surgery.decoding import state_bytes

    assert state_bytes(cache) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hybrid_keeps_kv_for_attention_and_state_for_replaced(family):
    model = _model(family, "mhlstm", HYBRID[family])
    prompt, mask = _prompt()
    cache = _generate(model, prompt, mask, 4, use_cache=True).past_key_values
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds.count("SiteStateLayer") == 1 and len(kinds) == 2
    attention = next(layer for layer in cache.layers if type(layer).__name__ != "SiteStateLayer")
    assert attention.get_seq_length() == prompt.shape[1] + 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_beam_search_equals_uncached_beam_search(family):
    model = _model(family, "mhlstm", seed=3)
    prompt, mask = _prompt()
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False,
                   output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=mask, use_cache=True, **options)
        uncached = model.generate(prompt, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_past_key_values_fed_back_by_hand(family):
    model = _model(family, "gru", HYBRID[family])
    prompt = ids(1, 6)
    with torch.no_grad():
        full = model(input_ids=prompt, use_cache=False).logits
        out = model(input_ids=prompt[:, :3], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for i in range(3, 5):
            out = model(input_ids=prompt[:, i:i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        out = model(input_ids=prompt[:, 5:], past_key_values=cache, use_cache=True)  # a chunk works too
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _one_line(error):
    assert len(str(error.value).splitlines()) == 1


def test_crop_and_rollback_are_refused_naming_the_site():
    model = _model("llama", "mhlstm")
    prompt = ids(1, 6)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        with pytest.raises(surgery.SurgeryError, match="model.layers.0.self_attn.*cannot be cropped") as error:
            cache.crop(-2)
        _one_line(error)
        with pytest.raises(surgery.SurgeryError, match="cannot be rolled back") as error:
            model(input_ids=prompt[:, -1:], past_key_values=cache, position_ids=torch.tensor([[3]]), use_cache=True)
        _one_line(error)


def test_a_cache_from_another_model_or_from_before_surgery_is_refused():
    model, other = _model("gpt2", "mhlstm"), _model("gpt2", "mhlstm", seed=1)
    prompt = ids(1, 5)
    with torch.no_grad():
        cache = other(input_ids=prompt, use_cache=True).past_key_values
        with pytest.raises(surgery.SurgeryError, match="another model") as error:
            model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True)
        _one_line(error)
        torch.manual_seed(0)
        plain = tiny_gpt2_lm().eval()
        kv = plain(input_ids=prompt, use_cache=True).past_key_values  # an attention KV cache
        with pytest.raises(surgery.SurgeryError, match="filled KV cache.*not built for its replacement") as error:
            model(input_ids=prompt[:, -1:], past_key_values=kv, use_cache=True)
        _one_line(error)


def test_a_training_call_keeps_no_state_and_continuing_is_refused():
    model = _model("gpt2", "mhlstm").train()
    prompt = ids(1, 5)
    out = model(input_ids=prompt, use_cache=True)
    out.logits.sum().backward()  # the training form ran: gradients reach the mixers
    assert any(p.grad is not None for n, p in model.named_parameters() if ".mixer." in n)
    model.eval()
    with torch.no_grad(), pytest.raises(surgery.SurgeryError, match="kept no state") as error:
        model(input_ids=prompt[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    _one_line(error)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_timing_decodes_what_greedy_generate_does_and_measures_the_memory(family):
    from surgery.decoding import prefill, time_decoding, time_steps

    torch.manual_seed(0)
    original = FAMILIES[family]().eval()
    replaced = _model(family)
    surgery.finalize(replaced)
    prompt = ids(1, 9)
    rows = time_decoding({"attention": original, "mhlstm": replaced}, prompt, steps=4)
    for name, model in (("attention", original), ("mhlstm", replaced)):
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert rows[name]["generated"] == greedy[0, 9:].tolist()
        assert len(rows[name]["ms_steps"]) == 4 and rows[name]["ms_per_token"] > 0
        assert (rows[name]["context"], rows[name]["batch"]) == (9, 1)
    assert rows["attention"]["state_bytes"] == 0 and rows["mhlstm"]["kv_bytes"] == 0
    assert rows["attention"]["kv_bytes"] > 0 and rows["mhlstm"]["state_bytes"] > 0
    # one batch-1 prefill serves a batch of 3 (copies of the cache), and is itself left as it was
    started = {"mhlstm": prefill(replaced, prompt)}
    wide = time_steps({"mhlstm": replaced}, started, steps=2, batch=3)["mhlstm"]
    assert wide["batch"] == 3 and wide["state_bytes"] == 3 * rows["mhlstm"]["state_bytes"]
    assert wide["generated"] == rows["mhlstm"]["generated"][:3]
    assert time_steps({"mhlstm": replaced}, started, steps=2)["mhlstm"]["generated"] == wide["generated"]
    with pytest.raises(surgery.errors.SurgeryError, match="multiple"):
        time_steps({"mhlstm": replaced}, {"mhlstm": prefill(replaced, ids(2, 9))}, steps=2, batch=3)
    with pytest.raises(surgery.errors.SurgeryError, match="steps >= 2"):
        time_decoding({"mhlstm": replaced}, prompt, steps=1)
