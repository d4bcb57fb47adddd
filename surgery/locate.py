"""Find attention blocks in any model: torch.fx graphs first, torch.export second, known types last.

Stages (all read-only): capture a graph, find attention cores in it (``scaled_dot_product_attention``,
or a softmax fed by an activation-by-activation matmul), map each core to the smallest module that
owns it and has weights (the attention block with its q/k/v projections), then probe each block
with the example inputs to learn its calling convention, widths, kind and causality. Causality is
read from the mask / ``is_causal`` that reaches each attention core while the model runs; a
perturbation probe only cross-checks it (random weights can hide a dependence, never fake one).
"""

from __future__ import annotations

import contextlib
import io
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode

from surgery.errors import NoAttentionFoundError, SurgeryError
from surgery.inputs import as_args_kwargs, default_example_inputs, without_cache
from surgery.sites import AttentionSite, SiteList, SkippedSite

HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "nhead")
KV_HEAD_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num")
OUT_PROJ_NAMES = ("proj", "out_proj", "c_proj", "o_proj", "to_out", "wo", "out")
OUT_DROPOUT_NAMES = ("proj_drop", "resid_dropout", "resid_drop", "out_dropout")
CROSS_ATTENTION_KWARGS = ("encoder_hidden_states", "key_value_states", "context", "memory")
KNOWN_ATTENTION_TYPES = ("Attention", "MultiheadAttention", "SelfAttention")

MATMUL_NAMES = {"matmul", "bmm", "einsum", "baddbmm", "mm"}
SOFTMAX_NAMES = {"softmax", "_softmax", "_safe_softmax", "log_softmax"}
#: ops that only re-lay out a tensor: a parameter seen through them is still a parameter
LAYOUT_NAMES = {"t", "transpose", "permute", "view", "reshape", "expand", "_unsafe_view", "clone",
                "detach", "contiguous", "unsqueeze", "squeeze", "alias"}
#: an additive mask at or below this hides a position (HF uses finfo.min, older code -1e4 or -inf)
MASKED_BELOW = -1e4
#: keyword inputs of a site that are never a second token stream
_NOT_A_STREAM = ("position_embeddings", "position_bias", "attention_mask", "attn_mask", "mask")


@dataclass
class _Candidate:
    name: str
    found_by: str
    heads: int | None = None
    head_dim: int | None = None
    causal_hint: bool = False
    out_proj: str | None = None
    context_width: int | None = None  # heads * head_dim, from the value product's shape
    graph_cross: bool = False  # keys read an input of the site that queries do not
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- graph capture
def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    if target is operator.matmul:
        return "matmul"
    name = getattr(target, "__name__", None) or str(target)
    # aten overloads print as "aten.softmax.int": take the op name
    name = str(name).split(".")
    return name[1] if len(name) > 1 and name[0] == "aten" else name[0]


def _owners(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_normalise_path(path) for path, _ in stack.values()]


def _normalise_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _is_activation(node: Any, params: set[str]) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "get_attr":
        return False
    if node.op == "placeholder" and node.name in params:
        return False
    if node.op in ("call_function", "call_method") and _op_name(node) in LAYOUT_NAMES and node.args:
        return _is_activation(node.args[0], params)  # a transposed weight is still a weight
    return True


def _fed_by_activation_matmul(node: torch.fx.Node, params: set[str], depth: int = 6) -> bool:
    return _score_product(node, params, depth) is not None


def _score_product(node: torch.fx.Node, params: set[str], depth: int = 6) -> torch.fx.Node | None:
    """The activation-by-activation matmul upstream of a softmax: ``q @ k.T``."""
    frontier = [a for a in node.all_input_nodes]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if _op_name(n) in MATMUL_NAMES:
                operands = [a for a in n.args if isinstance(a, torch.fx.Node)]
                if len(operands) >= 2 and all(_is_activation(a, params) for a in operands[-2:]):
                    return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _inside(node: torch.fx.Node, site: str) -> bool:
    if node.op == "call_module" and (str(node.target) == site or str(node.target).startswith(site + ".")):
        return True
    return site in _owners(node)


