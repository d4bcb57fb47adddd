"""Data specs: the strings the CLI's ``--data`` and the recipes take (``text:python``, ``mnist``, ...)
turned into ``Batches``."""

from __future__ import annotations

import functools

from torch import nn

from surgery.data.batches import Batches, random_batches
from surgery.data.images import image_folder_batches, mnist_batches
from surgery.data.text import builtin_text, file_text, python_text, sentences, text_batches
from surgery.errors import DataError


#: the text sources that ship with Python (``text:NAME``)
BUILTIN_TEXT = {"builtin": builtin_text, "python": python_text}
DATA_SPECS = ("text:builtin", "text:python", "text:PATH", "mnist", "images:PATH", "timm:NAME[:ROOT]", "random")


def data_from_spec(spec: str, model: nn.Module, split: str = "train", *, batch_size: int | None = None,
                   seq_len: int = 64, seed: int = 0, fixed_batches: bool = False) -> Batches:
    """Build a built-in data source from a spec string (see the module docstring).

    Args:
        spec: ``text:builtin``, ``text:python``, ``text:PATH``, ``mnist``, ``images:PATH``, ``timm:NAME[:ROOT]`` or ``random``.
        model: the model the data is for (its tokenizer / preprocessing is used).
        split: "train" or "heldout".
        batch_size: samples per batch (default 16 for text, 32 for images, 8 for random).
        seq_len: maximum tokens per text sample.
        seed: shuffling seed.
        fixed_batches: training split: the same batches every epoch, in a new order (``Batches``'s
            ``shuffle="batches"``), instead of new batches from reshuffled samples.

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
        if not rest:
            raise DataError("text data needs a source: text:builtin, text:python or text:<file or folder>")
        source = BUILTIN_TEXT.get(rest, functools.partial(file_text, rest))
        texts = source(split)
        if not train:
            # held-out text is judged sentence by sentence (what sentence embeddings are for); a
            # sentence that also occurs in the training text is dropped
            seen = "\n".join(source("train"))
            unseen = [t for t in sentences(texts) if t not in seen]
            return text_batches(model, unseen, batch_size=batch_size or 16, seq_len=seq_len,
                                shuffle=False, drop_last=False, pack=False)
        return text_batches(model, texts, batch_size=batch_size or 16, seq_len=seq_len, shuffle=shuffle,
                            seed=seed, drop_last=True)
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
