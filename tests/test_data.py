"""surgery.data: batch forms, built-in sources (pydoc text, MNIST, random), held-out splits, specs."""

import pytest
import torch

from models import build
from surgery.data import (
    Batches, Labelled, builtin_text, data_from_spec, file_text, mnist_batches, pack_sentences, python_text,
    sentences, split_batch, stdlib_docstrings, text_batches,
)
from surgery.errors import DataError


def test_split_batch_forms():
    x = torch.zeros(2, 3)
    assert split_batch(x)[0][0] is x
    args, kwargs, labels = split_batch({"input_ids": x})
    assert args == () and kwargs["input_ids"] is x and labels is None
    args, _, labels = split_batch((x, torch.tensor([1, 0])))
    assert args == (x,) and labels.tolist() == [1, 0]
    # two positional inputs that are not (inputs, labels)
    args, _, labels = split_batch((x, torch.ones(2, 3)))
    assert len(args) == 2 and labels is None
    assert split_batch(Labelled({"a": x}, torch.tensor([1, 1])))[1]["a"] is x
    assert split_batch((x, torch.tensor([1, 0])), labelled=False)[2] is None
    with pytest.raises(DataError):
        split_batch("text")


def test_batches_are_deterministic_per_epoch():
    data = Batches(10, lambda idx: idx, batch_size=3, seed=1)
    first = list(data)
    assert list(data) == first and len(first) == 3
    data.set_epoch(1)
    assert list(data) != first
    assert sorted(i for b in first for i in b) == sorted(set(i for b in first for i in b))
    with pytest.raises(DataError, match="fewer than one batch"):
        Batches(2, lambda idx: idx, batch_size=4)


def test_fixed_batches_repeat_every_epoch_in_a_new_order():
    data = Batches(12, lambda idx: tuple(idx), batch_size=3, shuffle="batches", seed=1)
    epochs = []
    for epoch in range(4):
        data.set_epoch(epoch)
        epochs.append(list(data))
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)          # the same batches
    assert any(e != epochs[0] for e in epochs[1:])                       # in new orders
    assert sorted(i for b in epochs[0] for i in b) == list(range(12))
    assert epochs[0] != [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]  # formed from shuffled samples
    reshuffled = Batches(12, lambda idx: tuple(idx), batch_size=3, seed=1)
    reshuffled.set_epoch(1)
    assert sorted(reshuffled) != sorted(epochs[0])
    with pytest.raises(DataError, match="shuffle must be"):
        Batches(12, lambda idx: idx, batch_size=3, shuffle="samples")


def test_builtin_text_holds_out_whole_topics():
    train, held = builtin_text("train"), builtin_text("heldout")
    assert len(train) > 5 * len(held) > 0
    assert not set(train) & set(held)
    assert all(5 <= len(s.split()) <= 60 for s in sentences(held))
    from surgery.models import load_model

    seen = "\n".join(train)
    evaluation = data_from_spec("text:builtin", load_model("minilm"), "heldout", batch_size=8)
    assert evaluation.size > 150
    assert evaluation.size == sum(1 for s in sentences(held) if s not in seen) <= len(sentences(held))


def test_python_text_adds_stdlib_docstrings_and_keeps_the_held_out_split_unseen():
    import sys

    before = set(sys.modules)
    docstrings = stdlib_docstrings()
    assert set(sys.modules) - before <= {"ast", "sysconfig"}  # read with ast: no stdlib module imported
    assert any("JSON" in p for p in docstrings) and all(">>>" not in p for p in docstrings)
    train, builtin = python_text("train"), builtin_text("train")
    assert train[:len(builtin)] == builtin and len(train) > 3 * len(builtin)
    assert python_text("heldout") == builtin_text("heldout")
    held_words = [p.lower().split() for p in builtin_text("heldout")]
    shingles = {tuple(w[i:i + 8]) for w in held_words for i in range(len(w) - 7)}
    extra = train[len(builtin):]
    assert not any(tuple(w[i:i + 8]) in shingles for p in extra for w in [p.lower().split()] for i in range(len(w) - 7))
    from surgery.models import load_model

    model = load_model("minilm")
    builtin_size = data_from_spec("text:builtin", model, batch_size=8).size
    assert data_from_spec("text:python", model, batch_size=8).size > 3 * builtin_size
    held = data_from_spec("text:python", model, "heldout", batch_size=8)
    assert 150 < held.size <= data_from_spec("text:builtin", model, "heldout", batch_size=8).size


def test_text_file_split_and_missing(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(f"Paragraph number {i} has a few words." for i in range(30)))
    assert len(file_text(path)) == 27 and len(file_text(path, "heldout")) == 3
    with pytest.raises(DataError, match="does not exist"):
        file_text(tmp_path / "missing.txt")


def test_text_batches_use_the_model_tokenizer():
    from surgery.models import load_model

    model = load_model("minilm")
    data = text_batches(model, builtin_text("heldout"), batch_size=4, seq_len=32)
    batch = next(iter(data))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 32
    assert batch["attention_mask"][:, 0].all()
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][torch.arange(4), lengths - 1] == 102).all()  # [SEP] ends each row
    from surgery.data import tokenizer_for

    pieces = pack_sentences(builtin_text("heldout")[:20], tokenizer_for(model), 32)
    # re-tokenising a cut piece may add a token at its edges; text_batches truncates to seq_len anyway
    assert pieces and all(len(tokenizer_for(model)(p)["input_ids"]) <= 34 for p in pieces)
    held = data_from_spec("text:builtin", model, "heldout", batch_size=8)
    assert len(held) > 10
    with pytest.raises(DataError, match="tokenizer"):
        data_from_spec("text:builtin", build("timm_vit")[0])


def test_mnist_batches_fit_an_image_model():
    model, _ = build("timm_vit")
    data = mnist_batches(model, batch_size=8)
    batch = next(iter(data))
    assert isinstance(batch, Labelled) and tuple(batch.inputs.shape) == (8, 3, 32, 32)
    assert batch.labels.dtype == torch.long and 0 <= int(batch.labels.min()) <= int(batch.labels.max()) <= 9
    assert len(data) == 500 and data_from_spec("mnist", model, "heldout").size == 1000
    assert model(batch.inputs).shape == (8, 10)


def test_random_spec_and_unknown_spec():
    model, _ = build("hf_bert")
    batch = next(iter(data_from_spec("random", model, batch_size=2, seq_len=8)))
    assert batch["input_ids"].shape == (2, 8) and int(batch["input_ids"].max()) < 100
    with pytest.raises(DataError, match="unknown data spec"):
        data_from_spec("nope", model)
    with pytest.raises(DataError, match="does not exist"):
        data_from_spec("images:/no/such/folder", build("timm_vit")[0])
