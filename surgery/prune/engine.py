"""Global structural pruning: torch-pruning tracks dependencies, replacement pruners own their units.

Stages (all checks before the first change, as everywhere in surgery):
  1. check the request (ratio, criterion, scope, floors) and every replaced site's pruner;
  2. build torch-pruning's ``DependencyGraph`` with each replacement as one customized layer;
  3. collect bundles: per-head recurrent units, conv channels, MLP hidden-channel groups;
  4. score them with one criterion, normalise per kind, rank globally, apply per-bundle floors;
  5. snapshot the modules to change, cut the tensors, check a forward pass (undo on any failure);
  6. optionally recover by distillation.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import PruningError, SurgeryError
from surgery.inputs import as_args_kwargs, default_example_inputs
from surgery.sparsity import replacement_unit_sets
from surgery.units import Bundle, OpaqueMixerPruner, ReplacementPruner
from surgery.prune.importance import IMPORTANCES, torch_pruning_importance
from surgery.registry import get_replacement
from surgery.swap import ReplacedAttention, count_parameters, replaced_sites, use_original_attention

SCOPES = ("all", "replacements", "mlp")


@dataclass(frozen=True)
class BundleResult:
    """Units of one bundle (a head, a conv mixer, an MLP layer) before and after pruning."""

    name: str
    kind: str
    before: int
    after: int


@dataclass
class PruneReport:
    """What ``prune`` did: the request, parameter and FLOP counts before/after, kept units per bundle."""

    ratio: float | None
    threshold: float | None
    importance: str
    scope: str
    global_ranking: bool
    params_before: int
    params_after: int
    flops_before: int | None = None
    flops_after: int | None = None
    bundles: list[BundleResult] = field(default_factory=list)
    skipped_sites: list[str] = field(default_factory=list)
    output_cosine: float | None = None
    output_cosine_recovered: float | None = None
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    recovery: Any = None

    COLUMNS = ("bundle", "kind", "units before", "units after", "kept")

    def kept_units(self) -> dict[str, int]:
        """Units kept per bundle, e.g. {"blocks.0.attn.mixer.heads.1": 41, "blocks.0.mlp.fc1": 512}."""
        return {b.name: b.after for b in self.bundles}

    def rows(self) -> list[list[str]]:
        return [[b.name, b.kind, str(b.before), str(b.after), f"{b.after / max(b.before, 1):.2f}"]
                for b in self.bundles]

    def summary(self) -> dict[str, Any]:
        out = {"params_before": self.params_before, "params_after": self.params_after,
               "params_ratio": self.params_after / max(self.params_before, 1)}
        if self.flops_before and self.flops_after is not None:
            out.update(flops_before=self.flops_before, flops_after=self.flops_after,
                       flops_ratio=self.flops_after / self.flops_before)
        if self.latency_before_ms and self.latency_after_ms is not None:
            out.update(latency_before_ms=self.latency_before_ms, latency_after_ms=self.latency_after_ms)
        out.update(output_cosine=self.output_cosine, output_cosine_recovered=self.output_cosine_recovered)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recovery"] = None if self.recovery is None else str(self.recovery)
        data.update(self.summary())
        return data


# ------------------------------------------------------------------------------------ checking

def _check_request(ratio, threshold, importance, scope, head_floor, global_) -> float | None:
    if importance not in IMPORTANCES:
        raise PruningError(f"importance must be one of {IMPORTANCES}, not {importance!r}")
    if scope not in SCOPES:
        raise PruningError(f"scope must be one of {SCOPES}, not {scope!r}")
    if threshold is not None:
        if ratio is not None:
            raise PruningError("give either ratio or threshold, not both")
        if importance != "hoyer" or not global_:
            raise PruningError("threshold works with importance='hoyer' and global ranking (FAR's rule)")
        if not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise PruningError(f"threshold must be a number >= 0, not {threshold!r}")
        return None
    ratio = 0.4 if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PruningError(f"ratio must be a number in [0, 1) (the fraction of prunable units to "
                           f"remove), not {ratio!r}")
    if isinstance(head_floor, bool) or not isinstance(head_floor, (int, float)) or head_floor <= 0 \
            or (isinstance(head_floor, float) and head_floor >= 1):
        raise PruningError(f"head_floor must be a fraction in (0, 1) or a unit count >= 1, not "
                           f"{head_floor!r}: a head or layer with no units left would collapse")
    return float(ratio)


def _floor(size: int, head_floor: float | int) -> int:
    if isinstance(head_floor, int):
        return min(size, head_floor)
    return min(size, max(1, math.ceil(head_floor * size)))


def _site_pruners(model: nn.Module, skip_unprunable: bool) -> tuple[list, list[str]]:
    """(wrapper, pruner or None) per replaced site; refuses a site without a pruner unless skipping."""
    sites, unprunable = [], []
    for wrapper in replaced_sites(model):
        spec = get_replacement(wrapper.replacement)
        if spec.pruner is None:
            unprunable.append(f"{wrapper.site.name} ({wrapper.replacement})")
            sites.append((wrapper, None))
        else:
            pruner = spec.make_pruner()
            if not isinstance(pruner, ReplacementPruner):
                raise PruningError(f"the pruner of {wrapper.replacement!r} must subclass "
                                   "surgery.units.ReplacementPruner")
            sites.append((wrapper, pruner))
    if unprunable and not skip_unprunable:
        raise PruningError(f"site(s) {', '.join(unprunable)} have no registered pruner; register one "
                           "(register_replacement(..., pruner=...)) or pass skip_unprunable=True "
                           "(CLI: --skip-unprunable)")
    return sites, unprunable


# ------------------------------------------------------------------------------ dependency graph

@contextlib.contextmanager
def _traced_as_one_layer(site_pruners: list) -> Iterator[None]:
    """While torch-pruning traces, each replacement computes one opaque in -> out map.

    torch-pruning follows autograd nodes; inside a recurrent mixer it meets LSTM/GRU nodes and
    packed sequences it mis-handles (upstream issues #44, #276, #404). A linear map of the same
    shapes gives the graph exactly the dependencies the mixer has toward the rest of the model
    (input_dim in, output_dim out); the mixer's pruner owns everything inside.
    """
    mixers = [w.mixer for w, _ in site_pruners]
    own = {id(m): m.__dict__["forward"] for m in mixers if "forward" in m.__dict__}  # an instance override
    for wrapper, pruner in site_pruners:
        mixer = wrapper.mixer
        reference = next(mixer.parameters(), torch.zeros(()))
        # the width the pruner reports (pruned heads may have shrunk it below shape.output_dim)
        width = (pruner or OpaqueMixerPruner()).get_out_channels(mixer)
        weight = torch.zeros(width, mixer.shape.input_dim, requires_grad=True,
                             device=reference.device, dtype=reference.dtype)
        mixer.forward = (lambda w: lambda x, padding_mask=None: F.linear(x, w))(weight)
    try:
        yield
    finally:
        for mixer in mixers:
            mixer.__dict__.pop("forward", None)
            if id(mixer) in own:
                mixer.forward = own[id(mixer)]


def _call(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = as_args_kwargs(example_inputs)
    return model(*args, **kwargs)


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
        return output.last_hidden_state
    if isinstance(output, dict):
        output = list(output.values())
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    for item in output:
        if isinstance(item, torch.Tensor):
            return item
    raise PruningError(f"cannot find a tensor in the model's output ({type(output).__name__})")


def build_graph(model: nn.Module, example_inputs: Any, site_pruners: list,
                ignored_layers: Iterable[nn.Module] = ()):
    """torch-pruning's ``DependencyGraph`` of ``model`` with every replacement as one customized layer.

    Returns the graph; raises PruningError if some replacement is not in it (it would be silently
    left unpruned) or if torch-pruning cannot trace the model.
    """
    import torch_pruning as tp

    customized = {}
    for wrapper, pruner in site_pruners:
        customized.setdefault(type(wrapper.mixer), pruner or OpaqueMixerPruner())
    ignored = list(ignored_layers)
    for wrapper, _ in site_pruners:
        if wrapper.original is not None:  # the teacher is not pruned (its out-projection is shared)
            ignored += list(wrapper.original.modules())
    flags = [(m, m.training) for m in model.modules()]
    args, kwargs = as_args_kwargs(example_inputs)
    try:
        with _traced_as_one_layer(site_pruners), torch.enable_grad(), _quiet_warnings():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=(args, kwargs),
                forward_fn=lambda m, inputs: m(*inputs[0], **inputs[1]),
                output_transform=_main_tensor,
                customized_pruners=customized, ignored_layers=ignored, verbose=False)
    except SurgeryError:
        raise
    except Exception as error:  # torch-pruning's tracer raises many types
        raise PruningError(f"torch-pruning cannot trace {type(model).__name__}: "
                           f"{type(error).__name__}: {error}".splitlines()[0]) from error
    finally:
        for module, training in flags:
            module.training = training
    missing = [w.site.name for w, _ in site_pruners if w.mixer not in graph.module2node]
    if missing:
        raise PruningError(f"torch-pruning's graph does not reach the replacement(s) at {missing}; "
                           "they would stay unpruned: are they used by the forward pass?")
    return graph


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about cls/pos tokens it leaves alone
        yield


def _mlp_groups(model: nn.Module, graph, ignored: list[nn.Module], site_pruners: list) -> list:
    """torch-pruning groups of hidden channels between two layers (MLP fc1 -> act -> fc2 and alike).

    Accepted: one producer (the root Linear/Conv), at least one consumer, no path to the model's
    output (classifier heads), no module of a replaced site, and channel counts that match on
    both ends (which rules out fused qkv projections of attention blocks left unreplaced).
    Residual-stream groups (many producers: embeddings, norms, every block's output) are left out.
    """
    from torch_pruning import ops

    inside_sites = set()
    for wrapper, _ in site_pruners:
        inside_sites |= set(wrapper.modules())
    ignored_set = set(ignored)
    accepted = []
    for group in graph.get_all_groups(ignored_layers=list(ignored),
                                      root_module_types=[nn.Linear, nn.Conv1d, nn.Conv2d]):
        root = group[0].dep.target.module
        producers, consumers, ok = [], [], True
        for item in group:
            module = item.dep.target.module
            if isinstance(module, ops._OutputOp) or isinstance(module, (ops._ConcatOp, ops._SplitOp,
                                                                        ops._UnbindOp, ops._SliceOp)):
                ok = False
                break
            if not isinstance(module, nn.Module) or not list(module.parameters(recurse=False)):
                continue  # torch-pruning's stand-ins for elementwise ops, reshapes, activations
            if module in inside_sites or module in ignored_set:
                ok = False
                break
            (producers if graph.is_out_channel_pruning_fn(item.dep.handler) else consumers).append(module)
        if not ok or producers != [root] or not consumers:
            continue
        width = graph.get_out_channels(root)
        if any(graph.get_in_channels(c) != width for c in consumers):
            continue
        accepted.append(group)
    return accepted


# ---------------------------------------------------------------------------------------- bundles

#: (owner module, unit set) of every prunable replacement unit: defined below prune and distill
replacement_bundles_sets = replacement_unit_sets


def _graph_bundle(graph, group, name: str) -> Bundle:
    root = group[0].dep.target.module
    pruner = graph.get_pruner_of_module(root)
    size = graph.get_out_channels(root)
    modules = [item.dep.target.module for item in group
               if isinstance(item.dep.target.module, nn.Module)]

    def score(criterion: str) -> list[torch.Tensor]:
        values = torch_pruning_importance(criterion)(group)
        if values is None:
            raise PruningError(f"torch-pruning cannot score the group of {name}")
        values = values.float()
        return [values.sqrt() if criterion == "hoyer" else values]

    def apply(removed: list[list[int]]) -> None:
        if removed[0]:
            graph.get_pruning_group(root, pruner.prune_out_channels, list(removed[0])).prune()

    return Bundle(name, "mlp", size, score, apply, modules=modules, set_names=["channels"])


# -------------------------------------------------------------------------------------- selection

def _rank(bundles: list[Bundle], criterion: str) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per bundle: the per-set unit orders (weakest first) and the score of removing rank r."""
    ranked = []
    for bundle in bundles:
        scores = bundle.score(criterion)
        orders = [s.argsort(stable=True) for s in scores]
        rank_scores = sum(s[o] for s, o in zip(scores, orders))
        ranked.append((orders, rank_scores))
    return ranked


def _select(bundles, ranked, ratio, threshold, head_floor, global_) -> list[int]:
    """How many units (ranks) each bundle loses."""
    floors = [_floor(b.size, head_floor) for b in bundles]
    total = sum(b.size for b in bundles)
    if not global_:
        counts = [int(ratio * b.size) for b in bundles]
        over = [b.name for b, c, f in zip(bundles, counts, floors) if b.size - c < f]
        if over:
            raise PruningError(f"ratio {ratio} would take {over[0]} below its floor of units "
                               f"(head_floor={head_floor}); lower the ratio or the floor")
        return counts
    # normalise per kind so LSTM units and MLP channels (different weight counts) compete fairly,
    # while keeping the differences between blocks (the point of a global ranking)
    normalised = []
    if threshold is None:
        means = {}
        for bundle, (_, s) in zip(bundles, ranked):
            means.setdefault(bundle.kind, []).append(s)
        means = {k: torch.cat(v).mean().clamp_min(1e-30) for k, v in means.items()}
        normalised = [s / means[b.kind] for b, (_, s) in zip(bundles, ranked)]
    else:
        normalised = [s for _, s in ranked]
    candidates = sorted((float(s[r]), i, r) for i, s in enumerate(normalised) for r in range(len(s)))
    wanted = total if threshold is not None else int(ratio * total)
    counts = [0] * len(bundles)
    removed = 0
    for value, i, r in candidates:
        if removed >= wanted or (threshold is not None and value >= threshold):
            break
        if r == counts[i] and bundles[i].size - counts[i] > floors[i]:
            counts[i] += 1
            removed += 1
    if threshold is None and removed < wanted:
        allowed = sum(b.size - f for b, f in zip(bundles, floors))
        raise PruningError(f"ratio {ratio} asks for {wanted} of {total} units but the per-head/layer "
                           f"floors (head_floor={head_floor}) allow at most {allowed}; lower the ratio "
                           "or the floor")
    return counts


# ----------------------------------------------------------------------------------------- taylor

def _taylor_gradients(model: nn.Module, batches: list, loss_fn: Callable | None) -> None:
    """Accumulate gradients for Taylor importance (default loss: distance to the teacher's output)."""
    wrappers = list(replaced_sites(model))
    if loss_fn is None and (not wrappers or any(w.original is None for w in wrappers)):
        raise PruningError("importance='taylor' needs a loss: keep the originals (prune before finalize) "
                           "or pass loss_fn=(model, batch) -> scalar")
    flags = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()  # no dropout: the gradient should describe the deterministic model
    model.zero_grad(set_to_none=True)
    for p in frozen:  # frozen weights still need a gradient to be scored
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for raw, inputs in batches:
                if loss_fn is not None:
                    loss = loss_fn(model, raw)
                else:
                    with torch.no_grad():
                        use_original_attention(model, True)
                        target = _main_tensor(_call(model, inputs)).detach()
                    use_original_attention(model, False)
                    loss = F.mse_loss(_main_tensor(_call(model, inputs)), target)
                loss.backward()
    finally:
        for wrapper in wrappers:
            wrapper.use_original = False
        for module, training in flags:
            module.training = training
        for p in frozen:
            p.requires_grad_(False)


# ----------------------------------------------------------------------------------- mutate/undo

def _snapshot(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, dict]]:
    saved = []
    for module in {id(m): m for m in modules}.values():
        state = dict(module.__dict__)
        state["_parameters"] = dict(module._parameters)
        state["_buffers"] = dict(module._buffers)
        for key in ("_flat_weights", "_flat_weights_names"):
            if key in state:
                state[key] = list(state[key])
        saved.append((module, state))
    return saved


def _restore(saved: list[tuple[nn.Module, dict]]) -> None:
    for module, state in saved:
        module.__dict__.clear()
        module.__dict__.update(state)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()


# ------------------------------------------------------------------------------------------ prune

def prune(
    model: nn.Module,
    example_inputs: Any = None,
    ratio: float | None = None,
    importance: str = "magnitude",
    global_: bool = True,
    *,
    scope: str = "all",
    threshold: float | None = None,
    head_floor: float | int = 0.1,
    skip_unprunable: bool = False,
    ignored_layers: Iterable[nn.Module] = (),
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    taylor_batches: int = 4,
    recover_steps: int = 0,
    recover_mode: str = "blockwise",
    teacher: nn.Module | None = None,
    measure_flops: bool = True,
    latency_repeats: int = 0,
    progress: Any = None,
    **distill_settings: Any,
) -> PruneReport:
    """Prune ``model`` in place: one criterion, one budget, ranked globally over every prunable unit.

    Prunable units: the hidden units of every head of every recurrent replacement (per layer and
    direction, all gate rows, recurrent row/column, biases and the head projection's column), the
    channels of conv replacements, and hidden channels between two layers found by torch-pruning's
    dependency graph (MLP fc1 -> fc2). Never pruned: the residual stream, embeddings, classifier
    heads, the reused output projections (shared with the kept teacher) and unreplaced attention.
    Tensors really shrink (no masks). On any failure the model is left as it was.

    Args:
        model: a model after ``replace_attention`` (it may also have no replaced sites: then only
            its MLP channels are pruned).
        example_inputs: inputs the model accepts (None guesses them).
        ratio: fraction of prunable units to remove, in [0, 1); default 0.4.
        importance: "magnitude" (sum of squared weights), "taylor" (|w * grad|, needs batches) or
            "hoyer" (group L2 norm; pair with ``threshold`` after training with ``hoyer_square``).
        global_: rank all units together (True) or remove ``ratio`` of each bundle (False).
        scope: "all", "replacements" (recurrent/conv units only) or "mlp" (MLP channels only).
        threshold: with importance="hoyer": remove every unit whose group norm is below this.
        head_floor: units each head / layer keeps at least: a fraction of its units or a count.
        skip_unprunable: leave sites whose replacement has no pruner instead of refusing.
        ignored_layers: further modules torch-pruning must not prune.
        data: batches for Taylor importance and for recovery.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for Taylor (default: MSE to the teacher output).
        taylor_batches: batches of ``data`` used for Taylor importance.
        recover_steps: distillation steps after pruning (``surgery.distill``); needs ``data``.
        recover_mode: "blockwise" or "e2e" (see ``surgery.distill``).
        teacher: teacher for recovery; default: a copy of the model before pruning with its
            attention restored (the kept originals), since MLP pruning changes the replaced model.
        measure_flops: count FLOPs before/after (``surgery.measure.count_flops``).
        latency_repeats: when > 0, median latency before/after on ``example_inputs`` (two separate
            measurements: indicative only; compare models with ``surgery.measure.compare``).
        progress: a ``surgery.progress.Progress`` for recovery.
        **distill_settings: passed to ``surgery.distill`` (lr, ...).

    Returns:
        A ``PruneReport``: params/FLOPs (and optionally latency) before and after, units kept per
        head and layer, and fidelity as the cosine between the model's output on
        ``example_inputs`` before pruning and after it (and after recovery).

    Example:
        >>> import torch, timm, surgery
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> _ = surgery.replace_attention(vit, "mhlstm", x)
        >>> report = surgery.prune(vit, x, ratio=0.5, measure_flops=False)
        >>> report.params_after < report.params_before
        True
    """
    # 1. check the request and every site
    ratio = _check_request(ratio, threshold, importance, scope, head_floor, global_)
    if recover_steps and data is None:
        raise PruningError("recover_steps needs data= (batches to distill on)")
    if not isinstance(recover_steps, int) or recover_steps < 0:
        raise PruningError(f"recover_steps must be an integer >= 0, not {recover_steps!r}")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    site_pruners, unprunable = _site_pruners(model, skip_unprunable)
    if scope == "replacements" and not any(p for _, p in site_pruners):
        raise PruningError("scope='replacements' but the model has no prunable replaced site; "
                           "call surgery.replace_attention first")
    recovery_teacher = teacher
    if recover_steps and teacher is None:
        if any(w.original is None for w, _ in site_pruners):
            raise PruningError("recovery needs a teacher: the originals were finalized; pass teacher=")

    # 2. the dependency graph
    graph = build_graph(model, example_inputs, site_pruners, ignored_layers)

    # 3. bundles
    bundles: list[Bundle] = []
    if scope in ("all", "replacements"):
        for wrapper, pruner in site_pruners:
            if pruner is not None:
                found = pruner.unit_bundles(wrapper.mixer, f"{wrapper.site.name}.mixer")
                if not found:  # it would stay unpruned without anyone noticing
                    if not skip_unprunable:
                        raise PruningError(f"the pruner of {wrapper.replacement!r} offers no units at site "
                                           f"{wrapper.site.name!r}; fix its unit_bundles or pass "
                                           "skip_unprunable=True")
                    unprunable.append(f"{wrapper.site.name} ({wrapper.replacement})")
                bundles += found
    if scope in ("all", "mlp"):
        names = {m: n for n, m in model.named_modules()}
        for group in _mlp_groups(model, graph, list(ignored_layers), site_pruners):
            root = group[0].dep.target.module
            bundles.append(_graph_bundle(graph, group, names.get(root, type(root).__name__)))
    if not bundles:
        raise PruningError(f"nothing to prune in {type(model).__name__} with scope={scope!r}")

    # 4. score and select (still no change to the model, except gradients for Taylor)
    if importance == "taylor":
        if data is None:
            batches = [(example_inputs, as_args_kwargs(example_inputs))]
        else:
            batches = _take(_resolve(data, model), taylor_batches)
        _taylor_gradients(model, batches, loss_fn)
    try:
        ranked = _rank(bundles, importance)
    finally:
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
    counts = _select(bundles, ranked, ratio, threshold, head_floor, global_)

    params_before = count_parameters(model)
    flops_before = _flops(model, example_inputs) if measure_flops else None
    latency_before = _latency(model, example_inputs, latency_repeats)
    reference = _eval_output(model, example_inputs).clone()
    if recover_steps and recovery_teacher is None:
        from surgery.swap import restore_attention

        recovery_teacher = restore_attention(copy.deepcopy(model))

    # 5. mutate, with undo
    saved = _snapshot(m for b in bundles for m in b.modules)
    # torch-pruning replaces parameters with new ones that require grad: keep frozen weights frozen
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    results = []
    try:
        for bundle, (orders, _), count in zip(bundles, ranked, counts):
            before = bundle.size
            if count:
                bundle.apply([order[:count].tolist() for order in orders])
            results.append(BundleResult(bundle.name, bundle.kind, before, before - count))
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        output = _eval_output(model, example_inputs)
        if not torch.isfinite(output).all():
            raise PruningError("the pruned model's output is not finite")
    except Exception as error:
        _restore(saved)
        if isinstance(error, SurgeryError):
            raise
        raise PruningError(f"pruning failed and was undone: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}") from error

    report = PruneReport(ratio=ratio, threshold=threshold, importance=importance, scope=scope,
                         global_ranking=global_, params_before=params_before,
                         params_after=count_parameters(model), flops_before=flops_before,
                         flops_after=_flops(model, example_inputs) if measure_flops else None,
                         bundles=results, skipped_sites=unprunable,
                         output_cosine=_cosine(reference, output), latency_before_ms=latency_before,
                         latency_after_ms=_latency(model, example_inputs, latency_repeats))

    # 6. recovery
    if recover_steps:
        try:
            from surgery.distill import distill
        except ImportError as error:
            raise PruningError(f"recovery needs surgery.distill, which cannot be imported ({error})") from None
        report.recovery = distill(recovery_teacher, model, data, mode=recover_mode, steps=recover_steps,
                                  progress=progress, **distill_settings)
        report.output_cosine_recovered = _cosine(reference, _eval_output(model, example_inputs))
    return report


def _eval_output(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    """The main output tensor in eval mode (no dropout noise), each module's mode restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return _main_tensor(_call(model, example_inputs)).detach()
    finally:
        for module, training in flags:
            module.training = training


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _latency(model: nn.Module, example_inputs: Any, repeats: int) -> float | None:
    if not repeats:
        return None
    from surgery.measure import measure_latency

    return measure_latency(model, example_inputs, repeats=repeats, warmup=1)["median_ms"]


def _resolve(data: Any, model: nn.Module) -> Iterable:
    if isinstance(data, str):
        from surgery.data import data_from_spec

        return data_from_spec(data, model)
    return data


def _take(data: Iterable, n: int) -> list:
    """The first ``n`` batches, each as (raw batch, (args, kwargs) of its model inputs)."""
    from surgery.data import split_batch

    batches = []
    for batch in data:
        args, kwargs, _ = split_batch(batch)
        batches.append((batch, (args, kwargs)))
        if len(batches) >= n:
            break
    if not batches:
        raise PruningError("data= yielded no batches")
    return batches


def _flops(model: nn.Module, example_inputs: Any) -> int | None:
    try:
        from surgery.measure import count_flops
    except ImportError:
        return None
    return count_flops(model, example_inputs)