def _entries(node: torch.fx.Node, site: str, params: set[str]) -> set[str]:
    """The activations from outside ``site`` that ``node`` (inside it) is computed from."""
    found, seen, frontier = set(), set(), [node]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if not _is_activation(n, params):
            continue
        if not _inside(n, site) and n is not node:
            shape = _shape(n)
            if shape is None or len(shape) >= 2:  # tensors only: sizes read off another tensor do not count
                found.add(n.name)
            continue
        frontier.extend(n.all_input_nodes)
    return found


def _reads_another_input(core: torch.fx.Node, site: str, params: set[str]) -> bool:
    """True when the core's keys come from an input of the site that its queries do not read:
    cross-attention, told from the graph whatever the weights are."""
    if "scaled_dot_product" in _op_name(core):
        operands = [a for a in core.args[:2] if isinstance(a, torch.fx.Node)]
    else:
        product = _score_product(core, params)
        operands = [a for a in product.args if isinstance(a, torch.fx.Node)][-2:] if product is not None else []
    if len(operands) != 2:
        return False
    queries, keys = (_entries(o, site, params) for o in operands)
    return bool(queries) and bool(keys - queries)


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None


def _cores(graph: torch.fx.Graph, params: set[str], modules: dict[str, nn.Module]):
    """Yield (node, owners, heads, head_dim, causal_hint) for each attention core in the graph."""
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.MultiheadAttention):
            yield node, _owners(node) + [str(node.target)], None, None, False
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        name = _op_name(node)
        if "scaled_dot_product" in name or name in ("_native_multi_head_attention",):
            q = _shape(node.args[0]) if node.args else None
            heads, head_dim = (q[-3], q[-1]) if q and len(q) == 4 else (None, None)
            causal = bool(node.kwargs.get("is_causal", False)) or (
                len(node.args) > 5 and node.args[5] is True)
            yield node, _owners(node), heads, head_dim, causal
        elif name in SOFTMAX_NAMES - {"log_softmax"} and _fed_by_activation_matmul(node, params):
            scores = _shape(node)
            heads = scores[-3] if scores and len(scores) == 4 else None
            yield node, _owners(node), heads, None, False


def _value_product(core: torch.fx.Node, params: set[str], depth: int = 12) -> torch.fx.Node | None:
    """The first activation-by-activation matmul downstream of a softmax core: ``weights @ v``.

    The output projection follows this product, not the softmax: talking-heads attention puts a
    head-mixing Linear between the softmax and the value product, which is not the projection.
    """
    seen, frontier = set(), list(core.users)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _op_name(n) in MATMUL_NAMES:
                operands = [a for a in n.args if isinstance(a, torch.fx.Node)]
                if len(operands) >= 2 and all(_is_activation(a, params) for a in operands[-2:]):
                    return n
            nxt.extend(n.users)
        frontier = nxt
    return None


def _downstream_linear(core: torch.fx.Node, site: str, modules: dict[str, nn.Module]) -> str | None:
    """First weighted op downstream of ``core`` that is still inside ``site``: the out-projection."""
    seen, frontier = set(), list(core.users)
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            owners = _owners(n)
            path = str(n.target) if n.op == "call_module" else (owners[-1] if owners else "")
            if n.op == "call_module":
                owners = owners + [path]
            if site not in owners and not path.startswith(site + "."):
                continue
            if path.startswith(site + ".") and _is_linear_like(modules.get(path)):
                return path[len(site) + 1:]
            nxt.extend(n.users)
        frontier = nxt
    return None


