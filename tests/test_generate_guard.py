"""A replaced causal HF model generates exactly what the uncached greedy loop gives, or refuses.

Replacements with a decoding form (mhlstm, gru, conv) decode with the cache (tests/test_decoding_hf.py);
one without (``causal_mean_nodecode`` below) keeps the refusal of incremental decoding.
"""

import pytest
import torch
from torch import nn

import surgery
from models import ids, tiny_gpt2_lm, tiny_llama_lm

FAMILIES = {"gpt2": tiny_gpt2_lm, "llama": tiny_llama_lm}
NO_DECODING = "causal_mean_nodecode"


@surgery.register_replacement(NO_DECODING)
class CausalMean(nn.Module):
    """Running mean of a projection (causal), registered without a decoding form."""

    def __init__(self, shape, config):
        super().__init__()
        self.proj = nn.Linear(shape.input_dim, shape.output_dim)

    def forward(self, x, padding_mask=None):
        y = self.proj(x)
        if padding_mask is not None:
            y = y * padding_mask.unsqueeze(-1).to(y.dtype)
        return y.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=y.dtype).view(1, -1, 1)


def _replaced(family: str, replacement: str = NO_DECODING):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    prompt = ids(1, 5)
    surgery.replace_attention(model, replacement, {"input_ids": prompt})
    return model, prompt


def _greedy_without_cache(model, prompt, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, scores = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=tokens, use_cache=False).logits[:, -1]
            scores.append(logits)
            chosen = logits.clone()
            chosen[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            tokens = torch.cat([tokens, chosen.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(scores, 1)


@pytest.mark.parametrize("replacement", ["mhlstm", "conv", NO_DECODING])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_generate_equals_the_uncached_greedy_loop(family, replacement):
    model, prompt = _replaced(family, replacement)
    # a replacement that decodes keeps the cache on; one that cannot turns it off
    assert model.generation_config.use_cache is (replacement != NO_DECODING)
    tokens, scores = _greedy_without_cache(model, prompt, 6)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(generated.sequences, tokens)
    # the logits, not just the argmax: tiny random models often pick the same tokens either way
    torch.testing.assert_close(torch.stack(generated.logits, 1), scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_use_cache_true_refuses_in_one_line(family):
    model, prompt = _replaced(family)
    with pytest.raises(surgery.SurgeryError, match="use_cache=False") as error:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True)
    assert len(str(error.value).splitlines()) == 1


def test_manual_incremental_step_with_an_empty_cache_is_refused():
    """The replaced sites write nothing to the cache, so its length stays 0: the guard must still
    see that the next call feeds only the newest token."""
    model, prompt = _replaced("gpt2")
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
        assert first.past_key_values.get_seq_length() == 0
        with pytest.raises(surgery.SurgeryError, match="incremental decoding"):
            model(input_ids=prompt[:, -1:], past_key_values=first.past_key_values, use_cache=True)


def test_a_fresh_cache_on_a_full_sequence_is_fine():
    model, prompt = _replaced("llama", "mhlstm")
    from transformers import DynamicCache

    with torch.no_grad():
        with_cache = model(input_ids=prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        without = model(input_ids=prompt, use_cache=False)
    torch.testing.assert_close(with_cache.logits, without.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replacement", ["mhlstm", NO_DECODING])
def test_seq2seq_generate_with_replaced_decoder_self_attention(replacement):
    from models import tiny_t5

    torch.manual_seed(0)
    model = tiny_t5().eval()
    report = surgery.replace_attention(model, replacement, on_unsupported="skip")  # cross-attention stays
    assert report.skipped and all(s.kind == "cross" for s in report.skipped)
    source = ids(1, 7)
    decoded, scores = torch.full((1, 1), model.config.decoder_start_token_id), []
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=source, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
            scores.append(logits)
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
        generated = model.generate(source, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(generated.sequences, decoded)
    torch.testing.assert_close(torch.stack(generated.logits, 1), torch.stack(scores, 1), rtol=1e-5, atol=1e-5)
    if replacement == NO_DECODING:
        with pytest.raises(surgery.SurgeryError, match="use_cache=False"):
            with torch.no_grad():
                model.generate(source, max_new_tokens=3, do_sample=False, use_cache=True)
        return
    with torch.no_grad():  # the decoder's replaced self-attention decodes from the cache
        cached = model.generate(source, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True,
                                output_logits=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, decoded)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(scores, 1), rtol=1e-5, atol=1e-5)


def test_restore_attention_turns_the_cache_back_on():
    model, prompt = _replaced("gpt2")
    assert model.generation_config.use_cache is False
    surgery.restore_attention(model)
    assert model.generation_config.use_cache is True
