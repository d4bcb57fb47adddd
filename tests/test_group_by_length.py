"""Batches grouped by length: the same samples, deterministic and resumable, with far less padding."""

from __future__ import annotations

import torch

from surgery.data import Batches
from surgery.data.batches import GROUP_BATCHES


def _lengths(n: int = 1000) -> list[int]:
    return torch.randint(5, 65, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _padding(batches, lengths) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_every_sample_once_per_epoch_with_less_padding():
    lengths = _lengths()
    plain = Batches(len(lengths), list, 16, drop_last=False, seed=3)
    grouped = Batches(len(lengths), list, 16, drop_last=False, seed=3, lengths=lengths)
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        batches = list(grouped)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(batches) == len(grouped) == 63
    plain_batches, grouped_batches = list(plain), list(grouped)
    assert _padding(plain_batches, lengths) > 0.35 and _padding(grouped_batches, lengths) < 0.05
    # within a batch the lengths are close; across batches they still mix (not longest-first)
    firsts = [lengths[b[0]] for b in grouped_batches[:GROUP_BATCHES]]
    assert firsts != sorted(firsts, reverse=True)


def test_grouped_batches_are_deterministic_per_epoch_and_resumable():
    lengths = _lengths(400)
    a = Batches(400, list, 8, seed=1, lengths=lengths)
    b = Batches(400, list, 8, seed=1, lengths=lengths)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)  # a resumed run at epoch 2 sees the very same batches
    b.set_epoch(3)
    assert list(a) != list(b)
    # fixed batches (teacher cache): the same batches every epoch, in a new order
    fixed = Batches(400, list, 8, seed=1, lengths=lengths, shuffle="batches")
    first = list(fixed)
    fixed.set_epoch(1)
    second = list(fixed)
    assert first != second and sorted(map(tuple, first)) == sorted(map(tuple, second))
    assert _padding(first, lengths) < 0.1


def test_text_batches_group_by_length_on_real_text():
    from surgery.data import builtin_text, text_batches
    from surgery.models import load_model

    model = load_model("minilm")
    texts = builtin_text("train")[:300]
    plain = text_batches(model, texts, batch_size=8, seq_len=64, seed=0)
    grouped = text_batches(model, texts, batch_size=8, seq_len=64, seed=0, group_by_length=True)
    assert len(plain) == len(grouped)

    def pad_share(data) -> float:
        masks = [batch["attention_mask"] for batch in data]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    assert pad_share(grouped) < 0.5 * pad_share(plain)
    real = lambda data: sorted(tuple(row[m.bool()].tolist()) for batch in data  # noqa: E731
                               for row, m in zip(batch["input_ids"], batch["attention_mask"]))
    # the same pieces trained on (drop_last drops a different few: compare the sets they share)
    assert len(set(real(plain)) & set(real(grouped))) > 0.9 * len(set(real(plain)))


def test_spec_data_and_distill_take_group_by_length(tmp_path):
    import json

    import surgery
    from surgery.data import data_from_spec
    from surgery.models import load_model

    model = load_model("minilm")
    train = data_from_spec("text:builtin", model, "train", batch_size=8, group_by_length=True)
    held = data_from_spec("text:builtin", model, "heldout", batch_size=8, group_by_length=True)
    assert train.lengths is not None and held.lengths is None  # held-out text stays in its order
    surgery.replace_attention(model, "conv", {"input_ids": torch.ones(1, 8, dtype=torch.long)})
    result = surgery.distill(None, model, "text:builtin", steps=2, batch_size=4, seq_len=16, group_by_length=True,
                             run_dir=tmp_path / "run", eval_batches=1)
    assert result.steps == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["group_by_length"] is True