def _is_linear_like(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _graph_candidates(model: nn.Module, args, kwargs, method: str) -> tuple[list[_Candidate], list[str]]:
    modules = dict(model.named_modules())
    errors: list[str] = []
    attempts = []
    if method in ("auto", "fx") and not kwargs:
        attempts.append("fx")
    if method in ("auto", "export"):
        attempts.append("export")
    for how in attempts:
        try:
            if how == "fx":
                graph_module = torch.fx.symbolic_trace(model)
                from torch.fx.passes.shape_prop import ShapeProp

                try:
                    # ShapeProp prints a traceback to stderr before it raises: the caller gets one line
                    with contextlib.redirect_stderr(io.StringIO()):
                        ShapeProp(graph_module).propagate(*args)
                except Exception:  # shapes are a bonus; attributes give heads too
                    pass
                graph, params = graph_module.graph, set()
            else:
                exported = torch.export.export(model, tuple(args), without_cache(model, kwargs),
                                               strict=False)
                graph = exported.graph
                params = set(exported.graph_signature.inputs_to_parameters) | set(
                    exported.graph_signature.inputs_to_buffers)
        except Exception as error:  # noqa: BLE001 - any tracing failure moves to the next method
            errors.append(f"{how}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            continue
        found: dict[str, _Candidate] = {}
        for node, owners, heads, head_dim, causal in _cores(graph, params, modules):
            site = next((p for p in reversed(owners) if p in modules and _has_weights(modules[p])), None)
            if site is None or site == "":
                continue
            candidate = found.setdefault(site, _Candidate(site, how))
            candidate.heads = candidate.heads or heads
            candidate.head_dim = candidate.head_dim or head_dim
            candidate.causal_hint |= causal
            if not isinstance(modules[site], nn.MultiheadAttention) and node.op != "call_module":
                candidate.graph_cross |= _reads_another_input(node, site, params)
            if candidate.out_proj is None and not isinstance(modules[site], nn.MultiheadAttention):
                product = node if "scaled_dot_product" in _op_name(node) else _value_product(node, params)
                candidate.out_proj = _downstream_linear(product or node, site, modules)
                width = _shape(product)
                if width and len(width) == 4:
                    candidate.context_width = width[-3] * width[-1]
        if found:
            return _innermost(list(found.values())), errors
        errors.append(f"{how}: no attention core in the graph")
    return [], errors


def _innermost(candidates: list[_Candidate]) -> list[_Candidate]:
    names = {c.name for c in candidates}
    return [c for c in candidates if not any(o != c.name and o.startswith(c.name + ".") for o in names)]


def _type_candidates(model: nn.Module) -> list[_Candidate]:
    found = []
    for name, module in model.named_modules():
        type_name = type(module).__name__
        if name and (isinstance(module, nn.MultiheadAttention) or (
                type_name.endswith(KNOWN_ATTENTION_TYPES) and _has_weights(module)
                and "Cross" not in type_name)):
            found.append(_Candidate(name, "type"))
    return _innermost(found)


# ----------------------------------------------------------------------------- target rules
def _matches(name: str, rule: str | Iterable[str]) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == r or name.endswith("." + r) for r in rule)


def _select(model: nn.Module, candidates: list[_Candidate], targets, exclude, filter_fn) -> list[_Candidate]:
    modules = dict(model.named_modules())
    if targets is not None:
        by_name = {c.name: c for c in candidates}
        chosen = [by_name.get(n, _Candidate(n, "targets")) for n in modules if n and _matches(n, targets)]
        if not chosen:
            raise NoAttentionFoundError(
                f"targets {targets!r} matched no module of {type(model).__name__}; "
                "give a full-match regex or a list of module-name suffixes"
            )
    else:
        chosen = list(candidates)
    if exclude is not None:
        kept = [c for c in chosen if not _matches(c.name, exclude)]
        if chosen and not kept:
            raise NoAttentionFoundError(
                f"every attention site ({len(chosen)}) is excluded by {exclude!r}; loosen exclude"
            )
        chosen = kept
    if filter_fn is not None:
        chosen = [c for c in chosen if filter_fn(c.name, modules[c.name])]
    return chosen


# ----------------------------------------------------------------------------- probing
@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: Any = None
    out_proj_width: int | None = None
    core_causal: list[bool] = field(default_factory=list)  # one verdict per core seen in the call


def _allowed_below_diagonal_only(allowed: torch.Tensor) -> bool:
    """True when no query may see a later key: the strict upper triangle is masked everywhere."""
    size = allowed.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=allowed.device).triu(1)
    return not bool((allowed.bool() & upper).any())


def _mask_verdict(mask: Any, queries: int, keys: int, true_means_masked: bool = False) -> bool | None:
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return None
    if mask.shape[-1] != keys or mask.shape[-2] not in (queries, 1) or queries != keys or keys < 2:
        return None
    if mask.shape[-2] == 1:  # a key-padding mask broadcast over queries: never causal
        return False
    if mask.dtype == torch.bool:
        allowed = ~mask if true_means_masked else mask
    else:
        allowed = mask > MASKED_BELOW
    return _allowed_below_diagonal_only(allowed)


