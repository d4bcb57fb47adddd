"""Check every distillation setting before anything is copied, evaluated or written.

One rule per ``DistillConfig`` field (type, range, choices, whether None is allowed), then the
settings that only make sense together. Each failure is one ``SurgeryError`` line naming the setting,
what it must be and what was given, e.g. ``distill setting lr must be a number > 0 (...), not 0``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from surgery.errors import SurgeryError, close_matches


@dataclass(frozen=True)
class Rule:
    """What one setting accepts.

    Args:
        kind: "int", "number", "bool", "choice" or "text".
        low, high: bounds of numbers (None: unbounded).
        low_open, high_open: the bound itself is excluded.
        optional: None is accepted too.
        choices: the accepted values of a "choice".
        note: what the value means, shown after the requirement (e.g. "0 turns it off").
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple = ()
    note: str = ""

    def requirement(self) -> str:
        """The accepted values in words, e.g. 'a number in [0, 1)'."""
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "text":
            text = "a string"
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                text += (f" in {'(' if self.low_open else '['}{_show(self.low)}, "
                         f"{_show(self.high)}{')' if self.high_open else ']'}")
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_show(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_show(self.high)}"
        if self.optional:
            text += " or None"
        return text + (f" ({self.note})" if self.note else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "text":
            return isinstance(value, str)
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _fraction(note: str = "", high_open: bool = False) -> Rule:
    return Rule("number", 0, 1, high_open=high_open, note=note)


def _weight(note: str = "0 turns it off") -> Rule:
    return Rule("number", 0, note=note)


#: the rule of every ``DistillConfig`` field (tests check that none is missing)
RULES: dict[str, Rule] = {
    "mode": Rule("choice", choices=("blockwise", "e2e")),
    "steps": Rule("int", 0, note="optimizer steps; 0 trains nothing"),
    "lr": Rule("number", 0, low_open=True, note="the peak learning rate, e.g. 1e-3"),
    "weight_decay": Rule("number", 0),
    "warmup": _fraction("the fraction of steps spent warming up"),
    "min_lr": Rule("number", 0, note="the learning rate the cosine decays to, at most lr"),
    "grad_clip": _weight("the gradient norm clip; 0 turns it off"),
    "cosine_weight": _weight(),
    "site_weight": _weight(),
    "task_weight": _weight(),
    "temperature": Rule("number", 0, low_open=True),
    "train": Rule("choice", choices=("replacements", "all")),
    "seed": Rule("int"),
    "batch_size": Rule("int", 1, optional=True, note="samples per batch of spec data"),
    "seq_len": Rule("int", 1, note="tokens per text sample"),
    "group_by_length": Rule("bool", note="text spec data: batches of pieces of similar length (less padding)"),
    "data": Rule("text", optional=True),
    "eval_data": Rule("text", optional=True),
    "eval_batches": Rule("int", 1),
    "checkpoint_every": Rule("int", 1, note="steps between checkpoints"),
    "log_every": Rule("int", 1, note="steps between metrics lines"),
    "max_seconds": Rule("number", 0, low_open=True, optional=True,
                        note="seconds of training, counted from the first step; None: no limit"),
    "labelled": Rule("bool", optional=True, note="None: labels are guessed from (inputs, labels) pairs"),
    "fast": Rule("bool"),
    "init": Rule("choice", choices=("none", "teacher")),
    "init_batches": Rule("int", 1, note="batches the teacher-derived initialisation fits on"),
    "cache": Rule("text", optional=True, note="a directory, or 'run' for run_dir/teacher_cache"),
    "cache_megabytes": Rule("number", 0, low_open=True),
    "other_lr_scale": Rule("number", 0, note="the pretrained weights' learning rate relative to lr"),
    "train_mode": Rule("bool"),
    "mixup": _weight("timm Mixup's alpha; 0 turns it off"),
    "cutmix": _weight("timm CutMix's alpha; 0 turns it off"),
    "mixup_prob": _fraction(),
    "mixup_switch_prob": _fraction(),
    "label_smoothing": _fraction(high_open=True),
    "ema_decay": _fraction("0 turns the EMA off", high_open=True),
    "ema_warmup": Rule("bool"),
    "kl_weight": Rule("number", 0, optional=True, note="None: no combined cross-entropy + KL term"),
    "hoyer_weight": _weight(),
    "freeze": Rule("text", optional=True, note="comma-separated fnmatch patterns of parameter names"),
}


def check_names(names, known) -> None:
    """Refuse setting names that are not ``DistillConfig`` fields, suggesting the closest ones.

    Example:
        >>> check_names(["lrr"], ["lr", "steps"])
        Traceback (most recent call last):
        ...
        surgery.errors.SurgeryError: unknown distill setting 'lrr'. Did you mean 'lr'? (all settings: surgery.distill.DistillConfig)
    """
    unknown = sorted(set(names) - set(known))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown)
        raise SurgeryError(f"unknown distill setting{'s' if len(unknown) > 1 else ''} {shown}."
                           + close_matches(unknown[0], known) + " (all settings: surgery.distill.DistillConfig)")


def check_settings(config: Any) -> None:
    """Every field of ``config`` (a ``DistillConfig``) against its rule, then the combinations.

    Example:
        >>> from surgery.distill import DistillConfig
        >>> check_settings(DistillConfig(steps=-1))
        Traceback (most recent call last):
        ...
        surgery.errors.SurgeryError: distill setting steps must be an integer >= 0 (optimizer steps; 0 trains nothing), not -1
    """
    for field in dataclasses.fields(config):
        rule = RULES.get(field.name)
        value = getattr(config, field.name)
        if rule is not None and not rule.accepts(value):
            infinite = isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and not math.isfinite(float(value))
            raise SurgeryError(f"distill setting {field.name} must be {rule.requirement()}, not {value!r}"
                               + ("; give a finite number" if infinite else ""))
    if config.min_lr > config.lr:
        raise SurgeryError(f"distill setting min_lr ({config.min_lr}) is above lr ({config.lr}); give min_lr <= lr")
    if config.train == "all" and config.mode != "e2e":
        raise SurgeryError("distill setting train='all' needs mode='e2e' (blockwise trains the mixers only)")
    if config.kl_weight is not None and config.mode != "e2e":
        raise SurgeryError("distill setting kl_weight needs mode='e2e' (blockwise trains on the sites' contexts "
                           "only, without a task term)")
    if config.cache and (config.mixup or config.cutmix):
        raise SurgeryError("distill setting cache never hits with mixup/cutmix (every mixed batch is new); "
                           "drop cache or the mixing")
