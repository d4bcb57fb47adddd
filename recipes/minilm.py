"""The MiniLM recipe: the real all-MiniLM-L6-v2 sentence encoder with all 6 attention layers replaced.

For each replacement, a fresh copy of the bundled pretrained model has every self-attention block
replaced, then the replacements are distilled on offline text: by default ``text:python+english``,
equal shares of Python's own documentation and the standard library's docstrings (``text:python``)
and WordNet's general English (``text:english``, ``apt-get install wordnet-base``); or any other
text spec (a weighted mix such as ``text:python*1+english*2``, ``text:builtin``, ``text:PATH``).
Multi-head LSTM and GRU sites start from the teacher (``init="teacher"``: value projection +
per-head moving averages fitted by least squares, see
``surgery.distill.init``); an optional teacher-forced phase ("blockwise", every site learns its own
attention's output in parallel) comes next, then end to end with every weight free (the student on
its own activations, site MSE + final hidden-state and sentence-embedding terms; the new mixers at
``e2e_lr``, the pre-trained weights at ``other_lr_scale`` times it), which is what moved the
embedding cosine most in the measured runs (docs/distillation.md). The report is measured on two
held-out sets: in domain, the held-out split of the (first) training source (topics never seen in
training), and out of domain, ``surgery.data.heldout_english``: 241 everyday English sentences with
paraphrase pairs, written for this project, that no training source holds. On each: the mean cosine
between student and teacher sentence embeddings (mean pooling + L2 normalisation, as
sentence-transformers does), and nearest-neighbour retrieval agreement: top-1 = share of held-out
sentences whose nearest other sentence is the same under the student as under the teacher; top-5 =
share whose teacher nearest neighbour is among the student's five nearest.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from surgery.errors import DataError, SurgeryError


@dataclass
class MinilmConfig:
    """Settings of the MiniLM recipe.

    Example:
        >>> MinilmConfig(replacements="gru").replacement_list
        ['gru']
    """

    replacements: str = "mhlstm,gru,conv"
    replacement_settings: str = ""
    model: str = "minilm"
    data: str = "text:python+english"
    init: str = "teacher"
    init_batches: int = 12
    blockwise_steps: int = 0
    blockwise_lr: float = 2e-3
    e2e_steps: int = 600
    e2e_lr: float = 2e-3
    other_lr_scale: float = 0.2
    site_weight: float = 0.1
    freeze: str = "*.word_embeddings.*"
    teacher_cache: bool = False
    batch_size: int = 32
    seq_len: int = 32
    group_by_length: bool = True
    eval_sentences: int = 1000
    max_seconds: Optional[float] = None
    seed: int = 0
    device: str = "cpu"

    HELP = {
        "replacements": "comma-separated replacements, each distilled in its own copy (mhlstm,gru,conv).",
        "replacement_settings": "settings of the replacements' configs, comma-separated: KEY=VALUE for every "
                                "replacement, NAME.KEY=VALUE for one (e.g. linear.window=8,mhlstm.hidden_per_head=32); "
                                "empty: each replacement's defaults.",
        "data": "training text: text:builtin (Python's docs, offline), text:python (the same + the standard "
                "library's docstrings, ~4x the text), text:english (WordNet's glosses and examples; apt-get "
                "install wordnet-base), a mix with weights as shares (text:python*1+english*2) or text:PATH "
                "(file or folder of .txt). The in-domain held-out set is the first source's held-out split. Default "
                "since issue 20: Python's text and English in equal shares (out-of-domain cosine 0.775 against "
                "0.693 for text:python after 120 probe steps, in domain 0.811 against 0.828).",
        "init": "teacher: start LSTM/GRU mixers from the original attention's values (none: random init).",
        "init_batches": "batches the teacher-derived fit sees (12 gave 0.74 held-out cosine before any step, 4 gave 0.66).",
        "blockwise_steps": "teacher-forced steps first (every site fed the teacher's input; 0 skips the phase).",
        "blockwise_lr": "peak AdamW lr of the teacher-forced phase.",
        "e2e_steps": "end-to-end steps, every weight trained (0 skips the phase).",
        "e2e_lr": "peak lr of the end-to-end phase (the new mixers).",
        "other_lr_scale": "end-to-end lr of the pre-trained weights, relative to e2e_lr.",
        "freeze": "parameters kept fixed in the end-to-end phase (fnmatch patterns; '' trains all): the "
                  "30k-row word embedding costs ~18% of a step's CPU time.",
        "teacher_cache": "keep the teacher's outputs on disk during the end-to-end phase (about 11 MB a batch, "
                         "deleted when the phase ends; the batches are then fixed, their order shuffled): later "
                         "epochs skip the teacher forward, ~17% of a step, but writing costs the first epoch time.",
        "site_weight": "end-to-end weight of the per-site MSE terms (the task terms weigh 1).",
        "batch_size": "text pieces per step.",
        "seq_len": "tokens per text piece (sentences are packed up to this length). Default since session 8: "
                   "32 tokens x 32 pieces instead of 64 x 16 (the held-out sets are single sentences; 400 probe "
                   "steps gave 0.924 / 0.912 in / out of domain against 0.904 / 0.874, and 2,700 steps in 25.6 "
                   "minutes 0.960 / 0.956).",
        "group_by_length": "train on batches of pieces of similar length (HuggingFace's group_by_length): "
                           "a batch is padded to its longest piece, so this cuts the padding and the step time "
                           "(default since session 7: mhlstm steps 0.67 s against 1.23 s, and 1,700 grouped steps "
                           "in 19.7 min gave 0.946 / 0.927 in / out of domain against 0.937 / 0.911 for 1,000 "
                           "ungrouped ones in 21.2 min).",
        "eval_sentences": "in-domain held-out sentences for the cosine and retrieval figures (the "
                          "out-of-domain set is always all of its 241 sentences).",
        "max_seconds": "stop each phase after this many seconds (after a checkpoint).",
        "seed": "seed of data order and initialisation.",
        "model": "minilm (the bundled all-MiniLM-L6-v2) or hf:<local dir> holding a copy of it.",
        "device": "where to train: cpu or cuda.",
    }

    @property
    def replacement_list(self) -> list[str]:
        from surgery.recipes import replacement_names

        return replacement_names(self.replacements)

    @property
    def settings_of(self) -> dict[str, dict]:
        """Each replacement's config settings from ``replacement_settings`` (checked, one-line errors)."""
        from surgery.recipes import replacement_settings

        return replacement_settings(self.replacement_settings, self.replacement_list)

    def check(self) -> None:
        """Every check that can fail before work starts (one-line errors)."""
        self.settings_of  # noqa: B018 - checks the names and replacement settings (one-line errors)
        kind, _, rest = self.data.partition(":")
        from surgery.data import BUILTIN_TEXT, text_mix, wordnet_dir

        if kind != "text" or not rest:
            raise DataError(f"data {self.data!r} must be text:builtin, text:python, text:english, a mix "
                            "(text:python*1+english*2) or text:PATH")
        for name, _ in text_mix(rest):
            if name not in BUILTIN_TEXT and not Path(name).exists():
                raise DataError(f"text source {name!r} does not exist; give a text file, a folder of .txt files, "
                                "text:builtin, text:python or text:english")
            if name == "english":
                wordnet_dir()  # the one-line install hint when WordNet is missing
        if not (self.model == "minilm" or self.model.startswith("hf:")):
            raise SurgeryError(f"model {self.model!r} must be minilm or hf:<local dir>")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SurgeryError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        if self.init not in ("teacher", "none"):
            raise SurgeryError(f"init must be teacher or none, not {self.init!r}")
        if (self.blockwise_steps < 0 or self.e2e_steps < 0 or self.blockwise_steps + self.e2e_steps < 1
                or self.batch_size < 1 or self.seq_len < 8):
            raise SurgeryError("blockwise_steps and e2e_steps must be >= 0 (not both 0), batch_size >= 1, "
                               "seq_len >= 8")