def _core_verdict(func: Any, args: tuple, kwargs: dict) -> bool | None:
    """Causality of one attention core call, read from what reaches it (None: not a core)."""
    name = getattr(func, "__name__", "")
    if name == "scaled_dot_product_attention" and len(args) >= 2:
        queries, keys = int(args[0].shape[-2]), int(args[1].shape[-2])
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if (args[5] if len(args) > 5 else kwargs.get("is_causal", False)) is True:
            return True
        if mask is None:
            return False if queries == keys > 1 else None
        return _mask_verdict(mask, queries, keys)
    if name == "multi_head_attention_forward" and len(args) >= 2:
        queries, keys = int(args[0].shape[0]), int(args[1].shape[0])  # seq-first inside MHA
        if kwargs.get("is_causal", False) is True:
            return True
        mask = kwargs.get("attn_mask", args[16] if len(args) > 16 else None)
        if mask is None:
            return False if queries == keys > 1 else None
        return _mask_verdict(mask, queries, keys, true_means_masked=True)
    if name in ("softmax", "_softmax", "_safe_softmax") and args and isinstance(args[0], torch.Tensor):
        scores = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if (scores.dim() < 3 or not scores.is_floating_point() or dim not in (-1, scores.dim() - 1)
                or scores.shape[-1] != scores.shape[-2] or scores.shape[-1] < 2):
            return None
        return _allowed_below_diagonal_only(scores > MASKED_BELOW)
    return None


class _CoreObserver(TorchFunctionMode):
    """Records, for the innermost site running, the causality of each attention core it calls."""

    def __init__(self, calls: dict[str, _Call]) -> None:
        super().__init__()
        self.calls = calls
        self.active: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            call = self.calls.get(self.active[-1])
            if call is not None and call.output is None:  # the first call of a site only
                try:
                    verdict = _core_verdict(func, args, kwargs)
                except Exception:  # noqa: BLE001 - an odd argument layout just gives no verdict
                    verdict = None
                if verdict is not None:
                    call.core_causal.append(verdict)
        return func(*args, **kwargs)


def _probe(model: nn.Module, candidates: list[_Candidate], args, kwargs) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    handles = []
    modules = dict(model.named_modules())
    observer = _CoreObserver(calls)
    for candidate in candidates:
        module = modules[candidate.name]

        def pre(mod, a, kw, name=candidate.name):
            calls.setdefault(name, _Call(a, kw))
            observer.active.append(name)

        def post(mod, a, kw, out, name=candidate.name):
            if calls[name].output is None:
                calls[name].output = out
            if observer.active and observer.active[-1] == name:
                observer.active.pop()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
        proj = _child(module, candidate.out_proj) if candidate.out_proj else None
        if proj is not None:
            def proj_pre(mod, a, name=candidate.name):
                call = calls.get(name)
                if call is not None and call.out_proj_width is None and a:
                    call.out_proj_width = int(a[0].shape[-1])

            handles.append(proj.register_forward_pre_hook(proj_pre))
    run_example(model, args, kwargs, handles, observer)
    return calls


