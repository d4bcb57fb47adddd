"""text:english (WordNet's format, on a small fixture), text mixes, the missing-source error, the
out-of-domain held-out set, and the MiniLM report carrying in-domain and out-of-domain figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from surgery.cli import app
from surgery.data import (
    builtin_text, data_from_spec, english_text, heldout_english, mix_pieces, python_text, sentences, text_mix,
    tokenizer_for, wordnet_dir, wordnet_entry,
)
from surgery.errors import DataError

runner = CliRunner()

# five lines in WordNet 3.0's data.* format: a licence header line (two leading spaces), synsets
# with definitions, quoted examples, a marker "(p)" and underscores in the word form
NOUNS = """\
  1 This software and database is being provided to you, the LICENSEE, by Princeton University
00217593 04 n 01 kill 1 002 @ 00217014 n 0000 + 00355365 v 0101 | the destruction of an enemy plane or ship or tank or missile; "the pilot reported two kills during the mission"  
00217499 04 n 01 disaster 0 001 @ 00217014 n 0000 | an act that has disastrous consequences  
00217773 04 n 02 laying_waste 0 ruin 0 002 @ 00217014 n 0000 | destruction achieved by causing something to be wrecked or ruined  
"""
VERBS = """\
00042173 29 v 01 powder 0 004 @ 00040928 v 0000 01 + 08 00 | apply powder to; "She powdered her nose"; "The King wears a powdered wig"  
00041866 29 v 01 floss 0 002 @ 00035758 v 0000 02 + 02 00 | use dental floss to clean; "floss your teeth after every meal"  
"""
ADJECTIVES = """\
00095873 00 s 02 asleep(p) 0 at_peace(p) 2 001 & 00095280 a 0000 | dead; "he is deceased"; "our dear departed friend"  
00096072 00 s 01 assassinated 0 001 & 00095280 a 0000 | murdered by surprise attack for political reasons  
"""
ADVERBS = """\
00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  
00001837 02 r 01 slowly 0 000 | without speed; "he walked slowly along the empty beach at dawn"  
00001900 02 r 01 gladly 0 000 | in a glad manner; "she gladly accepted the invitation to the party"  
"""


@pytest.fixture()
def wordnet(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "wordnet"
    root.mkdir()
    for name, text in [("data.noun", NOUNS), ("data.verb", VERBS), ("data.adj", ADJECTIVES), ("data.adv", ADVERBS)]:
        (root / name).write_text(text)
    monkeypatch.setenv("SURGERY_WORDNET", str(root))
    return root


def test_wordnet_lines_become_short_english_paragraphs():
    assert wordnet_entry("  1 This software and database is being provided | to you") is None
    assert wordnet_entry(NOUNS.splitlines()[1]) == (
        "Kill: the destruction of an enemy plane or ship or tank or missile. "
        "The pilot reported two kills during the mission.")
    assert wordnet_entry(VERBS.splitlines()[0]) == "Powder: apply powder to. She powdered her nose. " \
                                                   "The King wears a powdered wig."
    # the syntactic marker "(p)" and the underscores of multi-word forms are dropped
    assert wordnet_entry(ADJECTIVES.splitlines()[0]).startswith("Asleep: dead. He is deceased.")
    assert wordnet_entry(ADVERBS.splitlines()[0]).startswith("A cappella: without musical accompaniment.")


def test_english_text_reads_all_four_files_and_holds_out_every_tenth_synset(wordnet):
    train, held = english_text("train"), english_text("heldout")
    assert len(train) == 9 and len(held) == 1  # ten synsets, the header line skipped
    assert held == ["Gladly: in a glad manner. She gladly accepted the invitation to the party."]
    assert not set(train) & set(held)
    assert any(p.startswith("Floss:") for p in train) and any(p.startswith("Slowly:") for p in train)


def test_missing_wordnet_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_WORDNET", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install wordnet-base") as error:
        wordnet_dir()
    assert "\n" not in str(error.value) and "data.noun" in str(error.value)
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        data_from_spec("text:english", torch.nn.Linear(2, 2))
    result = runner.invoke(app, ["recipe", "minilm", "--data", "text:python+english", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "apt-get install wordnet-base" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_mix_syntax_weights_and_errors(tmp_path):
    assert text_mix("python") == [("python", 1.0)]
    assert text_mix("python+english") == [("python", 1.0), ("english", 1.0)]
    assert text_mix("python*1+english*2.5") == [("python", 1.0), ("english", 2.5)]
    plus = tmp_path / "a+b.txt"
    plus.write_text("one two three four\n")
    assert text_mix(str(plus)) == [(str(plus), 1.0)]  # an existing path is one source
    plain = tmp_path / "notes.txt"
    plain.write_text("one two three four\n")
    assert text_mix(f"builtin+{plain}*3") == [("builtin", 1.0), (str(plain), 3.0)]
    for bad, message in [("python+nosuch", "unknown text source 'nosuch'"), ("python*0+english", "weights must be > 0"),
                         ("python*x+english", "cannot read"), ("python+python*2", "names a source twice"),
                         ("", "needs a source")]:
        with pytest.raises(DataError, match=message) as error:
            text_mix(bad)
        assert "\n" not in str(error.value)


def test_mix_pieces_follow_the_weights_deterministically():
    pieces = [[f"a{i}" for i in range(10)], [f"b{i}" for i in range(50)]]
    mixed = mix_pieces(pieces, [1, 2], seed=3)
    assert len(mixed) == 60
    assert sum(p.startswith("a") for p in mixed) == 20 and sum(p.startswith("b") for p in mixed) == 40
    assert set(p for p in mixed if p.startswith("a")) == set(pieces[0])  # the small source repeats whole
    assert mixed == mix_pieces(pieces, [1, 2], seed=3) and mixed != mix_pieces(pieces, [1, 2], seed=4)


def test_a_mixed_spec_builds_batches_of_both_sources(wordnet, tmp_path):
    from surgery.models import load_model

    model = load_model("minilm")
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Note {i} says the kettle is in cupboard {i}. It is blue." for i in range(40)))
    data = data_from_spec(f"text:{notes}*1+english*1", model, "train", batch_size=4, seq_len=32)
    assert len(data) == (36 + 9) // 4
    text = " ".join(tokenizer_for(model).batch_decode([row for b in data for row in b["input_ids"]],
                                                     skip_special_tokens=True))
    assert "kettle" in text and any(word in text for word in ("floss", "powder", "kill", "ruin", "slowly"))
    held = data_from_spec(f"text:{notes}+english", model, "heldout", batch_size=4)
    assert len(held) >= 1


def test_out_of_domain_set_is_large_enough_and_in_no_training_source():
    ood = heldout_english()
    assert len(ood) >= 200 and len(set(ood)) == len(ood)
    assert all(4 <= len(s.split()) <= 40 for s in ood)
    trained = [builtin_text("train"), builtin_text("heldout"), python_text("train")]
    try:
        wordnet_dir()
    except DataError:
        pytest.skip("WordNet (apt-get install wordnet-base) is not installed here; .ci/run installs it")
    trained += [english_text("train"), english_text("heldout")]
    # no OOD sentence occurs in any source, not even as a run of 8 words inside a longer paragraph
    def runs_of_8(text: str) -> set[tuple[str, ...]]:
        words = re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    ood_runs = set().union(*map(runs_of_8, ood))
    assert all(runs_of_8(s) for s in ood if len(s.split()) >= 8)
    shared = [p for source in trained for p in source if not ood_runs.isdisjoint(runs_of_8(p))]
    assert shared == []
    training_sentences = {s.lower() for source in trained for s in sentences(source, 1, 10**6)}
    assert not {s.lower() for s in ood} & training_sentences


def test_minilm_report_has_in_domain_and_out_of_domain_figures(tmp_path):
    from recipes.minilm import MinilmConfig, run_minilm

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i} tells how the river number {i} reaches the sea after a long "
                                f"journey. The water there is cold in winter." for i in range(200)))
    config = MinilmConfig(replacements="conv", data=f"text:{text}", blockwise_steps=1, e2e_steps=0,
                          batch_size=2, seq_len=16, eval_sentences=20, init_batches=1)
    report = run_minilm(config, tmp_path / "run", log=lambda _: None)
    teacher, student = report["rows"]
    assert teacher["embedding_cosine"] == 1.0 and teacher["ood_cosine"] == 1.0 and teacher["ood_top1"] == 100.0
    for key in ("embedding_cosine", "ood_cosine"):
        assert -1 <= student[key] <= 1
    assert 0 <= student["ood_top1"] <= student["ood_top5"] <= 100
    assert {"ood_cosine", "ood_top1", "ood_top5", "embedding_cosine"} <= set(report["columns"])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["rows"][1]["ood_cosine"] == pytest.approx(student["ood_cosine"])
    table = (tmp_path / "run" / "report.md").read_text()
    assert "in-domain cosine" in table and "out-of-domain cosine" in table
    assert any("out of domain" in note for note in report["notes"])
