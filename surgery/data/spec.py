"""Data specs: the strings the CLI's ``--data`` and the recipes take (``text:python``, ``mnist``, ...)
turned into ``Batches``."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from surgery.data.batches import Batches, random_batches
from surgery.data.images import image_folder_batches, mnist_batches
from surgery.data.text import (
    builtin_text, english_text, file_text, pack_sentences, python_text, sentences, text_batches, tokenizer_for,
)
from surgery.errors import DataError

#: the named text sources (``text:NAME``): Python's docs, + the stdlib's docstrings, WordNet's English
BUILTIN_TEXT = {"builtin": builtin_text, "python": python_text, "english": english_text}
DATA_SPECS = ("text:builtin", "text:python", "text:english", "text:A+B (mix, text:A*1+B*2 weighted)", "text:PATH",
              "mnist", "images:PATH", "timm:NAME[:ROOT]", "random")


def text_source(name: str) -> Callable[[str], list[str]]:
    """The ``split -> paragraphs`` function of one text source: a ``BUILTIN_TEXT`` name or a path."""
    return BUILTIN_TEXT.get(name) or functools.partial(file_text, name)


def text_mix(rest: str) -> list[tuple[str, float]]:
    """The sources and weights of a text spec's part after ``text:``: ``python`` -> ``[("python", 1.0)]``;
    ``python+english`` (equal shares) or ``python*1+english*2`` (a third and two thirds of the
    training pieces). A path that exists is one source even if its name holds ``+`` or ``*``.

    Example:
        >>> text_mix("python*1+english*2")
        [('python', 1.0), ('english', 2.0)]
    """
    if not rest:
        raise DataError("text data needs a source: text:builtin, text:python, text:english, a mix such as "
                        "text:python*1+english*2, or text:<file or folder>")
    if rest in BUILTIN_TEXT or Path(rest).exists() or "+" not in rest and "*" not in rest:
        return [(rest, 1.0)]
    parts = []
    for part in rest.split("+"):
        match = re.fullmatch(r"\s*([^*]+?)\s*(?:\*\s*([0-9]*\.?[0-9]+)\s*)?", part)
        if not match:
            raise DataError(f"cannot read {part!r} in text:{rest}; write a mix as text:NAME*WEIGHT+NAME*WEIGHT "
                            "(e.g. text:python*1+english*2)")
        name, weight = match.group(1), float(match.group(2) or 1)
        if name not in BUILTIN_TEXT and not Path(name).exists():
            raise DataError(f"unknown text source {name!r} in text:{rest}; use {', '.join(BUILTIN_TEXT)} or an "
                            "existing file or folder")
        if weight <= 0:
            raise DataError(f"text source {name!r} in text:{rest} has weight {weight:g}; weights must be > 0")
        parts.append((name, weight))
    if len({name for name, _ in parts}) < len(parts):
        raise DataError(f"text:{rest} names a source twice; give each source once with its weight")
    return parts


def mix_pieces(pieces: list[list[str]], weights: list[float], seed: int = 0) -> list[str]:
    """Training pieces of several sources in the given shares: the total stays the sum of the
    sources' sizes, and source ``i`` gets ``round(total * weight_i / sum(weights))`` pieces, taken
    from a seeded permutation of its own (repeated when it has fewer).

    Example:
        >>> mixed = mix_pieces([["a"] * 10, ["b"] * 30], [1, 1])
        >>> mixed.count("a"), mixed.count("b")
        (20, 20)
    """
    total = sum(len(p) for p in pieces)
    chosen = []
    for index, (source, weight) in enumerate(zip(pieces, weights)):
        count = round(total * weight / sum(weights))
        if not source or not count:
            continue
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        order = []
        while len(order) < count:
            order += torch.randperm(len(source), generator=generator).tolist()
        chosen += [source[i] for i in order[:count]]
    return chosen


def _text_data(rest: str, model: nn.Module, train: bool, *, batch_size: int, seq_len: int, seed: int,
               shuffle: bool | str, group_by_length: bool = False) -> Batches:
    mix = text_mix(rest)
    sources = [text_source(name) for name, _ in mix]
    if not train:
        # held-out text is judged sentence by sentence (what sentence embeddings are for); a
        # sentence that also occurs in any source's training text is dropped
        # (within its own source: anywhere in the text; across the sources of a mix: as a sentence)
        # (WordNet's entries are lists of sentences: there a sentence is seen when a training entry
        # holds it as a sentence, which is much faster on 100k entries)
        unseen = []
        for (name, _), source in zip(mix, sources):
            if name == "english":
                seen = {t for t in sentences(source("train"), min_words=1, max_words=10**6)}
            else:
                seen = "\n".join(source("train"))
            unseen += [t for t in sentences(source("heldout")) if t not in seen]
        if len(mix) > 1:
            others = {t for source in sources for t in sentences(source("train"), min_words=1, max_words=10**6)}
            unseen = [t for t in dict.fromkeys(unseen) if t not in others]
        return text_batches(model, unseen, batch_size=batch_size, seq_len=seq_len, shuffle=False,
                            drop_last=False, pack=False)
    if len(mix) == 1:
        return text_batches(model, sources[0]("train"), batch_size=batch_size, seq_len=seq_len, shuffle=shuffle,
                            seed=seed, drop_last=True, group_by_length=group_by_length)
    tokenizer = tokenizer_for(model)
    pieces = [pack_sentences(source("train"), tokenizer, seq_len) for source in sources]
    mixed = mix_pieces(pieces, [weight for _, weight in mix], seed)
    return text_batches(model, mixed, batch_size=batch_size, seq_len=seq_len, shuffle=shuffle, seed=seed,
                        drop_last=True, tokenizer=tokenizer, pack=False, group_by_length=group_by_length)


def data_from_spec(spec: str, model: nn.Module, split: str = "train", *, batch_size: int | None = None,
                   seq_len: int = 64, seed: int = 0, fixed_batches: bool = False,
                   group_by_length: bool = False) -> Batches:
    """Build a built-in data source from a spec string (see the module docstring).

    Args:
        spec: ``text:builtin``, ``text:python``, ``text:english``, a text mix (``text:python+english``,
            weighted ``text:python*1+english*2``: shares of the training pieces, see ``text_mix``),
            ``text:PATH``, ``mnist``, ``images:PATH``, ``timm:NAME[:ROOT]`` or ``random``.
        model: the model the data is for (its tokenizer / preprocessing is used).
        split: "train" or "heldout".
        batch_size: samples per batch (default 16 for text, 32 for images, 8 for random).
        seq_len: maximum tokens per text sample.
        seed: shuffling seed.
        fixed_batches: training split: the same batches every epoch, in a new order (``Batches``'s
            ``shuffle="batches"``), instead of new batches from reshuffled samples.
        group_by_length: text training split: batches of pieces of similar length (less padding).

    Example:
        >>> from surgery.models import load_model
        >>> data = data_from_spec("text:builtin", load_model("minilm"), batch_size=4)
        >>> len(data) > 100
        True
    """
    train = split == "train"
    shuffle = ("batches" if fixed_batches else True) if train else False
    kind, _, rest = spec.partition(":")
    if kind == "text":
        return _text_data(rest, model, train, batch_size=batch_size or 16, seq_len=seq_len, seed=seed,
                          shuffle=shuffle, group_by_length=group_by_length and train)
    if kind == "mnist":
        return mnist_batches(model, split, batch_size=batch_size or 32, shuffle=shuffle, seed=seed,
                             drop_last=train)
    if kind == "images":
        return image_folder_batches(model, rest, split, batch_size=batch_size or 32, shuffle=shuffle,
                                    seed=seed, drop_last=train)
    if kind == "timm":
        name, _, root = rest.partition(":")
        return image_folder_batches(model, root or ".", split, batch_size=batch_size or 32, shuffle=shuffle,
                                    seed=seed, drop_last=train, timm_name=name)
    if kind == "random":
        count = int(rest) if rest.isdigit() else 64
        return random_batches(model, batches=count if train else max(2, count // 8),
                              batch_size=batch_size or 8, seq_len=seq_len, seed=seed if train else seed + 1)
    raise DataError(f"unknown data spec {spec!r}; use one of {', '.join(DATA_SPECS)}")