def run_example(model: nn.Module, args: tuple, kwargs: dict, handles: list, observer: Any = None) -> None:
    """Run ``model`` once in eval mode without grad on the example inputs, then remove ``handles``
    and restore the training mode; a failure is one ``SurgeryError`` line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (observer if observer is not None else contextlib.nullcontext()):
            model(*args, **without_cache(model, kwargs))
    except Exception as error:
        raise SurgeryError(
            f"the model failed on the example inputs ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); pass inputs the model's forward accepts"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _child(module: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _hidden_states(module: nn.Module, call: _Call) -> tuple[torch.Tensor | None, str]:
    if call.args and isinstance(call.args[0], torch.Tensor):
        return call.args[0], "arg0"
    for key, value in call.kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() in (3, 4) and value.is_floating_point():
            return value, key
    return None, ""


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _rerun(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    kwargs = {k: (None if k in _CACHE_KEYS else v) for k, v in kwargs.items()}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return _first_tensor(module(*args, **kwargs))
    except Exception:  # noqa: BLE001 - a block we cannot re-run gives no evidence
        return None
    finally:
        module.train(was_training)


def _causal_probe(module: nn.Module, call: _Call, hidden: torch.Tensor, seq_dim: int) -> bool | None:
    """Perturb every position after the first; a causal block's first output must not move.

    A cross-check only: small random weights can make a real dependence too small to see, so a
    "causal" answer here is weak evidence, a "not causal" one is strong.
    """
    if hidden.shape[seq_dim] < 2:
        return None
    noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)).to(hidden)
    index = [slice(None)] * hidden.dim()
    index[seq_dim] = slice(0, 1)
    noise[tuple(index)] = 0
    changed = hidden + noise * (hidden.std() + 1)

    def swap(value):
        return changed if value is hidden else value

    before = _rerun(module, call.args, call.kwargs)
    after = _rerun(module, tuple(swap(a) for a in call.args), {k: swap(v) for k, v in call.kwargs.items()})
    if before is None or after is None or before.shape != after.shape:
        return None
    first = [slice(None)] * before.dim()
    first[seq_dim] = 0
    a, b = before[tuple(first)], after[tuple(first)]
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (a.abs().max().item() + 1)))


def _second_stream(module: nn.Module, call: _Call, hidden: torch.Tensor) -> str | None:
    """The name of another token stream the block reads (keys/values from it: cross-attention).

    A candidate is a floating [B, M, E] input other than the hidden states that is not a square
    [B, N, N] mask; it is a stream when changing it changes the block's output.
    """
    streams = [(f"argument {i}", i, None) for i, a in enumerate(call.args) if i and _stream_like(a, hidden)]
    streams += [(k, None, k) for k, v in call.kwargs.items()
                if k not in _NOT_A_STREAM and k not in _CACHE_KEYS and _stream_like(v, hidden)]
    if not streams:
        return None
    before = _rerun(module, call.args, call.kwargs)
    for label, position, key in streams:
        value = call.args[position] if key is None else call.kwargs[key]
        noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(1)).to(value)
        changed = value + noise * (value.std() + 1)
        args = tuple(changed if i == position else a for i, a in enumerate(call.args))
        kwargs = {k: (changed if k == key else v) for k, v in call.kwargs.items()}
        after = _rerun(module, args, kwargs)
        if before is not None and after is not None and (
                before.shape != after.shape or not torch.allclose(before, after)):
            return label
    return None


def _stream_like(value: Any, hidden: torch.Tensor) -> bool:
    return (isinstance(value, torch.Tensor) and value is not hidden and value.is_floating_point()
            and value.dim() == 3 and value.shape[0] == hidden.shape[0]
            and not value.shape[-1] == value.shape[-2] == hidden.shape[1])


def _heads_from_attributes(module: nn.Module) -> int | None:
    for attribute in HEAD_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    for attribute in HEAD_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _kv_heads_of(module: nn.Module, heads: int, head_dim: int) -> int:
    """The site's key/value heads when it has fewer than its ``heads`` query heads (grouped-query or
    multi-query attention), else 0: read from the key projection's width (what the weights are),
    else from the module's or its config's attributes (Llama's ``num_key_value_heads``)."""
    found = []
    for name in ("k_proj", "key", "k"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear) and head_dim and child.out_features % head_dim == 0:
            found.append(child.out_features // head_dim)
            break
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 and heads % groups == 0:
        found.append(heads // groups)
    for source in (module, getattr(module, "config", None)):
        for attribute in KV_HEAD_ATTRIBUTES:
            value = getattr(source, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.append(value)
    if not found or not (0 < found[0] < heads and heads % found[0] == 0):
        return 0
    return found[0]


class _Unsupported(Exception):
    """A module that owns attention but cannot be described as a site (becomes a SkippedSite)."""


def _kind(module: nn.Module, candidate: _Candidate, call: _Call, hidden: torch.Tensor,
          first: torch.Tensor, seq_dim: int, is_mha: bool) -> tuple[str, str]:
    """The site kind (see ``SITE_KINDS``) and a note saying what showed it."""
    if hidden.dim() == 4:
        return "windowed", f"hidden states of shape {list(hidden.shape)}"
    if is_mha:
        query, key, _ = (list(call.args) + [call.kwargs.get(k) for k in ("query", "key", "value")])[:3]
        if not (key is None or key is query or torch.equal(key, query)):
            return "cross", "its key differs from its query"
    else:
        given = [k for k in CROSS_ATTENTION_KWARGS if call.kwargs.get(k) is not None]
        if given:
            return "cross", f"called with {given[0]}"
        if candidate.graph_cross:
            return "cross", "in the graph its keys come from an input its queries do not read"
        stream = _second_stream(module, call, hidden)
        if stream is not None:
            return "cross", f"its output depends on {stream}, a second token stream"
    if first.dim() == hidden.dim() and first.shape[seq_dim] != hidden.shape[seq_dim]:
        return "query-subset", f"{hidden.shape[seq_dim]} tokens in, {first.shape[seq_dim]} out"
    return "self", ""


def _causality(module: nn.Module, candidate: _Candidate, call: _Call, hidden: torch.Tensor,
               seq_dim: int, kind: str) -> tuple[bool, str, str]:
    """(causal, causal_source, note): the mask reaching the core decides, the probe cross-checks."""
    graph = all(call.core_causal) if call.core_causal else (True if candidate.causal_hint else None)
    probe = _causal_probe(module, call, hidden, seq_dim) if kind == "self" else None
    if graph is not None:
        if graph and probe is False:
            return False, "probe", ("the mask at the attention core is causal, but the first output "
                                    "moved when later tokens changed")
        if not graph and probe:
            return False, "graph", ("the probe saw no dependence on later tokens (weights can hide "
                                    "it), but no causal mask reaches the attention core")
        return graph, "graph", ""
    if probe is not None:
        return probe, "probe", ""
    return bool(getattr(module, "is_causal", False)), "attribute", ""


def _describe(model: nn.Module, candidate: _Candidate, call: _Call | None) -> AttentionSite:
    module = model.get_submodule(candidate.name)
    if call is None:
        raise _Unsupported(
            f"module {candidate.name!r} was not called by the model's forward on the example "
            "inputs; exclude it or pass inputs that reach it"
        )
    is_mha = isinstance(module, nn.MultiheadAttention)
    hidden, _ = _hidden_states(module, call)
    if hidden is None or hidden.dim() not in (3, 4):
        raise _Unsupported(
            f"module {candidate.name!r} does not take hidden states [batch, tokens, dim] (or a "
            "[batch, height, width, dim] grid) as its first argument; target the attention block itself"
        )
    batch_first = bool(getattr(module, "batch_first", True)) if is_mha else True
    seq_dim = 1 if batch_first else 0
    output = call.output
    if is_mha:
        convention, output_len = "mha", 2
    elif isinstance(output, torch.Tensor):
        convention, output_len = "tensor", 1
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        convention, output_len = "tuple", len(output)
    else:
        raise _Unsupported(
            f"module {candidate.name!r} returns {type(output).__name__}; a site must return "
            "a tensor or a tuple whose first item is the hidden states"
        )
    first = _first_tensor(output)
    kind, kind_note = _kind(module, candidate, call, hidden, first, seq_dim, is_mha)
    out_proj = "out_proj" if is_mha else candidate.out_proj
    if out_proj is None and candidate.found_by in ("type", "targets"):
        out_proj = next((n for n in OUT_PROJ_NAMES if _is_linear_like(_child(module, n))), None)
    embed_dim = int(hidden.shape[-1])
    notes = [kind_note] if kind_note else []
    if out_proj:
        if is_mha:
            context_dim = module.out_proj.in_features
        else:
            context_dim = call.out_proj_width or _in_width(_child(module, out_proj)) or embed_dim
            if candidate.context_width and context_dim != candidate.context_width:
                # the Linear found is not fed by heads * head_dim (e.g. a head-mixing layer): the
                # block's own output is then the context and no projection is reused
                notes.append(f"{out_proj} takes width {context_dim}, not heads x head dim "
                             f"{candidate.context_width}: not taken as the output projection")
                out_proj, context_dim = None, int(first.shape[-1])
    else:
        context_dim = int(first.shape[-1])
    heads = _heads_from_attributes(module) or candidate.heads or 1
    if context_dim % heads:
        raise _Unsupported(
            f"site {candidate.name!r}: context width {context_dim} is not divisible by {heads} heads"
        )
    causal, causal_source, causal_note = _causality(module, candidate, call, hidden, seq_dim, kind)
    if causal_note:
        notes.append(causal_note)
    out_dropout = next((n for n in OUT_DROPOUT_NAMES if isinstance(_child(module, n), nn.Dropout)), None)
    return AttentionSite(
        name=candidate.name,
        module_type=type(module).__name__,
        embed_dim=embed_dim,
        num_heads=heads,
        head_dim=context_dim // heads,
        causal=causal,
        convention=convention,
        out_proj=out_proj,
        out_dropout=out_dropout if out_proj and not is_mha else None,
        context_dim=context_dim,
        batch_first=batch_first,
        output_len=output_len,
        kv_heads=_kv_heads_of(module, heads, context_dim // heads),
        kind=kind,
        found_by=candidate.found_by,
        causal_source=causal_source,
        note="; ".join(notes),
    )


def _in_width(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    if hasattr(module, "in_features"):
        return int(module.in_features)
    weight = getattr(module, "weight", None)  # HF Conv1D stores [in, out]
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and hasattr(module, "nf") else None


# ----------------------------------------------------------------------------- public
def find_attention(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    method: str = "auto",
    on_unsupported: str = "skip",
) -> list[AttentionSite]:
    """Locate every attention block of ``model`` and describe it as an ``AttentionSite``.

    Every site carries its kind (self, cross, query-subset, windowed) and where its causality came
    from. A module that owns attention but cannot be described at all (not called by the example
    inputs, an odd input or output layout) does not stop the others: it is listed in the result's
    ``skipped`` attribute (``SkippedSite`` records with the reason), or raised with
    ``on_unsupported="raise"``.

    Args:
        model: any ``nn.Module`` (timm, HuggingFace, ``nn.TransformerEncoder``, your own).
        example_inputs: a tensor, a tuple of positional args or a dict of keyword args the model's
            forward accepts; None guesses them for timm/HF/``nn.TransformerEncoder`` models.
        targets: override the locator: a full-match regex, or a list of module-name suffixes.
        exclude: sites to leave alone (same forms as ``targets``).
        filter_fn: ``(name, module) -> bool``; keep a site only when it returns True.
        method: "auto" (fx, then torch.export, then known types), "fx", "export" or "type".
        on_unsupported: "skip" (list undescribable modules in ``.skipped``) or "raise".

    Returns:
        The sites in module order (a list, with the ``skipped`` attribute). Raises
        ``NoAttentionFoundError`` when there are none.

    Example:
        >>> import timm, surgery
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> sites = surgery.find_attention(model)
        >>> len(sites), sites[0].name, sites[0].num_heads, sites[0].kind, sites.skipped
        (12, 'blocks.0.attn', 3, 'self', ())
    """
    if method not in ("auto", "fx", "export", "type"):
        raise SurgeryError(f"unknown method {method!r}; use auto, fx, export or type")
    if on_unsupported not in ("skip", "raise"):
        raise SurgeryError(f"unknown on_unsupported {on_unsupported!r}; use 'skip' or 'raise'")
    if example_inputs is None:
        args, kwargs = default_example_inputs(model)
    else:
        args, kwargs = as_args_kwargs(example_inputs)
    errors: list[str] = []
    candidates: list[_Candidate] = []
    if targets is None and method != "type":
        candidates, errors = _graph_candidates(model, args, kwargs, method)
    if not candidates and targets is None and method in ("auto", "type"):
        candidates = _type_candidates(model)
    chosen = _select(model, candidates, targets, exclude, filter_fn)
    if not chosen:
        detail = f" (graph capture: {'; '.join(errors)})" if errors else ""
        raise NoAttentionFoundError(
            f"no attention found in {type(model).__name__}{detail}; pass targets=[...] naming "
            "your attention modules"
        )
    calls = _probe(model, chosen, args, kwargs)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    sites, skipped = [], []
    for candidate in chosen:
        try:
            sites.append(_describe(model, candidate, calls.get(candidate.name)))
        except _Unsupported as error:
            if on_unsupported == "raise":
                raise SurgeryError(str(error)) from None
            module = model.get_submodule(candidate.name)
            skipped.append(SkippedSite(candidate.name, type(module).__name__, "unsupported", str(error)))
    if not sites:
        raise NoAttentionFoundError(
            f"no attention site of {type(model).__name__} could be described: "
            + "; ".join(s.reason for s in skipped[:3])
        )
    return SiteList(sorted(sites, key=lambda s: order[s.name]),
                    sorted(skipped, key=lambda s: order[s.name]))
