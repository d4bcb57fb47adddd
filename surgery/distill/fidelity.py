"""Fidelity of a replaced model to its teacher: per site (teacher-forced) and end to end."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.data import padding_mask_of, split_batch, to_device
from surgery.distill.capture import TeacherCapture
from surgery.distill.fastpath import fast_mixers, site_forward
from surgery.errors import DataError


@dataclass
class SiteFidelity:
    """How well one replacement reproduces its original's context on the teacher's own inputs.

    ``relative_mse`` = sum of squared errors / sum of squared targets over real tokens (0 = exact,
    1 = as bad as predicting zeros); ``cosine`` = mean per-token cosine similarity.
    """

    name: str
    relative_mse: float
    cosine: float


@dataclass
class FidelityReport:
    """Per-site and end-to-end agreement between a replaced model and its teacher.

    Args:
        sites: per-site fidelity with teacher-forced inputs.
        kind: "classifier" (2-D logits), "encoder" (token hidden states) or "other".
        top1_agreement: classifiers: share of samples where student and teacher pick the same class.
        kl: classifiers: mean KL(teacher || student) of the softmax outputs (nats).
        embedding_cosine: encoders: mean cosine of mean-pooled, L2-normalised embeddings.
        hidden_cosine: encoders: mean per-token cosine of the final hidden states.
        student_accuracy, teacher_accuracy: when the data has labels.
        samples: number of samples evaluated.
        held_out: whether the data was held out from training.
    """

    sites: list[SiteFidelity]
    kind: str
    samples: int
    top1_agreement: float | None = None
    kl: float | None = None
    embedding_cosine: float | None = None
    hidden_cosine: float | None = None
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    held_out: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """The end-to-end numbers that are set, plus mean per-site values."""
        values = {k: v for k, v in (("top1_agreement", self.top1_agreement), ("kl", self.kl),
                                    ("embedding_cosine", self.embedding_cosine),
                                    ("hidden_cosine", self.hidden_cosine),
                                    ("student_accuracy", self.student_accuracy),
                                    ("teacher_accuracy", self.teacher_accuracy)) if v is not None}
        if self.sites:
            values["mean_site_relative_mse"] = sum(s.relative_mse for s in self.sites) / len(self.sites)
            values["mean_site_cosine"] = sum(s.cosine for s in self.sites) / len(self.sites)
        return values


def main_output(output: Any) -> torch.Tensor:
    """The main tensor of a model output: logits, last hidden state, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    return output[0]


def output_kind(output: torch.Tensor) -> str:
    if output.dim() == 2:
        return "classifier"
    if output.dim() == 3:
        return "encoder"
    return "other"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers pooling) of [B, N, D] -> [B, D]."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def call_model(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def site_errors(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
    """(sum of squared errors, sum of squared targets, sum of token cosines, tokens) over real tokens."""
    prediction, target = prediction.float(), target.float()
    if mask is not None:
        keep = mask.bool()
        prediction, target = prediction[keep], target[keep]
    else:
        prediction, target = prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1, target.shape[-1])
    error = (prediction - target).pow(2).sum()
    norm = target.pow(2).sum()
    cosine = F.cosine_similarity(prediction, target, dim=-1, eps=1e-8).sum()
    return error, norm, cosine, prediction.shape[0]


