"""FAR's stage runner on any model and data: replace, distil, fine-tune, optionally prune and recover.

Stages (each a ``surgery.distill`` run directory under ``out_dir``, so each one resumes after an
interruption and a finished stage is reloaded instead of rerun):

1. ``stage1``: only the new modules train (FAR's block-wise objective: per-block MSE of the attention
   output before the output projection, "e2e" on the student's own activations or "blockwise"
   teacher-forced, + ``task_weight`` x cross-entropy on the labels).
2. ``stage2`` (when it has steps): full fine-tuning with cross-entropy.
3. ``prune`` (``surgery.prune`` at ``prune_ratio``, when > 0) and ``recovery`` (full fine-tuning).

The plan (``StagePlan``) holds only steps, learning rates and settings; the recipes supply the model
and data: ``recipes.deit`` (DeiT-T/S/B on an ImageNet-style folder) and ``recipes.mnist``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from surgery.errors import SurgeryError

# run_far with an empty StagePlan.stage1_settings / finetune_settings (the MNIST recipe): none of DeiT's
# regularisers; the DeiT recipe turns them on and reports its own list (deit_deviations)
DEVIATIONS = ("no Mixup/CutMix or label smoothing (StagePlan.finetune_settings does not turn on "
              "surgery.distill's mixup/cutmix/label_smoothing)",
              "no EMA, no drop-path (surgery.distill's ema_decay / train_mode are off)")


@dataclass
class StagePlan:
    """The data-independent part of FAR's pipeline: steps and learning rates of every stage.

    Args:
        replacement: registered replacement name ("mhlstm", "gru", "conv").
        replacement_settings: settings of the replacement's config (e.g. ``{"hidden_per_head": 32}``).
        stage1_steps, stage1_lr, stage1_warmup: stage 1 (new modules only; warm-up as a fraction).
        stage2_steps, stage2_lr: stage 2 (all weights, cross-entropy); 0 steps skips it.
        prune_ratio: 0 = no pruning; else ``surgery.prune`` ratio, followed by recovery.
        recovery_steps, recovery_lr: fine-tuning after pruning.
        mode: "e2e" (FAR's reference) or "blockwise" (teacher-forced) for stage 1.
        site_weight, task_weight: weights of the block-wise MSE and of the cross-entropy.
        weight_decay: AdamW weight decay.
        seed: seed of data order and initialisation.
        eval_batches: batches the engine's fidelity reports read.
        stage1_settings: further ``surgery.distill`` settings of stage 1 (e.g. ``{"mixup": 0.8}``).
        finetune_settings: further ``surgery.distill`` settings of stage 2 and recovery (the full
            fine-tuning stages), e.g. DeiT's ``{"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
            "train_mode": True, "ema_decay": 0.99996}``. Empty (the default): none of them.
    """

    replacement: str = "mhlstm"
    replacement_settings: dict = field(default_factory=dict)
    stage1_steps: int = 100
    stage1_lr: float = 5e-4
    stage1_warmup: float = 0.025
    stage2_steps: int = 0
    stage2_lr: float = 5e-5
    stage2_warmup: float = 0.0
    prune_ratio: float = 0.0
    recovery_steps: int = 0
    recovery_lr: float = 5e-6
    mode: str = "e2e"
    site_weight: float = 1.0
    task_weight: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    eval_batches: int = 8
    stage1_settings: dict = field(default_factory=dict)
    finetune_settings: dict = field(default_factory=dict)


def run_far(build_teacher: Callable[[], nn.Module], example_inputs: Any, train_data: Iterable,
            eval_data: Iterable, plan: StagePlan, out_dir: str | Path, *,
            evaluate: Callable[[nn.Module], dict[str, float]],
            log: Callable[[str], None] = print, progress=None,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run FAR's stages on any model and data; every stage resumes from ``out_dir/<stage>``.

    Args:
        build_teacher: returns a fresh copy of the trained teacher (the base of every stage).
        example_inputs: inputs the model accepts (site location, pruning, FLOPs).
        train_data: re-iterable labelled batches (``surgery.data.Labelled`` or ``(x, y)``).
        eval_data: held-out labelled batches for the engine's fidelity reports.
        plan: steps and learning rates (``StagePlan``).
        out_dir: run directory of this student (``stage1/``, ``stage2/``, ``prune/``, ``recovery/``).
        evaluate: model -> metrics (e.g. ``{"test_accuracy": ...}``) measured after every stage.
        log: one-line progress messages.
        progress: a ``surgery.progress.Progress`` for per-step metrics.
        device: where the stages train ("cpu", "cuda"); models are built and reloaded on the CPU.

    Returns:
        ``{"stages": [{"stage", "steps", "seconds", "params", **evaluate(...)}, ...], "model": student}``.

    Example (``recipes.mnist.run_mnist`` runs it end to end):
        >>> result = run_far(build_teacher, (torch.zeros(1, 1, 28, 28),), train, test,  # doctest: +SKIP
        ...                  StagePlan(stage1_steps=50), "runs/far", evaluate=lambda m: {})
    """
    runner = StageRunner(build_teacher, example_inputs, train_data, eval_data, plan, out_dir, evaluate=evaluate,
                         log=log, progress=progress, device=device)
    student = runner.run()
    return {"stages": runner.stages, "model": student}


