"""Text sources (Python's documentation, the standard library's docstrings, WordNet's general
English, text files) and their tokenised batches: paragraphs packed into pieces of at most
``seq_len`` tokens. Also the out-of-domain held-out set (``heldout_english``) that ships with the
package and is never trained on."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from surgery.data.batches import Batches
from surgery.errors import DataError


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


#: where Debian's ``wordnet-base`` puts WordNet 3.0's database; ``SURGERY_WORDNET`` overrides it
WORDNET_DIR = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_dir() -> Path:
    """The folder holding WordNet's ``data.noun`` ... ``data.adv`` (``$SURGERY_WORDNET`` or
    ``/usr/share/wordnet``); a one-line ``DataError`` with the install command when they are missing."""
    root = Path(os.environ.get("SURGERY_WORDNET") or WORDNET_DIR)
    missing = [name for name in WORDNET_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(f"text:english needs WordNet's database ({', '.join(missing)} missing in {root}); "
                        "install it with: apt-get install wordnet-base (or set SURGERY_WORDNET to its folder)")
    return root


def wordnet_entry(line: str) -> str | None:
    """One line of a WordNet ``data.*`` file as a short English paragraph: the first word form,
    its definitions, then its quoted example sentences (capitalised, full stop added). None for
    the licence header and for entries without a gloss.

    Example:
        >>> wordnet_entry('00217593 04 n 01 kill 1 002 @ 00217014 n 0000 | the destruction of an enemy '
        ...               'plane or ship; "the pilot reported two kills during the mission"')
        'Kill: the destruction of an enemy plane or ship. The pilot reported two kills during the mission.'
    """
    if line.startswith(" ") or " | " not in line:
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    if len(parts) < 5 or not parts[0].isdigit():
        return None
    word = re.sub(r"\(\w+\)$", "", parts[4]).replace("_", " ")
    definitions, examples = [], []
    for chunk in re.split(r";\s*", gloss.strip()):
        quoted = re.findall(r'"([^"]+)"', chunk)
        if quoted:
            examples += [q.strip() for q in quoted if len(q.split()) >= 2]
        elif chunk.strip():
            definitions.append(chunk.strip())
    if not definitions and not examples:
        return None

    def sentence(text: str) -> str:
        text = text.strip()
        text = text[0].upper() + text[1:]
        return text if text[-1] in ".!?" else text + "."

    head = f"{word[0].upper()}{word[1:]}: " + "; ".join(definitions) if definitions else ""
    body = [sentence(head)] if head else []
    return " ".join(body + [sentence(e) for e in examples])


@functools.lru_cache(maxsize=4)
def _wordnet_entries(root: str) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for name in WORDNET_FILES:
        with open(Path(root) / name, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                entry = wordnet_entry(line)
                if entry:
                    found[entry] = None
    return tuple(found)


def english_text(split: str = "train") -> list[str]:
    """General English from WordNet 3.0 (Debian's ``wordnet-base``: 117.7k glosses and about 48k
    quoted examples), one short paragraph per synset (``wordnet_entry``); every 10th
    synset is the held-out split. Needs ``apt-get install wordnet-base`` (see ``wordnet_dir``).

    Example:
        >>> len(english_text("train")) > 100000  # doctest: +SKIP
        True
    """
    entries = _wordnet_entries(str(wordnet_dir()))
    return [e for i, e in enumerate(entries) if (i % 10 == 9) == (split != "train")]


def heldout_english() -> list[str]:
    """The out-of-domain evaluation set: 200+ general-English sentences (everyday topics, with
    paraphrase pairs for retrieval) written for this project and shipped as package data
    (``surgery/data/heldout_english.txt``). No training source contains them; never train on them.

    Example:
        >>> len(heldout_english()) >= 200
        True
    """
    from importlib.resources import files

    text = files("surgery.data").joinpath("heldout_english.txt").read_text(encoding="utf-8")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


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
        lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
        raise DataError(f"text source {str(path)!r} has too little text for the {split} split: {lines} line(s), "
                        f"{len(paragraphs)} paragraph(s) of 4+ words (blank lines separate paragraphs; every "
                        "10th is held out): give at least 10 paragraphs")
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

        # never trust_remote_code=None: a tokenizer_config with auto_map would ask on stdin and run code
        return AutoTokenizer.from_pretrained(location, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load a tokenizer from {location!r} offline "
                        f"({str(error).splitlines()[0][:100]})") from None


def _encode(tokenizer, texts: Sequence[str], field: str, chunk: int = 2048, **options) -> list:
    """``tokenizer(text, **options)[field]`` for every text, asked for ``chunk`` texts at a time:
    one call per text spent most of a MiniLM run's start in per-call overhead (315k calls, ~60 s)."""
    out: list = []
    for start in range(0, len(texts), chunk):
        out.extend(tokenizer(list(texts[start:start + chunk]), verbose=False, **options)[field])
    return out


def pack_sentences(paragraphs: Sequence[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut each paragraph into pieces of at most ``max_tokens`` tokens (special tokens included),
    ending a piece after a sentence end when one lies in its second half, so training sees natural,
    variable-length text and no text is lost to truncation."""
    budget = max_tokens - 2
    pieces = []
    for paragraph, offsets in zip(paragraphs, _encode(tokenizer, paragraphs, "offset_mapping",
                                                       add_special_tokens=False, return_offsets_mapping=True)):
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
                 pack: bool = True, group_by_length: bool = False) -> Batches:
    """Tokenised text batches ``{"input_ids", "attention_mask"[, "token_type_ids"]}`` for ``model``.

    Args:
        model: the (HuggingFace) model whose tokenizer to use.
        texts: paragraphs or sentences.
        batch_size, seq_len: batch shape (sequences are padded to the longest in their batch).
        shuffle, seed, drop_last: see ``Batches``.
        tokenizer: a tokenizer to use instead of the model's own.
        pack: join consecutive sentences up to ``seq_len`` tokens (False: one text per sample).
        group_by_length: shuffled batches of pieces of similar length (``Batches``'s ``lengths``):
            less padding, so cheaper steps over the same pieces.

    Example:
        >>> from surgery.models import load_model
        >>> model = load_model("minilm")
        >>> batch = next(iter(text_batches(model, builtin_text("heldout"), batch_size=2)))
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'token_type_ids']
    """
    tokenizer = tokenizer or tokenizer_for(model)
    pieces = pack_sentences(texts, tokenizer, seq_len) if pack else list(texts)
    encoded = _encode(tokenizer, pieces, "input_ids", truncation=True, max_length=seq_len)
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
                   description=f"{len(encoded)} text pieces",
                   lengths=[len(row) for row in encoded] if group_by_length else None)
