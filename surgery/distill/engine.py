"""``distill``: train replacement modules to reproduce the attention they replaced.

Two modes (both FAR "block-wise" objectives):

- ``"blockwise"`` (teacher-forced, default): one teacher forward per batch records, for every site,
  the original block's input and its context (the attention output BEFORE the out-projection, see
  ``surgery.distill.capture``); each replacement mixer is then fed the teacher's input and trained to
  produce the teacher's context. Sites are independent, so all train in the same pass.
- ``"e2e"`` (FAR's reference training): the student runs on its own activations; loss = sum over
  sites of the context MSE to the teacher + ``task_weight`` x a task term: cross-entropy on labels
  when the data has them, else KL to the teacher's logits at temperature ``temperature`` for
  classifiers, else (encoders) relative MSE of the final hidden states + (1 - cosine) of the
  mean-pooled sentence embeddings. With ``kl_weight`` set, a classifier's task term is
  cross-entropy (labelled data) + ``kl_weight`` x T^2 x KL(T) together (DeiT's soft distillation).

Either mode can add ``hoyer_weight`` x FAR's Hoyer-Square group regulariser over the mixers' prunable
units (``surgery.prune.hoyer_square``), so ``surgery.prune(importance="hoyer", threshold=...)`` can
cut the units it drives to zero.

Site losses are *relative* MSE: squared error over real (non-padding) tokens divided by the mean
squared teacher context of that site, measured once on the first batch (a constant per site, so
sites of different scale weigh alike and the loss stays linear in the data, which keeps multi-process
runs equal to one process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from surgery.data import Batches, data_from_spec, padding_mask_of, split_batch, to_device
import surgery.distill.augment as augment
from surgery.checkpoint import lock_directory
from surgery.distill.cache import TeacherCache, batch_digest
from surgery.distill.capture import SiteRecord, StudentCapture, TeacherCapture
from surgery.distill.fastpath import fast_mixers, site_forward
from surgery.distill.distributed import World, all_mean, average_gradients, barrier, init_from_env, shutdown
from surgery.distill.fidelity import (
    FidelityReport, call_model, evaluate_fidelity, main_output, mean_pool, output_kind,
)
from surgery.distill.rundir import FIDELITY, RunDirectory, settings_that_differ
from surgery.distill.settings import RULES, check_names, check_settings
from surgery.errors import DataError, SurgeryError, TrainingDivergedError
from surgery.progress import NullProgress, Progress
from surgery.swap import replaced_sites

MODES = RULES["mode"].choices  # ("blockwise", "e2e")


@dataclass
class DistillConfig:
    """Every setting of one distillation stage (stored in ``config.json`` and the checkpoint)."""

    mode: str = "blockwise"
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr: float = 0.0
    grad_clip: float = 1.0
    cosine_weight: float = 0.0
    site_weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 2.0
    train: str = "replacements"
    seed: int = 0
    batch_size: int | None = None
    seq_len: int = 64
    group_by_length: bool = False
    data: str | None = None
    eval_data: str | None = None
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10
    max_seconds: float | None = None
    labelled: bool | None = None
    fast: bool = True
    init: str = "none"
    init_batches: int = 4
    cache: str | None = None
    cache_megabytes: float = 256
    other_lr_scale: float = 1.0
    train_mode: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    ema_warmup: bool = False
    kl_weight: float | None = None
    hoyer_weight: float = 0.0
    freeze: str | None = None

    def key(self) -> str:
        """A digest of the settings that change the result (resume refuses a different one)."""
        values = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("checkpoint_every", "log_every", "max_seconds", "eval_batches", "eval_data", "fast",
                               "cache", "cache_megabytes")
                  and not (k in _REGULARISERS and v == _REGULARISERS[k])}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# settings added after run directories existed: left out of the key at their defaults, so a run
# started before they were added still resumes
_REGULARISERS = {f.name: f.default for f in dataclasses.fields(DistillConfig)
                 if f.name in ("train_mode", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
                               "label_smoothing", "ema_decay", "ema_warmup", "kl_weight", "hoyer_weight",
                               "freeze", "group_by_length")}


@dataclass
class SiteResult:
    """One site before and after distillation (teacher-forced, on the evaluation data)."""

    name: str
    relative_mse_before: float
    relative_mse_after: float
    cosine_before: float
    cosine_after: float


@dataclass
class DistillResult:
    """What ``distill`` did.

    Args:
        sites: per-site relative MSE and cosine vs the original attention, before and after.
        fidelity: end-to-end report after training (``FidelityReport``).
        fidelity_before: the same report before training.
        steps: steps done in total (including those before a resume).
        mode: "blockwise" or "e2e".
        run_dir: the run directory, if any.
        resumed_from: the step the run resumed from (0 = fresh).
        stopped_early: True when ``max_seconds`` ended the run before ``steps``.
        seconds: wall time of this call's training loop (from the first step; what ``max_seconds``
            limits), without the final evaluation.
        setup_seconds: wall time before the first step: the data check, the report before training
            and any teacher-derived initialisation.
        final_metrics: the last step's losses.
    """

    sites: list[SiteResult]
    fidelity: FidelityReport
    fidelity_before: FidelityReport
    steps: int
    mode: str
    run_dir: str | None = None
    resumed_from: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    final_metrics: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _LoopState:
    """Where one stage's loop stands: what a checkpoint stores and what the steps share."""

    step: int = 0
    epoch: int = 0          # data position of the last batch used (``_shards``' epoch and count)
    consumed: int = 0
    start_epoch: int = 0    # the epoch the loop started in (the cache's "batches do not repeat" note)
    scales: dict[str, float] | None = None   # per-site mean squared teacher context (first batch)
    hidden_scale: float = 1.0
    before: FidelityReport | None = None
    resumed_from: int = 0
    last_saved: int = 0
    started: float = 0.0    # time.monotonic() at the first training step (max_seconds counts from here)
    setup_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    cache_warned: bool = False