class StageRunner:
    """Runs the stages of one ``StagePlan`` (see ``run_far``, which takes the same arguments);
    ``stages`` collects one row per stage: steps, seconds, parameters and ``evaluate``'s metrics."""

    def __init__(self, build_teacher: Callable[[], nn.Module], example_inputs: Any, train_data: Iterable,
                 eval_data: Iterable, plan: StagePlan, out_dir: str | Path, *,
                 evaluate: Callable[[nn.Module], dict[str, float]], log: Callable[[str], None] = print,
                 progress=None, device: str | torch.device = "cpu") -> None:
        self.build_teacher, self.example_inputs, self.plan = build_teacher, example_inputs, plan
        self.train_data, self.eval_data = train_data, eval_data
        self.out_dir, self.evaluate, self.log = Path(out_dir), evaluate, log
        self.progress, self.device = progress, device
        self.stages: list[dict[str, Any]] = []

    def run(self) -> nn.Module:
        """Teacher row, stage 1, stage 2, prune + recovery as the plan asks; returns the student."""
        plan = self.plan
        teacher = self.build_teacher().to(self.device)
        self.record("teacher", teacher, 0.0, 0)
        del teacher
        student = self.distill_stage("stage1", self.build_student(), plan.stage1_steps, plan.stage1_lr,
                                     plan.stage1_warmup, "replacements", plan.site_weight, plan.mode,
                                     plan.stage1_settings)
        if plan.stage2_steps > 0:
            # stage 2 is plain fine-tuning: cross-entropy only, every weight trains
            student = self.distill_stage("stage2", student, plan.stage2_steps, plan.stage2_lr, plan.stage2_warmup,
                                         "all", 0.0, "e2e", plan.finetune_settings)
        if plan.prune_ratio > 0:
            student = self.prune_stage(student).to(self.device)
            if plan.recovery_steps > 0:
                student = self.distill_stage("recovery", student, plan.recovery_steps, plan.recovery_lr, 0.0,
                                             "all", 0.0, "e2e", plan.finetune_settings)
        return student

    def record(self, name: str, model: nn.Module, seconds: float, steps: int, extra: dict | None = None) -> None:
        """One row of the stage table (and its log line): size and ``evaluate``'s metrics."""
        import surgery

        row = {"stage": name, "steps": steps, "seconds": round(seconds, 1),
               "params": surgery.count_parameters(model), **self.evaluate(model), **(extra or {})}
        self.stages.append(row)
        self.log(f"{self.out_dir.name} {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in row.items() if k != "stage"))

    def build_student(self) -> nn.Module:
        import surgery

        from surgery.recipes import claim_settings

        model = self.build_teacher()
        surgery.replace_attention(model, self.plan.replacement, self.example_inputs,
                                  config=self.plan.replacement_settings)
        claim_settings(self.out_dir, self.plan.replacement_settings)
        return model.to(self.device)

    def distill_stage(self, name: str, model: nn.Module, steps: int, lr: float, warmup: float, train: str,
                      site_weight: float, mode: str, settings: dict[str, Any]) -> nn.Module:
        """One ``surgery.distill`` stage in ``out_dir/name``: reloaded when done, resumed when interrupted."""
        plan, path = self.plan, self.out_dir / name
        wanted = {"mode": mode, "steps": steps, "lr": lr, "train": train, "site_weight": site_weight,
                  "task_weight": plan.task_weight, "warmup": warmup, "weight_decay": plan.weight_decay,
                  "seed": plan.seed, **settings}
        check_same_settings(path, wanted)
        if stage_done(path):
            model = load_stage(path, self.build_teacher).to(self.device)
            info = json.loads((path / "fidelity.json").read_text())
            self.log(f"{self.out_dir.name} {name}: already done, reloaded from {path}")
            self.record(name, model, info.get("seconds", 0.0), info.get("steps", steps),
                        {"site_cosine": _mean([s["cosine_after"] for s in info.get("sites", [])])})
            return model
        import surgery

        began = time.perf_counter()
        # without train_mode surgery.distill trains in eval mode; cuDNN refuses an RNN backward in eval
        # mode, and heads pruned to different sizes train in their per-head form: use the native
        # kernels (with train_mode cuDNN would do, but the native kernels are kept alike)
        cudnn_off = name == "recovery" and next(model.parameters()).is_cuda
        with torch.backends.cudnn.flags(enabled=not cudnn_off):
            result = surgery.distill(
                None, model, self.train_data, mode=mode, steps=steps, lr=lr, run_dir=path, resume=True,
                eval_data=self.eval_data, seed=plan.seed, progress=self.progress, warmup=warmup, train=train,
                site_weight=site_weight, task_weight=plan.task_weight, weight_decay=plan.weight_decay,
                eval_batches=plan.eval_batches, labelled=True, **settings)
        self.record(name, model, time.perf_counter() - began, result.steps,
                    {"site_cosine": _mean([s.cosine_after for s in result.sites])})
        return model

    def prune_stage(self, student: nn.Module) -> nn.Module:
        """``surgery.prune`` at the plan's ratio, saved in ``out_dir/prune`` (reloaded when done)."""
        import surgery

        plan, path = self.plan, self.out_dir / "prune"
        if (path / "manifest.json").is_file():
            from surgery.checkpoint import read_manifest

            stored = read_manifest(path).get("extra", {}).get("prune_ratio")
            if stored is not None and not math.isclose(stored, plan.prune_ratio):
                raise SurgeryError(f"{path} was pruned at ratio {stored}, now {plan.prune_ratio}; give a new --out, "
                                   "or delete that directory to redo it")
            student = surgery.load(path, model=self.build_teacher())
            self.log(f"{self.out_dir.name} prune: already done, reloaded from {path}")
            self.record("prune", student, 0.0, 0)
            return student
        began = time.perf_counter()
        inputs = tuple(x.to(next(student.parameters()).device) for x in self.example_inputs)
        surgery.prune(student, inputs, ratio=plan.prune_ratio)
        surgery.save(student, path, extra={"prune_ratio": plan.prune_ratio})
        self.record("prune", student, time.perf_counter() - began, 0)
        return student


def stage_done(path: Path) -> bool:
    """Whether the stage directory holds a finished stage (its model and fidelity report)."""
    return (path / "manifest.json").is_file() and (path / "fidelity.json").is_file()


def load_stage(path: Path, build_base: Callable[[], nn.Module]) -> nn.Module:
    import surgery

    return surgery.load(path, model=build_base())


def check_same_settings(path: Path, wanted: dict[str, Any]) -> None:
    """Refuse to reuse or resume a stage directory that was run with other settings."""
    config = path / "config.json"
    if not config.is_file():
        return
    stored = json.loads(config.read_text())
    changed = [k for k, v in wanted.items() if k in stored and stored[k] != v
               and not (isinstance(v, float) and math.isclose(float(stored[k]), v, rel_tol=1e-9))]
    if changed:
        key = changed[0]
        raise SurgeryError(f"{path} was run with other settings ({key}={stored[key]!r}, now {wanted[key]!r}); "
                           "give a new --out, or delete that stage directory to redo it")


@torch.inference_mode()
def batches_accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy (percent) of ``model`` over labelled batches."""
    from surgery.data import split_batch

    model.eval()
    correct = total = 0
    for batch in data:
        args, kwargs, labels = split_batch(batch, labelled=True)
        logits = model(*args, **kwargs)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(1, total)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None