def evaluate_fidelity(teacher: nn.Module | None, student: nn.Module, data: Iterable, *,
                      max_batches: int | None = None, labelled: bool | None = None,
                      device: torch.device | str | None = None, held_out: bool = True,
                      fast: bool = True) -> FidelityReport:
    """Measure how faithfully ``student`` (a replaced model) reproduces its teacher on ``data``.

    Per site, each replacement gets the teacher's input to that site and is compared with the
    original's context (output before the out-projection); end to end, the student runs on its own
    activations and its output is compared with the teacher's.

    Args:
        teacher: the unreplaced model, or None to use the originals kept in the student's wrappers.
        student: the replaced model.
        data: an iterable of batches (see ``surgery.data``).
        max_batches: stop after this many batches.
        labelled: how to read 2-tuples (see ``surgery.data.split_batch``).
        device: where to run (default: the student's device).
        held_out: recorded in the report (whether ``data`` was kept out of training).
        fast: compute multi-head LSTM mixers with the batched recurrence (same results, faster).

    Example:
        >>> import torch, timm, surgery
        >>> from surgery.distill import evaluate_fidelity
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> _ = surgery.replace_attention(vit, "conv", torch.randn(1, 3, 32, 32))
        >>> report = evaluate_fidelity(None, vit.eval(), [torch.randn(2, 3, 32, 32)])
        >>> report.kind, len(report.sites)
        ('classifier', 2)
    """
    device = device or next(student.parameters()).device
    capture = TeacherCapture(student, teacher)
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0, 0] for name in capture.wrappers}
    totals = {"samples": 0, "agree": 0, "kl": 0.0, "emb": 0.0, "hid": 0.0, "tokens": 0,
              "s_correct": 0, "t_correct": 0, "labelled": 0}
    kind = None
    modes = [m.training for m in (student, teacher) if m is not None]
    student.eval()
    if teacher is not None:
        teacher.eval()
    try:
        with capture, torch.no_grad():
            for index, batch in enumerate(data):
                if max_batches is not None and index >= max_batches:
                    break
                args, kwargs, labels = split_batch(to_device(batch, device), labelled)
                teacher_model = student if teacher is None else teacher
                teacher_out = main_output(capture.run(lambda: call_model(teacher_model, args, kwargs)))
                names = list(capture.wrappers)
                records = [capture.records[n] for n in names]
                predictions = site_forward([capture.wrappers[n].mixer for n in names], [r.hidden for r in records],
                                           [r.mask for r in records], enabled=fast)
                for name, record, prediction in zip(names, records, predictions):
                    error, norm, cosine, count = site_errors(prediction, record.target, record.mask)
                    entry = sums[name]
                    entry[0] += float(error)
                    entry[1] += float(norm)
                    entry[2] += float(cosine)
                    entry[3] += count
                with fast_mixers(student, fast):
                    student_out = main_output(call_model(student, args, kwargs))
                kind = kind or output_kind(teacher_out)
                size = teacher_out.shape[0]
                totals["samples"] += size
                if kind == "classifier":
                    totals["agree"] += int((teacher_out.argmax(-1) == student_out.argmax(-1)).sum())
                    totals["kl"] += float(F.kl_div(F.log_softmax(student_out.float(), -1),
                                                   F.log_softmax(teacher_out.float(), -1),
                                                   log_target=True, reduction="sum"))
                    if labels is not None:
                        if labels.is_floating_point():
                            labels = labels.argmax(-1)  # soft labels [B, C]: accuracy against the top class
                        totals["labelled"] += size
                        totals["s_correct"] += int((student_out.argmax(-1) == labels).sum())
                        totals["t_correct"] += int((teacher_out.argmax(-1) == labels).sum())
                elif kind == "encoder":
                    mask = padding_mask_of(kwargs)
                    pooled_t = F.normalize(mean_pool(teacher_out.float(), mask), dim=-1)
                    pooled_s = F.normalize(mean_pool(student_out.float(), mask), dim=-1)
                    totals["emb"] += float((pooled_t * pooled_s).sum())
                    _, _, cosine, count = site_errors(student_out, teacher_out, mask)
                    totals["hid"] += float(cosine)
                    totals["tokens"] += count
    finally:
        for model, mode in zip((m for m in (student, teacher) if m is not None), modes):
            model.train(mode)
    if totals["samples"] == 0:
        raise DataError("the evaluation data yielded no batches")
    sites = [SiteFidelity(name, s[0] / max(s[1], 1e-30), s[2] / max(s[3], 1)) for name, s in sums.items()]
    n = totals["samples"]
    report = FidelityReport(sites=sites, kind=kind or "other", samples=n, held_out=held_out)
    if kind == "classifier":
        report.top1_agreement = totals["agree"] / n
        report.kl = totals["kl"] / n
        if totals["labelled"]:
            report.student_accuracy = totals["s_correct"] / totals["labelled"]
            report.teacher_accuracy = totals["t_correct"] / totals["labelled"]
    elif kind == "encoder":
        report.embedding_cosine = totals["emb"] / n
        report.hidden_cosine = totals["hid"] / max(totals["tokens"], 1)
    for value in (report.kl, report.embedding_cosine):
        if value is not None and not math.isfinite(value):
            report.extra["warning"] = "non-finite values: the student diverged"
    return report