class _SignalGuard:
    """SIGTERM / first Ctrl-C ask the loop to stop after the current step (then checkpoint);
    a second Ctrl-C interrupts at once (the last checkpoint stays intact)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _lr_factor(step: int, config: DistillConfig) -> float:
    """Linear warm-up over ``warmup`` x steps, then cosine decay to ``min_lr``/``lr``."""
    warm = int(config.warmup * config.steps)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    floor = config.min_lr / config.lr if config.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _relative_site_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, cosine_weight: float) -> torch.Tensor:
    if mask is not None:
        keep = mask.bool()
        prediction, target = prediction[keep], target[keep]
    loss = F.mse_loss(prediction.float(), target.float()) / scale
    if cosine_weight:
        cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1, eps=1e-8).mean()
        loss = loss + cosine_weight * (1 - cosine)
    return loss


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the logits softened at temperature T (Hinton et al.; the T^2
    keeps the gradient's scale independent of T), averaged over the batch.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(logit_distillation(logits, logits, 2.0))
        0.0
    """
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def _task_loss(student_out: Any, teacher_out: Any, labels: torch.Tensor | None, kwargs: dict,
               config: DistillConfig, hidden_scale: float) -> torch.Tensor:
    student_main, teacher_main = main_output(student_out), main_output(teacher_out)
    kind = output_kind(teacher_main)
    if kind == "classifier" and config.kl_weight is not None:
        # DeiT / FAR style: the labels and the teacher's soft predictions together
        loss = config.kl_weight * logit_distillation(student_main, teacher_main, config.temperature)
        if labels is not None:
            loss = augment.classification_loss(student_main.float(), labels, config.label_smoothing) + loss
        return loss
    if labels is not None and kind == "classifier":
        return augment.classification_loss(student_main.float(), labels, config.label_smoothing)
    if kind == "classifier":
        return logit_distillation(student_main, teacher_main, config.temperature)
    if kind == "encoder":
        mask = padding_mask_of(kwargs)
        hidden = _relative_site_loss(student_main, teacher_main, mask, hidden_scale, 0.0)
        pooled_s = F.normalize(mean_pool(student_main.float(), mask), dim=-1)
        pooled_t = F.normalize(mean_pool(teacher_main.float(), mask), dim=-1)
        return hidden + (1 - (pooled_s * pooled_t).sum(-1)).mean()
    return F.mse_loss(student_main.float(), teacher_main.float())


#: the cache's name for the teacher's main output (end-to-end mode stores it beside the sites)
TEACHER_OUTPUT = "__teacher_output__"


def _cache_key(mode: str, args: tuple, kwargs: dict) -> str:
    # e2e records differ from block-wise ones (no site inputs, plus the output): never mix them up
    digest = batch_digest(args, kwargs)
    return digest if mode == "blockwise" else f"{mode}-{digest}"


def _cache_records(mode: str, records: dict[str, SiteRecord], teacher_out: Any) -> dict[str, SiteRecord]:
    """What a later epoch needs from the teacher: block-wise, each site's input, mask and target;
    end to end, each site's mask and target (the student feeds its own inputs) and the main output."""
    if mode == "blockwise":
        return records
    kept = {name: SiteRecord(None, r.mask, r.target) for name, r in records.items()}
    kept[TEACHER_OUTPUT] = SiteRecord(None, None, main_output(teacher_out))
    return kept