def _replace_route(config: MinilmConfig = MinilmConfig()) -> dict:
    return {"mode": "e2e", "steps": 300, "lr": config.e2e_lr, "batch_size": config.batch_size,
            "seq_len": config.seq_len,
            "distill": {"train": "all", "other_lr_scale": config.other_lr_scale, "init": config.init,
                        "init_batches": config.init_batches, "site_weight": config.site_weight,
                        "freeze": config.freeze, "group_by_length": config.group_by_length, "max_seconds": 300}}


# What `surgery replace --model <alias> --data ...` uses where no flag says otherwise (the CLI reads it
# from here): this recipe's end-to-end route, taken from MinilmConfig's defaults, cut to a first run of
# 300 steps and five minutes (grouped by length, 300 steps fit five minutes on two quiet cores).
REPLACE_DEFAULTS = {"minilm": _replace_route()}


def in_domain_spec(data: str) -> str:
    """The text spec whose held-out split is the in-domain evaluation set: the first source of a mix.

    Example:
        >>> in_domain_spec("text:python*1+english*2")
        'text:python'
    """
    from surgery.data import text_mix

    return "text:" + text_mix(data.partition(":")[2])[0][0]


def held_out_sentences(data: str, count: int) -> list[str]:
    """Up to ``count`` distinct held-out sentences of the text source (evenly spread over it), none
    of which occurs in its training text. For a mix, the first source's (``in_domain_spec``)."""
    from surgery.data import sentences, text_source

    rest = in_domain_spec(data).partition(":")[2]
    source = text_source(rest)
    if rest == "english":  # WordNet's entries are sentence lists (see surgery.data.spec)
        seen = {t for t in sentences(source("train"), min_words=1, max_words=10**6)}
    else:
        seen = "\n".join(source("train"))
    # a sentence that also occurs in the training text is not held out
    found = [s for s in dict.fromkeys(sentences(source("heldout"))) if s not in seen]
    if len(found) < 10:
        raise DataError(f"the held-out split of {data!r} has only {len(found)} sentences; give more text")
    stride = max(1, len(found) // count)
    return found[::stride][:count]


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's own pooling)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def retrieval_agreement(teacher: torch.Tensor, student: torch.Tensor) -> dict[str, float]:
    """Nearest-neighbour agreement between two embeddings of the same sentences.

    Returns ``{"top1": %, "top5": %}``: top-1 = the student's nearest other sentence is the
    teacher's; top-5 = the teacher's nearest is among the student's five nearest.

    Example:
        >>> e = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
        >>> retrieval_agreement(e, e)
        {'top1': 100.0, 'top5': 100.0}
    """
    def neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=-1).indices

    teacher_first = neighbours(teacher, 1)[:, 0]
    student_top = neighbours(student, 5)
    top1 = (student_top[:, 0] == teacher_first).float().mean().item()
    top5 = (student_top == teacher_first[:, None]).any(-1).float().mean().item()
    return {"top1": 100.0 * top1, "top5": 100.0 * top5}


