"""Hooks that record, per replaced site, the teacher's block input and the tensor distillation matches.

The matched tensor ("context") is the attention output BEFORE the output projection (FAR):
the input of the original block's ``site.out_proj`` when the site has one inside the block
(timm ``Attention.proj``, ``nn.MultiheadAttention.out_proj``, GPT-2 ``c_proj``), else the block's
(first) output (HF ``BertSelfAttention`` / ``ViTSelfAttention``, whose projection lives outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.swap import ReplacedAttention, replaced_sites


@dataclass
class SiteRecord:
    """What one site saw in one teacher forward: its input, padding mask and target context."""

    hidden: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    target: torch.Tensor | None = None


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def _context_layout(wrapper: ReplacedAttention, tensor: torch.Tensor) -> torch.Tensor:
    """Bring a captured context to [B, N, C] (the mixer's layout)."""
    if wrapper.site.convention == "mha" and not wrapper.site.batch_first and tensor.dim() == 3:
        return tensor.transpose(0, 1)
    if tensor.dim() == 2 and wrapper.site.convention == "mha":  # MHA flattens to [N*B, C] before out_proj
        return None
    return tensor


class TeacherCapture:
    """Records every site's teacher input and target context while the teacher runs.

    Args:
        student: the replaced model.
        teacher: a separate, unreplaced teacher with the same module names, or None to run the
            originals kept inside the student's ``ReplacedAttention`` wrappers.

    Example:
        >>> with TeacherCapture(student) as capture:   # doctest: +SKIP
        ...     output = capture.run(lambda: student(x))
        ...     capture.records["blocks.0.attn"].target.shape
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        self.student = student
        self.teacher = teacher
        self.wrappers = {w.site.name: w for w in replaced_sites(student)}
        if not self.wrappers:
            raise SurgeryError("the student has no replaced attention sites; run replace_attention first")
        self.records: dict[str, SiteRecord] = {}
        self.active = False
        self.handles = []

    def _block(self, name: str, wrapper: ReplacedAttention) -> nn.Module:
        if self.teacher is None:
            if wrapper.original is None:
                raise SurgeryError(f"site {name!r} was finalized, so its original (the teacher) is gone; "
                                   "pass the unreplaced model as teacher")
            return wrapper.original
        try:
            return self.teacher.get_submodule(name)
        except AttributeError:
            raise SurgeryError(f"the teacher has no module {name!r}; it must be the model before "
                               "replace_attention") from None

    def __enter__(self) -> "TeacherCapture":
        for name, wrapper in self.wrappers.items():
            block = self._block(name, wrapper)
            self.handles.append(block.register_forward_pre_hook(self._input_hook(name, wrapper), with_kwargs=True))
            if wrapper.site.out_proj:
                projection = block.get_submodule(wrapper.site.out_proj)
                self.handles.append(projection.register_forward_pre_hook(self._projection_hook(name, wrapper)))
            self.handles.append(block.register_forward_hook(self._output_hook(name, wrapper)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _input_hook(self, name, wrapper):
        def hook(module, args, kwargs):
            if self.active:
                hidden, mask = wrapper.read_inputs(args, kwargs)
                self.records.setdefault(name, SiteRecord()).hidden = hidden.detach()
                self.records[name].mask = mask
        return hook

    def _projection_hook(self, name, wrapper):
        def hook(module, args):
            if self.active:
                context = _context_layout(wrapper, args[0])
                if context is not None:
                    self.records.setdefault(name, SiteRecord()).target = context.detach()
        return hook

    def _output_hook(self, name, wrapper):
        def hook(module, args, output):
            if not self.active:
                return
            record = self.records.setdefault(name, SiteRecord())
            if record.target is None:
                if wrapper.site.out_proj and wrapper.site.convention == "mha":
                    # the fused MHA path never calls out_proj as a module: recover the context
                    # from the output by inverting the projection
                    out = _context_layout(wrapper, _first_tensor(output))
                    projection = wrapper.out_projection
                    record.target = torch.linalg.lstsq(
                        projection.weight, (out - projection.bias).reshape(-1, out.shape[-1]).T
                    ).solution.T.reshape(out.shape[0], out.shape[1], -1).detach()
                elif not wrapper.site.out_proj:
                    record.target = _first_tensor(output).detach()
        return hook

    def run(self, forward):
        """Run ``forward()`` (a teacher forward) with recording on; returns its output."""
        self.records = {}
        use_originals = self.teacher is None
        if use_originals:
            previous = {n: w.use_original for n, w in self.wrappers.items()}
            for w in self.wrappers.values():
                w.use_original = True
        self.active = True
        try:
            with torch.no_grad():
                output = forward()
        finally:
            self.active = False
            if use_originals:
                for n, w in self.wrappers.items():
                    w.use_original = previous[n]
        missing = [n for n in self.wrappers if n not in self.records or self.records[n].target is None
                   or self.records[n].hidden is None]
        if missing:
            raise SurgeryError(f"sites {missing} did not run during the teacher forward; the data does "
                               "not reach them")
        return output


class StudentCapture:
    """Records each mixer's output (the student's context) during a student forward, with grad."""

    def __init__(self, student: nn.Module) -> None:
        self.wrappers = {w.site.name: w for w in replaced_sites(student)}
        self.contexts: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> "StudentCapture":
        for name, wrapper in self.wrappers.items():
            def hook(module, args, output, name=name):
                self.contexts[name] = output
            self.handles.append(wrapper.mixer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