def _shards(data: Iterable, world: World, start_epoch: int, start_index: int) -> Iterator[tuple[int, int, Any]]:
    """Endless (epoch, consumed-in-epoch, batch) for this rank: batch i of an epoch goes to rank
    i % world; a resume skips the batches the checkpoint already consumed."""
    epoch, skip = start_epoch, start_index
    while True:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        iterator = iter(data)
        if iterator is data and epoch > start_epoch:
            raise DataError("the data ran out: a one-shot iterator cannot be read twice; pass a re-iterable "
                            "(a list, a DataLoader or surgery.data.Batches) or fewer steps")
        usable = (len(data) // world.size) * world.size if hasattr(data, "__len__") else None
        consumed, yielded = 0, False
        for index, batch in enumerate(iterator):
            if usable is not None and index >= usable:
                break
            if index % world.size != world.rank:
                continue
            consumed += 1
            if consumed <= skip:
                continue
            yielded = True
            yield epoch, consumed, batch
        if not yielded and skip == 0:
            raise DataError("the data yielded no batches for this process; give more data than processes")
        epoch, skip = epoch + 1, 0


def _trainable(student: nn.Module, train: str, freeze: str | None = None) -> list[tuple[str, nn.Parameter]]:
    patterns = [p.strip() for p in (freeze or "").split(",") if p.strip()]
    wrappers = list(replaced_sites(student))
    if train == "replacements":
        ids = {id(p) for w in wrappers for p in w.mixer.parameters()}
    else:  # "all" (distill() checked the setting)
        teacher_ids = {id(p) for w in wrappers if w.original is not None for p in w.original.parameters()}
        shared = {id(p) for w in wrappers if w.out_projection is not None for p in w.out_projection.parameters()}
        ids = {id(p) for p in student.parameters()} - (teacher_ids - shared)
    seen, chosen, matched = set(), [], set()
    for name, p in student.named_parameters():
        hits = {pattern for pattern in patterns if fnmatch.fnmatchcase(name, pattern)}
        matched |= hits
        if id(p) in ids and id(p) not in seen and not hits:
            seen.add(id(p))
            chosen.append((name, p))
    unmatched = [pattern for pattern in patterns if pattern not in matched]
    if unmatched:
        raise SurgeryError(f"freeze pattern(s) {unmatched} match no parameter name; use fnmatch patterns over "
                           "model.named_parameters(), e.g. freeze='*.word_embeddings.*'")
    if not chosen:
        raise SurgeryError("nothing left to train: the freeze patterns cover every trainable parameter")
    return chosen


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    data: Iterable | str,
    *,
    mode: str = "blockwise",
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    seed: int = 0,
    eval_data: Iterable | str | None = None,
    device: torch.device | str | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    **settings: Any,
) -> DistillResult:
    """Distill the replacements in ``student`` against the attention they replaced.

    Args:
        teacher: the unreplaced model, or None (normal case after ``replace_attention``) to use the
            originals kept inside the student's ``ReplacedAttention`` wrappers.
        student: the replaced model; trained in place (only the replacement mixers by default).
        data: an iterable of batches (tensor / tuple / dict of model inputs; labelled batches as
            ``surgery.data.Labelled(inputs, labels)`` or ``(inputs, labels)`` 2-tuples with 1-D
            integer labels), or a built-in spec such as ``"text:builtin"`` / ``"mnist"``
            (``surgery.data.data_from_spec``). Re-iterated (with ``set_epoch``) when exhausted.
        mode: "blockwise" (teacher-forced, default) or "e2e" (student runs on its own activations).
        steps: optimizer steps (one batch per step and process); 0 trains nothing (the student is
            evaluated, initialised with ``init="teacher"``, and saved as it is).
        lr: peak AdamW learning rate (linear warm-up, then cosine decay).
        batch_size: batch size for spec-string data.
        run_dir: a directory for config, metrics, checkpoints and the final model (None: no files).
        resume: continue from ``run_dir``'s checkpoint; the result equals an uninterrupted run.
        progress: a ``surgery.progress.Progress`` receiving per-step metrics.
        seed: seed of data order and any randomness.
        eval_data: held-out batches for the fidelity reports (default: the held-out split of a spec,
            else the first ``eval_batches`` batches of ``data``, marked ``held_out=False``).
        device: where to train (default: the student's device).
        batch_transform: ``(images, labels) -> (images, soft labels [B, C])`` applied to every labelled
            image batch before the step (e.g. your own ``timm.data.Mixup``), under numpy / Python /
            torch generators seeded from (seed, step, process) so resume stays exact. It is not part of
            the settings a resume compares: resume with the same one. For timm's Mixup with DeiT's
            defaults use the ``mixup`` / ``cutmix`` settings instead.
        **settings: further ``DistillConfig`` fields: weight_decay, warmup (fraction of steps),
            min_lr, grad_clip, cosine_weight, site_weight, task_weight, temperature,
            train ("replacements" | "all"), seq_len, group_by_length (text spec data in batches of
            pieces of similar length: less padding), eval_batches, checkpoint_every, log_every,
            max_seconds (stop early, after a checkpoint, once this much time has passed since the first
            step: loading, the report before training and the initialisation are not counted),
            labelled, init ("teacher": start the replacements from the originals' value projections
            and a least-squares fit, see ``surgery.distill.init``), init_batches, fast (batched
            multi-head LSTM / GRU recurrence, same results; see ``surgery.distill.fastpath``), cache
            (a directory, or "run" for ``run_dir/teacher_cache``: what the teacher computed for each batch is stored on disk
            in safetensors shards of about cache_megabytes, so later epochs skip the teacher forward;
            block-wise stores each site's input and target, e2e each site's target and the teacher's
            output; same results; not with mixup/cutmix, whose batches never repeat).
            Regularisers (all off by default; see ``surgery.distill.augment``): train_mode (the student
            trains in train mode, so drop-path / dropout act; the teacher always runs in eval mode),
            mixup and cutmix (``timm.data.Mixup`` alphas, with mixup_prob, mixup_switch_prob; needs
            labelled image batches of even size), label_smoothing (cross-entropy, and Mixup's targets),
            ema_decay (keep a ``timm.utils.ModelEmaV3`` of the weights, saved in the checkpoint; the
            final evaluation and saved model use it) and ema_warmup (timm's EMA decay warm-up).
            Extra loss terms (off by default): kl_weight (mode="e2e", classifiers: the task term becomes
            cross-entropy on the labels + kl_weight x T^2 x KL to the teacher's logits at
            ``temperature`` T, DeiT's soft distillation; without labels, kl_weight x T^2 x KL alone;
            None keeps cross-entropy when labelled, else KL) and hoyer_weight (adds
            hoyer_weight x ``surgery.prune.hoyer_square(student)``, FAR's Hoyer-Square group
            regulariser over the mixers' prunable units, FAR uses 5e-5; then prune with
            ``importance="hoyer"``). freeze: comma-separated fnmatch patterns of parameter names
            kept out of training (e.g. ``"*.word_embeddings.*"`` with ``train="all"``: a 30k-row
            embedding matrix costs a dense gradient and an AdamW update every step).

    Returns:
        ``DistillResult`` with per-site before/after numbers and the end-to-end ``fidelity`` report.

    Example:
        >>> import torch, timm, surgery
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> _ = surgery.replace_attention(vit, "conv", torch.randn(1, 3, 32, 32))
        >>> data = [torch.randn(4, 3, 32, 32) for _ in range(4)]
        >>> result = surgery.distill(None, vit, data, steps=20, lr=3e-3)
        >>> result.sites[0].relative_mse_after < result.sites[0].relative_mse_before
        True
    """
    check_names(settings, [f.name for f in dataclasses.fields(DistillConfig)])
    config = DistillConfig(mode=mode, steps=steps, lr=lr, seed=seed, batch_size=batch_size, **settings)
    if isinstance(data, str):
        config.data = data
    if isinstance(eval_data, str):
        config.eval_data = eval_data
    # every check before the student is moved, the teacher copied, data read or a file written
    check_settings(config)
    device = _check_call(teacher, student, data, eval_data, config, run_dir, resume, batch_transform, device)
    world = init_from_env(device)
    try:
        # one writer per run directory: a second process gets one line (only the main process writes)
        with lock_directory(run_dir) if run_dir is not None and world.main else contextlib.nullcontext():
            return _Trainer(teacher, student, data, eval_data, config, device, world, run_dir, resume,
                            progress or NullProgress(), batch_transform).run()
    finally:
        shutdown(world)