#: the report's columns: in-domain figures keep their old names; ood_* are the out-of-domain set's
REPORT_COLUMNS = ["replacement", "steps", "params", "embedding_cosine", "retrieval_top1", "retrieval_top5",
                  "ood_cosine", "ood_top1", "ood_top5", "seconds"]
REPORT_LABELS = {"embedding_cosine": "in-domain cosine", "retrieval_top1": "in-domain top-1 %",
                 "retrieval_top5": "in-domain top-5 %", "ood_cosine": "out-of-domain cosine",
                 "ood_top1": "out-of-domain top-1 %", "ood_top5": "out-of-domain top-5 %"}


def fidelity_columns(teacher: torch.Tensor, student: torch.Tensor, teacher_ood: torch.Tensor,
                     student_ood: torch.Tensor) -> dict[str, float]:
    """A report row's fidelity figures from the two held-out sets' embeddings: in domain
    (``embedding_cosine``, ``retrieval_top1``/``top5``) and out of domain (``ood_*``).

    Example:
        >>> e = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
        >>> fidelity_columns(e, e, e, e)["ood_top5"]
        100.0
    """
    inside, outside = retrieval_agreement(teacher, student), retrieval_agreement(teacher_ood, student_ood)
    return {"embedding_cosine": float((teacher * student).sum(-1).mean()), "retrieval_top1": inside["top1"],
            "retrieval_top5": inside["top5"], "ood_cosine": float((teacher_ood * student_ood).sum(-1).mean()),
            "ood_top1": outside["top1"], "ood_top5": outside["top5"]}