def _check_call(teacher, student, data, eval_data, config: DistillConfig, run_dir, resume: bool,
                batch_transform, device) -> torch.device:
    """The checks of ``distill``'s arguments that need the models (read-only); returns the device."""
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module) and (name == "student" or model is not None):
            raise SurgeryError(f"distill's {name} must be a torch nn.Module, not {type(model).__name__}"
                               + ("; pass None to use the originals the student keeps" if name == "teacher" else ""))
    for name, batches in (("data", data), ("eval_data", eval_data)):
        if batches is not None and not isinstance(batches, str) and not hasattr(batches, "__iter__"):
            raise DataError(f"distill's {name} must be an iterable of batches or a spec string such as "
                            f"'text:builtin', not {type(batches).__name__}")
    if resume and run_dir is None:
        raise SurgeryError("resume=True needs run_dir (the directory holding the checkpoint)")
    if config.cache == "run" and run_dir is None:
        raise SurgeryError("distill setting cache='run' needs run_dir; give run_dir or a cache directory")
    if batch_transform is not None:
        if not callable(batch_transform):
            raise SurgeryError(f"batch_transform must be callable (images, labels) -> (images, soft labels), "
                               f"not {type(batch_transform).__name__}")
        if config.mixup or config.cutmix:
            raise SurgeryError("give either batch_transform or the mixup/cutmix settings, not both")
        if config.cache:
            raise SurgeryError("cache never hits with a batch transform (every mixed batch is new); drop cache "
                               "or the transform")
    wrappers = list(replaced_sites(student))
    if not wrappers:
        raise SurgeryError("the student has no replaced attention sites; run surgery.replace_attention first")
    if config.hoyer_weight:
        # the very units surgery.prune ranks (surgery.sparsity sits below both prune and distill)
        from surgery.sparsity import replacement_unit_sets

        if not any(True for _ in replacement_unit_sets(student)):
            names = sorted({w.replacement for w in wrappers})
            raise SurgeryError(f"hoyer_weight needs replacements with prunable units; {names} have no "
                               "pruner (see surgery.list_replacements)")
    _trainable(student, config.train, config.freeze)  # freeze patterns that match nothing, nothing left
    try:
        return torch.device(device) if device is not None else next(student.parameters()).device
    except (RuntimeError, TypeError) as error:
        raise SurgeryError(f"device {device!r} is not a torch device ({str(error).splitlines()[0][:80]}); "
                           "give e.g. 'cpu' or 'cuda'") from None


class _Trainer:
    def __init__(self, teacher, student, data, eval_data, config: DistillConfig, device, world: World,
                 run_dir, resume: bool, progress: Progress, batch_transform=None) -> None:
        self.teacher, self.student, self.config, self.device, self.world = teacher, student, config, device, world
        self.batch_transform, self.classes = batch_transform, None
        self.progress = progress
        self.rundir = None if run_dir is None else RunDirectory(run_dir, writer=world.main)
        self.resume = resume
        torch.manual_seed(config.seed)
        self.data = self._resolve_data(data, "train")
        self.held_out = True
        if eval_data is not None:
            self.eval_data = self._resolve_data(eval_data, "heldout")
        elif isinstance(data, str):
            self.eval_data = self._resolve_data(data, "heldout")
        else:
            self.eval_data, self.held_out = self.data, False
        self.wrappers = {w.site.name: w for w in replaced_sites(student)}
        self.hoyer_square = None
        if config.hoyer_weight:
            # the very function surgery.prune ranks by (distill() checked the units exist)
            from surgery.sparsity import hoyer_square

            self.hoyer_square = hoyer_square

    def _resolve_data(self, data, split: str):
        if isinstance(data, str):
            # a cache is keyed by the batch's content: it hits only if later epochs repeat the batches
            return data_from_spec(data, self.student, split, batch_size=self.config.batch_size,
                                  seq_len=self.config.seq_len, seed=self.config.seed,
                                  fixed_batches=bool(self.config.cache),
                                  group_by_length=self.config.group_by_length)
        return data

    # -------------------------------------------------------------------------------- set-up
    def _check_data(self, batch: Any) -> None:
        """Fail before training, in one line, when the data does not fit the model."""
        args, kwargs, labels = split_batch(batch, self.config.labelled)
        ids = kwargs.get("input_ids")
        vocab = getattr(getattr(self.student, "config", None), "vocab_size", None)
        if isinstance(ids, torch.Tensor) and vocab and int(ids.max()) >= vocab:
            raise DataError(f"token ids reach {int(ids.max())} but {type(self.student).__name__} has a "
                            f"vocabulary of {vocab}; tokenise with the model's own tokenizer")
        try:
            with torch.no_grad():
                output = main_output(self._teacher_forward(args, kwargs))
        except SurgeryError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure here means the data does not fit
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise DataError(f"the data does not fit {type(self.student).__name__}: {first}") from None
        if output_kind(output) == "classifier":
            self.classes = output.shape[-1]
        elif self.config.kl_weight is not None:
            raise DataError(f"kl_weight needs a classifier (logits [B, classes]); {type(self.student).__name__}'s "
                            f"output has shape {tuple(output.shape)}")
        if labels is not None and labels.is_floating_point():
            if output_kind(output) != "classifier" or labels.shape != output.shape:
                raise DataError(f"soft labels of shape {tuple(labels.shape)} do not fit the model's output "
                                f"{tuple(output.shape)}; give one probability row per sample and class")
        elif labels is not None and output_kind(output) == "classifier" and int(labels.max()) >= output.shape[-1]:
            raise DataError(f"labels reach {int(labels.max())} but the model has {output.shape[-1]} "
                            "classes; give labels of this model's classes")
        if self.batch_transform is not None or self.config.mixup or self.config.cutmix:
            augment.check_transformable(args, kwargs, labels, even=self.batch_transform is None)
            if self.classes is None:
                raise DataError("mixup/cutmix needs a classifier (the model's output is not [B, classes])")

    def _teacher_forward(self, args, kwargs):
        if self.teacher is not None:
            return call_model(self.teacher, args, kwargs)
        previous = {n: w.use_original for n, w in self.wrappers.items()}
        for w in self.wrappers.values():
            w.use_original = True
        try:
            # with train_mode the student trains in train mode; as the teacher it runs in eval mode
            with augment.evaluation_mode(self.student) if self.student.training else contextlib.nullcontext():
                return call_model(self.student, args, kwargs)
        finally:
            for n, w in self.wrappers.items():
                w.use_original = previous[n]

    def init_source(self):
        """Training batches for the initial fit (never the held-out ones), in epoch-0 order."""
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(0)
        return self.data

    def _evaluate(self) -> FidelityReport:
        return evaluate_fidelity(self.teacher, self.student, self.eval_data, max_batches=self.config.eval_batches,
                                 labelled=self.config.labelled, device=self.device, held_out=self.held_out,
                                 fast=self.config.fast)

    # -------------------------------------------------------------------------------- main loop
    def run(self) -> DistillResult:
        config, student, world = self.config, self.student, self.world
        student.to(self.device).eval()
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
        # training all weights would move the shared (non-attention) weights under the kept
        # originals too: the teacher must then be a frozen copy taken before any step
        if config.train == "all" and self.teacher is None:
            self.teacher = copy.deepcopy(student)
            for w in replaced_sites(self.teacher):
                w.use_original = True
        named = _trainable(student, config.train, config.freeze)
        params = [p for _, p in named]
        flags = {id(p): p.requires_grad for p in student.parameters()}
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        try:
            return self._loop(named, params)
        finally:
            student.eval()  # train_mode ends (or is interrupted) with the student back in eval mode
            for p in student.parameters():
                p.requires_grad_(flags.get(id(p), True))

    def _loop(self, named, params) -> DistillResult:
        config = self.config
        self.named, self.params = named, params
        self.optimizer, self.scheduler = self._optimizer(params)
        state, checkpoint = self._open_stage()
        setup_began = time.monotonic()
        batches = _shards(self.data, self.world, state.epoch, state.consumed)
        first = self._first_batch(batches) if state.step < config.steps else None
        if state.before is None:
            # a fresh stage only: a resumed one restores the initialised (and trained) weights
            self._prepare(state)
        # the EMA copies the student after any initialisation and before the capture hooks exist
        self.ema = self._build_ema(checkpoint)
        self.mix = self._build_mix(state)
        self.cache = self._build_cache()
        self.capture = TeacherCapture(self.student, self.teacher)
        self.progress.start(config.steps, f"distill ({config.mode})", completed=state.step)
        if state.resumed_from:
            self.progress.message(f"resumed at step {state.resumed_from} from {self.rundir.checkpoint_path}")
        if config.train_mode:
            self.student.train()  # drop-path / dropout act; _teacher_forward keeps the teacher in eval mode
        state.setup_seconds = time.monotonic() - setup_began
        with self.capture, _SignalGuard() as guard:
            # max_seconds counts training alone: loading, the first report and any initialisation are done
            state.started = time.monotonic()
            while state.step < config.steps:
                if first is not None:
                    (epoch, consumed, batch), first = first, None
                else:
                    epoch, consumed, batch = next(batches)
                    batch = to_device(batch, self.device)
                state.epoch, state.consumed = epoch, consumed
                self._train_step(state, batch)
                if self._after_step(state, guard):
                    break
        self.progress.finish()
        return self._finish(state)

    # -------------------------------------------------------------------------------- loop steps
    def _optimizer(self, params):
        """AdamW over the trainable parameters (mixers at lr, the rest at lr x other_lr_scale) and its
        warm-up + cosine schedule."""
        config = self.config
        mixer_ids = {id(p) for w in self.wrappers.values() for p in w.mixer.parameters()}
        groups = [{"params": [p for p in params if id(p) in mixer_ids], "lr": config.lr}]
        others = [p for p in params if id(p) not in mixer_ids]
        if others:
            # with train="all", the pretrained weights usually want a gentler rate than the new mixers
            groups.append({"params": others, "lr": config.lr * config.other_lr_scale})
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
        return optimizer, scheduler

    def _open_stage(self) -> tuple[_LoopState, dict | None]:
        """A fresh loop state (and ``config.json`` written), or the one the run directory's checkpoint holds."""
        config, run = self.config, self.rundir
        self.stage = config.key()
        checkpoint = run.load_checkpoint() if (run is not None and self.resume) else None
        if checkpoint is None:
            if run is not None:
                run.write_config({**dataclasses.asdict(config), "stage": self.stage})
            return _LoopState(), None
        return self._restore(checkpoint), checkpoint

    def _restore(self, checkpoint: dict) -> _LoopState:
        """Weights, optimizer, schedule, random state and data position from a checkpoint of this stage."""
        run = self.rundir
        if checkpoint["stage"] != self.stage:
            # name the settings that differ from config.json, when it belongs to the checkpoint's stage
            recorded = run.read_config() if (run.path / "config.json").is_file() else {}
            names = {f.name for f in dataclasses.fields(DistillConfig)}
            stage_of = lambda values: DistillConfig(**{k: v for k, v in values.items() if k in names}).key()  # noqa: E731
            differ = (settings_that_differ(recorded, dataclasses.asdict(self.config), stage_of)
                      if recorded.get("stage") == checkpoint["stage"] else [])
            what = ", ".join(differ) or f"stage {checkpoint['stage']} vs {self.stage}"
            raise SurgeryError(f"the checkpoint in {run.path} belongs to other settings ({what}); resume with the "
                               "same settings or start without --resume")
        by_name = dict(self.named)
        missing = [k for k in checkpoint["params"] if k not in by_name]
        if missing:
            raise SurgeryError(f"the checkpoint in {run.path} does not fit the model ({missing[:2]})")
        with torch.no_grad():
            for name, value in checkpoint["params"].items():
                by_name[name].copy_(value)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        if "cuda_rng" in checkpoint and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
        before = FidelityReport(**json.loads(checkpoint["before"]))
        before.sites = [_site_from_dict(s) for s in before.sites]
        step = checkpoint["step"]
        run.truncate_metrics(self.stage, step)
        return _LoopState(step=step, epoch=checkpoint["epoch"], consumed=checkpoint["consumed"],
                          start_epoch=checkpoint["epoch"], scales=checkpoint["scales"],
                          hidden_scale=checkpoint["hidden_scale"], before=before, resumed_from=step,
                          last_saved=step)

    def _first_batch(self, batches: Iterator) -> tuple[int, int, Any]:
        """The first (epoch, consumed, batch), checked against the model before anything trains."""
        epoch, consumed, batch = next(batches)
        batch = to_device(batch, self.device)
        self._check_data(batch)
        return epoch, consumed, batch

    def _prepare(self, state: _LoopState) -> None:
        """A fresh stage's work before its first step (not counted in ``max_seconds``), each part
        announced as a progress message: the report on the untrained student, then (``init="teacher"``)
        the teacher-derived initialisation."""
        config = self.config
        self.progress.message(f"before training: fidelity of the untrained student on {config.eval_batches} "
                              "batches" + (f", then initialisation from {config.init_batches} teacher batches"
                                           if config.init == "teacher" else ""))
        state.before = self._evaluate()
        if config.init == "teacher":
            self._initialise()

    def _initialise(self) -> None:
        """``init="teacher"``: start the mixers from the originals (a fresh stage only)."""
        config, run = self.config, self.rundir
        from surgery.distill.init import initialise_from_teacher

        began = time.monotonic()
        # required: init="teacher" was asked for, so a model where no site can start is an error
        chosen = initialise_from_teacher(self.student, self.init_source(), batches=config.init_batches,
                                         labelled=config.labelled, progress=self.progress, required=True)
        self.progress.message(f"initialised {len(chosen)} sites from the attention they replace "
                              f"in {time.monotonic() - began:.0f} s (not counted in max_seconds)")
        if run is not None:
            run.append_metrics({"stage": self.stage, "mode": config.mode, "step": 0, "init": chosen})

    def _build_ema(self, checkpoint: dict | None):
        config = self.config
        ema = augment.build_ema(self.student, config.ema_decay, config.ema_warmup) if config.ema_decay else None
        if ema is not None and checkpoint is not None:
            augment.load_entries(ema.module, checkpoint["ema"])
        return ema

    def _build_mix(self, state: _LoopState):
        """The batch transform: the caller's, or timm's Mixup/CutMix from the settings, or None."""
        config = self.config
        if self.batch_transform is not None:
            return self.batch_transform
        if (config.mixup or config.cutmix) and state.step < config.steps:
            return augment.build_mixup(config.mixup, config.cutmix, config.mixup_prob, config.mixup_switch_prob,
                                       config.label_smoothing, self.classes)
        return None

    def _build_cache(self) -> TeacherCache | None:
        config, run = self.config, self.rundir
        if not config.cache:
            return None
        # distill() refused cache with mixing (no batch would repeat) and cache="run" without run_dir
        directory = run.path / "teacher_cache" if config.cache == "run" else config.cache
        return TeacherCache(Path(directory) / f"rank{self.world.rank}", config.cache_megabytes)

    def _train_step(self, state: _LoopState, batch: Any) -> None:
        """One optimizer step on one batch: teacher targets, losses, checks, backward, update."""
        config = self.config
        args, kwargs, labels = split_batch(batch, config.labelled)
        if self.mix is not None:
            images, labels = augment.transform_batch(self.mix, args[0], labels, seed=config.seed, step=state.step,
                                                     rank=self.world.rank)
            args = (images,)
        teacher_out = self._teacher_targets(state, args, kwargs)
        if state.scales is None:
            state.scales, state.hidden_scale = self._measure_scales(self.capture, teacher_out, kwargs)
        site_losses, task = self._losses(self.capture, teacher_out, args, kwargs, labels, state.scales,
                                         state.hidden_scale)
        loss = config.site_weight * torch.stack(list(site_losses.values())).sum()
        if task is not None:
            loss = loss + config.task_weight * task
        hoyer = None
        if self.hoyer_square is not None:
            # a function of the weights alone: the same on every process, so averaging keeps it
            hoyer = self.hoyer_square(self.student)
            loss = loss + config.hoyer_weight * hoyer
        values = torch.stack([*(l.detach() for l in site_losses.values()),
                              task.detach() if task is not None else torch.zeros(())])
        values = all_mean(values, self.world)
        if not bool(torch.isfinite(values).all()):
            self._diverged(site_losses, values, state.step, state.last_saved)
        self._optimise(loss)
        state.step += 1
        if self.ema is not None:
            self.ema.update(self.student, step=state.step)
        state.metrics = self._step_metrics(site_losses, values, task, hoyer)

    def _teacher_targets(self, state: _LoopState, args: tuple, kwargs: dict) -> Any:
        """Fill ``self.capture.records`` for this batch (from the cache or one teacher forward);
        returns the teacher's output (end to end: its main output)."""
        config, cache, capture = self.config, self.cache, self.capture
        cached, key = None, None
        if cache is not None:
            key = _cache_key(config.mode, args, kwargs)
            cached = cache.get(key, self.device) if state.scales is not None else None
            if cached is None and state.epoch > state.start_epoch and not state.cache_warned \
                    and cache.hits == 0 and cache.misses >= 8:
                state.cache_warned = True
                self.progress.message("teacher cache: batches of this epoch are not in the cache (the data "
                                      "makes new batches every epoch); it only costs time and disk here: use "
                                      "spec data, Batches(shuffle='batches') or fixed batches, or drop cache")
        if cached is not None:
            output = cached.pop(TEACHER_OUTPUT, None)
            capture.records = cached
            return output.target if output is not None else None
        teacher_out = capture.run(lambda: self._teacher_forward(args, kwargs))
        if cache is not None:
            cache.put(key, _cache_records(config.mode, capture.records, teacher_out))
        return teacher_out

    def _optimise(self, loss: torch.Tensor) -> None:
        """Backward, gradient averaging over processes, clipping, optimizer and schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params, self.world)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _step_metrics(self, site_losses, values, task, hoyer) -> dict[str, float]:
        """Per-site losses, the weighted total, task and Hoyer terms and the learning rate, averaged
        over processes."""
        config = self.config
        metrics = {f"site/{n}": float(v) for n, v in zip(site_losses, values)}
        metrics["loss"] = float(values[:-1].sum() * config.site_weight
                                + (values[-1] * config.task_weight if task is not None else 0.0))
        if task is not None:
            metrics["task"] = float(values[-1])
        if hoyer is not None:
            metrics["hoyer"] = float(hoyer.detach())
            metrics["loss"] += config.hoyer_weight * metrics["hoyer"]
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _after_step(self, state: _LoopState, guard: _SignalGuard) -> bool:
        """Report, log, checkpoint; True when ``max_seconds`` ends the loop (a signal raises
        KeyboardInterrupt after the checkpoint)."""
        config, run, step = self.config, self.rundir, state.step
        self.progress.update(step, state.metrics)
        if run is not None and (step % config.log_every == 0 or step == config.steps):
            run.append_metrics({"stage": self.stage, "mode": config.mode, "step": step,
                                "elapsed": round(time.monotonic() - state.started, 3), **state.metrics})
        out_of_time = config.max_seconds is not None and time.monotonic() - state.started > config.max_seconds
        if step % config.checkpoint_every == 0 or step == config.steps or guard.requested or out_of_time:
            self._save(state)
        if guard.requested:
            self.progress.message(f"stopped at step {step}; checkpoint saved in "
                                  f"{run.path if run else '(no run_dir)'}; resume with --resume")
            self.progress.finish()
            raise KeyboardInterrupt
        if out_of_time:
            state.stopped_early = True
            self.progress.message(f"max_seconds reached at step {step}")
        return out_of_time

    def _save(self, state: _LoopState) -> None:
        """Checkpoint everything a resume needs to continue exactly (rank 0 writes)."""
        run = self.rundir
        if run is None:
            return
        names = [n for n, _ in self.named]
        run.save_checkpoint({
            "stage": self.stage, "step": state.step, "epoch": state.epoch, "consumed": state.consumed,
            "params": {n: p.detach().cpu().clone() for n, p in self.named},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "scales": state.scales, "hidden_scale": state.hidden_scale,
            "before": json.dumps(state.before.to_dict()),
            **({"ema": augment.ema_entries(self.ema, names)} if self.ema is not None else {}),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        })
        state.last_saved = state.step

    def _finish(self, state: _LoopState) -> DistillResult:
        """Final evaluation, the result, and (rank 0) the saved model and ``fidelity.json``."""
        config, run, world = self.config, self.rundir, self.world
        if self.cache is not None:
            self.cache.flush()
        self.student.eval()
        if self.ema is not None:
            # the averaged weights are the result: evaluated, saved and left in the student
            augment.load_entries(self.student, augment.ema_entries(self.ema, [n for n, _ in self.named]))
        seconds = time.monotonic() - state.started
        after = self._evaluate()
        before = state.before
        result = DistillResult(
            sites=[SiteResult(b.name, b.relative_mse, a.relative_mse, b.cosine, a.cosine)
                   for b, a in zip(before.sites, after.sites)],
            fidelity=after, fidelity_before=before, steps=state.step, mode=config.mode,
            run_dir=str(run.path) if run else None, resumed_from=state.resumed_from,
            stopped_early=state.stopped_early, seconds=seconds, final_metrics=state.metrics,
            setup_seconds=round(state.setup_seconds, 3))
        if run is not None and world.main:
            from surgery.checkpoint import save as save_model

            save_model(self.student, run.path, extra={"distill": {**dataclasses.asdict(config), "stage": self.stage,
                                                                  "steps_done": state.step}})
            run.write_json(FIDELITY, result.to_dict())
        barrier(world)
        return result

    def _measure_scales(self, capture: TeacherCapture, teacher_out, kwargs) -> tuple[dict[str, float], float]:
        """Mean squared teacher context per site (and of the final hidden states), all processes."""
        values = []
        for name in self.wrappers:
            record = capture.records[name]
            target = record.target if record.mask is None else record.target[record.mask.bool()]
            values.append(target.float().pow(2).mean())
        main = main_output(teacher_out).float()
        mask = padding_mask_of(kwargs)
        if main.dim() == 3 and mask is not None and mask.shape == main.shape[:2]:
            main = main[mask.bool()]
        values.append(main.pow(2).mean())
        values = all_mean(torch.stack(values).detach().cpu(), self.world)
        scales = {name: max(float(v), 1e-12) for name, v in zip(self.wrappers, values[:-1])}
        return scales, max(float(values[-1]), 1e-12)

    def _losses(self, capture, teacher_out, args, kwargs, labels, scales, hidden_scale):
        config = self.config
        site_losses: dict[str, torch.Tensor] = {}
        if config.mode == "blockwise":
            names = list(self.wrappers)
            records = [capture.records[n] for n in names]
            predictions = site_forward([self.wrappers[n].mixer for n in names], [r.hidden for r in records],
                                       [r.mask for r in records], enabled=config.fast)
            for name, record, prediction in zip(names, records, predictions):
                site_losses[name] = _relative_site_loss(prediction, record.target, record.mask, scales[name],
                                                        config.cosine_weight)
            return site_losses, None
        with StudentCapture(self.student) as student_capture, fast_mixers(self.student, config.fast):
            student_out = call_model(self.student, args, kwargs)
        for name in self.wrappers:
            record = capture.records[name]
            site_losses[name] = _relative_site_loss(student_capture.contexts[name], record.target, record.mask,
                                                    scales[name], config.cosine_weight)
        task = _task_loss(student_out, teacher_out, labels, kwargs, config, hidden_scale)
        return site_losses, task

    def _diverged(self, site_losses, values, step, last_saved) -> None:
        names = list(site_losses)
        bad = next((names[i] for i in range(len(names)) if not math.isfinite(float(values[i]))), "the task term")
        where = (f"the last good checkpoint (step {last_saved}) in {self.rundir.path} is kept"
                 if self.rundir is not None and last_saved else "no checkpoint was written")
        raise TrainingDivergedError(f"the loss of site {bad!r} became {float(values[names.index(bad)]) if bad in names else float(values[-1])} "
                                    f"at step {step + 1}; {where}; lower the learning rate or check the data")


def _site_from_dict(values):
    from surgery.distill.fidelity import SiteFidelity

    return values if isinstance(values, SiteFidelity) else SiteFidelity(**values)