def run_minilm(config: MinilmConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Replace all 6 attention layers of the real all-MiniLM-L6-v2, distil, report held-out fidelity.

    Args:
        config: the settings (``MinilmConfig``); checked before any work.
        out_dir: run directory (one folder per replacement and phase; report.json/.md); resumable.
        log: one-line progress messages.

    Returns:
        The report: one row per replacement with params, embedding cosine and retrieval agreement,
        in domain and out of domain (``REPORT_COLUMNS``).

    Example:
        >>> run_minilm(MinilmConfig(replacements="conv", blockwise_steps=2, e2e_steps=0,
        ...            eval_sentences=50), "/tmp/minilm-toy")  # doctest: +SKIP
    """
    import surgery
    from surgery.data import data_from_spec, heldout_english, tokenizer_for
    from surgery.models import load_model
    from surgery.progress import PrintProgress

    from surgery.recipes import claim_settings
    from surgery.recipes.report import write_report

    config.check()
    out_dir = Path(out_dir)

    def load() -> nn.Module:
        # .float(): a copy stored in half precision (to fit a transfer limit) still computes in fp32
        return load_model(config.model).float().to(config.device)

    teacher = load()
    tokenizer = tokenizer_for(teacher)
    texts = held_out_sentences(config.data, config.eval_sentences)
    ood_texts = heldout_english()
    teacher_embeddings = sentence_embeddings(teacher, tokenizer, texts)
    teacher_ood = sentence_embeddings(teacher, tokenizer, ood_texts)
    rows = [{"replacement": "attention (teacher)", "params": surgery.count_parameters(teacher),
             **fidelity_columns(teacher_embeddings, teacher_embeddings, teacher_ood, teacher_ood),
             "embedding_cosine": 1.0, "ood_cosine": 1.0, "seconds": 0.0}]
    train = data_from_spec(config.data, teacher, "train", batch_size=config.batch_size, seq_len=config.seq_len,
                           seed=config.seed, fixed_batches=config.teacher_cache,
                           group_by_length=config.group_by_length)
    held = data_from_spec(in_domain_spec(config.data), teacher, "heldout", batch_size=config.batch_size,
                          seq_len=config.seq_len, seed=config.seed)
    example = {"input_ids": torch.ones(1, 16, dtype=torch.long),
               "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    settings_of = config.settings_of
    for replacement in config.replacement_list:
        student = load()
        surgery.replace_attention(student, replacement, {k: v.to(config.device) for k, v in example.items()},
                                  config=settings_of[replacement])
        claim_settings(out_dir / replacement, settings_of[replacement])
        began = time.perf_counter()
        steps_done = 0
        phases = [("blockwise", config.blockwise_steps, config.blockwise_lr, {}),
                  ("e2e", config.e2e_steps, config.e2e_lr,
                   {"train": "all", "other_lr_scale": config.other_lr_scale, "site_weight": config.site_weight,
                    "freeze": config.freeze or None, "cache": "run" if config.teacher_cache else None})]
        phases = [phase for phase in phases if phase[1] > 0]
        for index, (mode, steps, lr, extra) in enumerate(phases):
            if index == 0:
                extra = {**extra, "init": config.init, "init_batches": config.init_batches}
            path = out_dir / replacement / mode
            if (path / "fidelity.json").is_file():
                student = surgery.load(path, model=load_model(config.model).float()).to(config.device)
                log(f"{replacement} {mode}: already done, reloaded from {path}")
                steps_done += json.loads((path / "fidelity.json").read_text()).get("steps", 0)
                continue
            log(f"{replacement} {mode}: {steps} steps at lr {lr}")
            result = surgery.distill(None, student, train, mode=mode, steps=steps, lr=lr, run_dir=path, resume=True,
                            eval_data=held, seed=config.seed, progress=PrintProgress(every=50),
                            max_seconds=config.max_seconds, warmup=0.05, **extra)
            steps_done += result.steps
            if (path / "fidelity.json").is_file():
                shutil.rmtree(path / "teacher_cache", ignore_errors=True)  # only a finished phase's speed-up
        seconds = time.perf_counter() - began
        row = {"replacement": replacement, "steps": steps_done, "params": surgery.count_parameters(student),
               **fidelity_columns(teacher_embeddings, sentence_embeddings(student, tokenizer, texts),
                                  teacher_ood, sentence_embeddings(student, tokenizer, ood_texts)),
               "seconds": round(seconds, 1)}
        rows.append(row)
        log(f"{replacement}: in domain cosine {row['embedding_cosine']:.4f}, top-1 {row['retrieval_top1']:.1f}%, "
            f"top-5 {row['retrieval_top5']:.1f}%; out of domain cosine {row['ood_cosine']:.4f}, "
            f"top-1 {row['ood_top1']:.1f}%, top-5 {row['ood_top5']:.1f}%")
    report = {"recipe": "minilm", "columns": REPORT_COLUMNS, "labels": REPORT_LABELS,
              "rows": rows, "config": asdict(config),
              "notes": [f"in domain: {len(texts)} held-out sentences of {in_domain_spec(config.data)} "
                        "(topics never trained on)",
                        f"out of domain: the {len(ood_texts)} everyday English sentences of "
                        "surgery/data/heldout_english.txt (no training source holds them)",
                        "retrieval: top1 = student's nearest neighbour equals the teacher's; top5 = the "
                        "teacher's nearest is in the student's 5 nearest (percent)",
                        "seconds: distillation wall time in this run (0 when reloaded)"]}
    write_report(out_dir, report)
    return report


def _register() -> None:
    from surgery.recipes import register_recipe

    register_recipe("minilm", "The real all-MiniLM-L6-v2 (bundled, offline): replace all 6 attention layers with "
                    "each replacement, distil on offline text, report sentence-embedding cosine and "
                    "nearest-neighbour retrieval agreement (top-1/top-5) with the teacher on held-out text "
                    "in domain and out of domain (everyday English).",
                    MinilmConfig, run_minilm)


_register()
