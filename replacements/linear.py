"""Linear attention started from the site's own query/key/value projections (LoLCATs / Hedgehog style).

Everything of ``linear`` lives here: config, module (chunked parallel training form; causal sites
carry a fixed-size state, encoder sites are bidirectional), decoding form, the reader of the
original attention's q/k/v weights and the teacher-derived start that copies them, the pruner
(feature-map width) and the resize on load.

Per head h, with a learned feature map ``phi`` (Hedgehog: ``[softmax(z), softmax(-z)]`` of a
per-head linear map ``z = x W_h + b_h`` started at the identity; or ``elu(z) + 1``) and, optionally,
a per-head decay ``gamma_h`` (retention style):

    y_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = phi(q_i) . phi(k_j) * gamma_h ** |i - j|

over j <= i at causal sites and over every real j at encoder sites. Padded tokens contribute
nothing (their keys and values are zeroed) and get zero output. Grouped-query attention (fewer
key/value heads than query heads, Llama) shares each key/value head between its group of query
heads, as HuggingFace's ``repeat_kv`` does.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import PruningError, SurgeryError
from surgery.registry import MixerShape, ReplacementConfig, TeacherEvidence, register_replacement, using_reference_forms
from surgery.units import Bundle, ReplacementPruner, UnitSet, cut_linear, score_units, shrink

from .native import load_kernel
from .recurrence import _tracing, weights_token

FEATURE_MAPS = ("hedgehog", "elu")
_EPS = 1e-6


@dataclass(frozen=True)
class LinearAttentionConfig(ReplacementConfig):
    """Hyper-parameters of ``linear``.

    Args:
        feature_map: "hedgehog" (``[softmax(z), softmax(-z)]``, 2 x feature_dim features) or
            "elu" (``elu(z) + 1``, feature_dim features), of a learned per-head map ``z``.
        feature_dim: width of the learned map ``z`` per head; 0 = the head width.
        decay: a learned per-head decay ``gamma ** |i - j|`` (retention style); False = none.
        kv_heads: key/value heads (grouped-query attention). -1 (default) = the site's own: the
            teacher's key/value heads where it has fewer than its query heads (Llama's
            ``num_key_value_heads``), else as many as query heads. 0 = as many as query heads (a
            teacher with fewer is widened: its heads are repeated). N = N heads.
        chunk_size: tokens per chunk of the causal training form (the work per chunk is
            quadratic in it, the number of chunks is the Python loop); also the query block of
            the sliding window.
        window: exact softmax attention over the nearest tokens (LoLCATs' sliding window): at a
            causal site token i attends to j in (i - window, i] with ``exp(q_i . k_j * scale)``,
            at an encoder site to |i - j| < window; the feature-map linear attention covers the
            tokens beyond, under one shared normaliser. 0 = off (linear everywhere).
    """

    feature_map: str = "hedgehog"
    feature_dim: int = 0
    decay: bool = False
    kv_heads: int = -1
    chunk_size: int = 64
    window: int = 0


def _feature_map(z: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of the learned map's output z [..., f]: hedgehog ``[softmax(z), softmax(-z)]`` (one softmax
    call over both halves, stacked) or ``elu(z) + 1``."""
    if kind == "hedgehog":
        return torch.softmax(torch.stack([z, -z], dim=-2), dim=-1).flatten(-2)
    return F.elu(z) + 1


#: False pins the native hedgehog map off (tests compare both paths)
_NATIVE = {"hedgehog": True}


def _native_hedgehog(z: torch.Tensor) -> Any:
    """The native kernels' module when its hedgehog map serves ``z`` (CPU float32, an AVX-512 CPU,
    ``replacements/csrc/feature_map.cpp``), else None (the PyTorch map runs)."""
    if not _NATIVE["hedgehog"] or z.device.type != "cpu" or z.dtype != torch.float32:
        return None
    kernel = load_kernel()
    return kernel if kernel is not None and getattr(kernel, "hedgehog_available", False) else None


def _features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of per-head inputs x [B, H, N, d] through per-head maps weight [H, d, f], bias [H, f]."""
    return _feature_map(torch.einsum("bhnd,hdf->bhnf", x, weight) + bias.unsqueeze(1), kind)


def causal_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                  chunk: int, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention in chunks: ``out_i = sum_{j<=i} (q_i . k_j) gamma**(i-j) v_j`` plus the
    state's part, and the state after the last token.

    Args:
        q: features of the queries [B, H, N, F].
        k: features of the keys [B, H, N, F] (zero at padded tokens).
        v: values [B, H, N, E] (the normaliser is one of the E columns).
        log_decay: log gamma per head [H], or None for no decay.
        chunk: tokens per chunk.
        state: ``sum_j gamma**(t-j) k_j v_j^T`` [B, H, F, E] of the tokens before, or None.

    Returns:
        (out [B, H, N, E], state [B, H, F, E]).
    """
    batch, heads, length, features = q.shape
    if state is None:
        state = q.new_zeros(batch, heads, features, v.shape[-1])
    outs = []
    for start in range(0, length, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        size = qc.shape[2]
        index = torch.arange(size, device=q.device)
        diff = index.unsqueeze(1) - index.unsqueeze(0)
        scores = qc @ kc.transpose(-1, -2)
        if log_decay is None:
            weights = scores.masked_fill(diff < 0, 0.0)
            outs.append(weights @ vc + qc @ state)
            state = state + kc.transpose(-1, -2) @ vc
            continue
        rate = log_decay.view(heads, 1, 1)
        within = torch.where(diff >= 0, torch.exp(diff.clamp(min=0) * rate), torch.zeros((), dtype=q.dtype,
                                                                                         device=q.device))
        into = torch.exp((index + 1) * rate.view(heads, 1)).unsqueeze(-1)       # gamma**(i+1) [H, L, 1]
        out_of = torch.exp((size - 1 - index) * rate.view(heads, 1)).unsqueeze(-1)  # gamma**(L-1-j)
        outs.append((scores * within) @ vc + (qc * into) @ state)
        state = torch.exp(size * log_decay).view(1, heads, 1, 1) * state + (kc * out_of).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), state


def rotate(x: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of per-head vectors x [B, H, N, d] at positions [B, N], as HuggingFace's
    Llama computes it (``rotate_half`` layout, angles in float32, ``attention_scaling`` on cos and sin);
    dimensions past ``2 * len(inv_freq)`` pass unrotated (partial rotary)."""
    freqs = position.unsqueeze(-1).float() * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * scaling.float()).to(x.dtype).unsqueeze(1)
    sin = (emb.sin() * scaling.float()).to(x.dtype).unsqueeze(1)
    rotary = emb.shape[-1]
    part, rest = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    turned = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    out = part * cos + turned * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


def window_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, low: int, high: int,
                   block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax numerators over a band: query i reads keys ``i + low .. i + high`` (indices into k),
    in blocks of ``block`` queries (work ~ N x band width, never N x N).

    Args:
        q: queries [B, H, N, d]; k: keys [B, H, L, d]; v: values [B, H, L, E] whose last column is
            1 at real keys and 0 at pads and empty slots (those are left out).
        scale: the logit scale (a 0-d tensor).
        low, high: the band, inclusive, relative to the query's index.

    Returns:
        (sum_j exp(s_ij - m_i) v_j [B, H, N, E], m_i [B, H, N, 1]), with ``s = q . k * scale`` and m
        the largest s of the band (detached: the output does not depend on it).
    """
    length, keys = q.shape[2], k.shape[2]
    real = v[..., -1] > 0  # [B, H, L]
    outs, maxima = [], []
    for start in range(0, length, block):
        stop = min(length, start + block)
        first, last = max(0, start + low), min(keys, stop - 1 + high + 1)
        if first >= last:  # no key in reach (the band lies outside k)
            outs.append(v.new_zeros(*q.shape[:2], stop - start, v.shape[-1]))
            maxima.append(q.new_zeros(*q.shape[:2], stop - start, 1))
            continue
        scores = (q[:, :, start:stop] @ k[:, :, first:last].transpose(-1, -2)) * scale
        offset = torch.arange(first, last, device=q.device).unsqueeze(0) - torch.arange(start, stop, device=q.device
                                                                                         ).unsqueeze(1)
        allowed = ((offset >= low) & (offset <= high)).unsqueeze(0).unsqueeze(0) & real[:, :, None, first:last]
        scores = scores.masked_fill(~allowed, float("-inf"))
        peak = scores.detach().amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        outs.append(torch.exp(scores - peak) @ v[:, :, first:last])
        maxima.append(peak)
    return torch.cat(outs, dim=2), torch.cat(maxima, dim=2)


class GatedLinearAttentionDecoding:
    """Decoding form of ``linear`` at causal sites. The state has a fixed size whatever the length:
    ``sum_j gamma**(t-j) phi(k_j) [v_j, 1]^T`` per head [B, heads, features, head_dim + 1] (the running
    sum of keys times values and, in the last column, the normaliser); with a window also the last
    ``window`` keys and values (the exact softmax part reads them); with the teacher's rotary
    embedding also the next position per row. Prefill and step are the sequence form continued
    from that state.
    """

    def init_state(self, mixer: "GatedLinearAttention", batch: int) -> tuple[torch.Tensor, ...]:
        self._check(mixer)
        return mixer.empty_state(batch)

    def _check(self, mixer: "GatedLinearAttention") -> None:
        if not mixer.shape.causal:
            raise SurgeryError("a bidirectional linear mixer (encoder site) has no decoding form (it reads later "
                               "tokens); only causal sites decode token by token")

    def prefill(self, mixer: "GatedLinearAttention", x: torch.Tensor, mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check(mixer)
        return mixer.sequence(x, mask, state)

    def step(self, mixer: "GatedLinearAttention", x_t: torch.Tensor,
             state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One token ``x_t`` [B, 1, D] -> (output [B, 1, C], new state): ``GatedLinearAttention.step``,
        the sequence form's arithmetic for one token without its chunk and band bookkeeping."""
        self._check(mixer)
        return mixer.step(x_t, state)  # falls back to the sequence form for anything but one token


class GatedLinearAttentionPruner(ReplacementPruner):
    """Prunes ``GatedLinearAttention``: its unit is one column f of the learned feature maps, shared
    by every head's query and key map (column f of ``q_map``/``k_map``, entry f of their biases), so
    the state shrinks with it. External channels (torch-pruning's view): inputs = the columns of
    ``q``, ``k`` and ``v``; outputs (the heads' value widths) are not pruned.
    """

    input_layer = None  # three Linears read the input; handled below

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.q.in_features

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        for linear in (layer.q, layer.k, layer.v):
            cut_linear(linear, idxs, dim=1)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise PruningError("linear's output channels (each head's value width) are not prunable; prune its "
                           "feature-map width (the unit bundles) instead")

    def unit_bundles(self, layer: nn.Module, name: str) -> list[Bundle]:
        width = layer.q_map.shape[-1]
        rows = torch.arange(width).unsqueeze(1)
        parts = [("q_map", 2, rows), ("k_map", 2, rows), ("q_map_bias", 1, rows), ("k_map_bias", 1, rows)]
        sets = [UnitSet("features", width, parts)]

        def score(criterion):
            return [score_units(layer, s, criterion) for s in sets]

        def apply(removed):
            if len(removed[0]) >= width:
                raise PruningError(f"{name}: pruning would remove every feature of the map; lower the ratio")
            shrink(layer, sets, removed)

        return [Bundle(name, "linear", width, score, apply, modules=[layer], set_names=["features"], owner=layer,
                       unit_sets=sets)]


def resize(mixer: "GatedLinearAttention", shapes: dict[str, tuple]) -> None:
    """Rebuild the mixer at its saved (pruned) sizes; weights load afterwards."""
    reference = mixer.q.weight
    for name in ("q", "k", "v"):
        outputs, inputs = shapes[f"{name}.weight"]
        setattr(mixer, name, nn.Linear(inputs, outputs, bias=f"{name}.bias" in shapes).to(reference))
    for name in ("q_map", "k_map", "q_map_bias", "k_map_bias"):
        setattr(mixer, name, nn.Parameter(reference.new_zeros(shapes[name])))
    if "rope_inv_freq" in shapes:  # saved after copying a rotary teacher's q/k
        mixer.set_rotary(torch.zeros(shapes["rope_inv_freq"]), 1.0)


def _conv1d_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a Linear, or of a HuggingFace Conv1D (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.T, bias
    return None


def attention_projections(original: nn.Module, context: int) -> tuple | None:
    """The query, key and value projections of an attention block, each (weight [out, D], bias or None),
    when they can be read: timm ``qkv`` (fused Linear), HuggingFace BERT ``query``/``key``/``value``,
    Llama-style ``q_proj``/``k_proj``/``v_proj`` (fewer key/value rows under grouped-query attention),
    GPT-2 ``c_attn`` (fused Conv1D), ``nn.MultiheadAttention`` ``in_proj_weight``. None otherwise.

    Args:
        original: the attention block (``ReplacedAttention.original``).
        context: the site's context width (query rows).
    """
    names = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
    for trio in names:
        parts = [getattr(original, name, None) for name in trio]
        if all(isinstance(p, nn.Module) for p in parts):
            read = [_conv1d_weight(p) for p in parts]
            if all(r is not None for r in read) and read[0][0].shape[0] == context:
                return tuple(read)
    for name in ("qkv", "c_attn"):
        fused = _conv1d_weight(getattr(original, name, None) or nn.Identity())
        if fused is not None and fused[0].shape[0] == 3 * context:
            weight, bias = fused
            return tuple((weight[i * context:(i + 1) * context],
                          None if bias is None else bias[i * context:(i + 1) * context]) for i in range(3))
    weight = getattr(original, "in_proj_weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape[0] == 3 * context:
        bias = getattr(original, "in_proj_bias", None)
        return tuple((weight[i * context:(i + 1) * context],
                      None if bias is None else bias[i * context:(i + 1) * context]) for i in range(3))
    return None


def _normed(original: nn.Module) -> bool:
    """Whether the block normalises queries/keys after projecting them (timm ``q_norm``/``k_norm``,
    Qwen3/OLMo-2 ``q_norm``), which a plain copy of the projections would drop."""
    return any(isinstance(getattr(original, n, None), nn.Module) and not isinstance(getattr(original, n), nn.Identity)
               for n in ("q_norm", "k_norm"))


def _softmax_scale(original: nn.Module, head: int) -> float:
    """The logit scale of the original attention: HuggingFace ``scaling`` (GPT-2's by-layer scaling
    included), timm ``scale``, else 1/sqrt(head width) (``nn.MultiheadAttention``)."""
    for name in ("scaling", "scale"):
        value = getattr(original, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return head ** -0.5


def rotary_of(original: nn.Module, site: str = "?") -> tuple[torch.Tensor, float] | None:
    """The rotary frequencies and cos/sin scale a Llama-style block receives as ``position_embeddings``
    (the model's own ``*RotaryEmbedding`` class rebuilt from the block's config), or None when the block
    takes no rotary embedding.

    Raises:
        SurgeryError: the block takes ``position_embeddings`` but its frequencies cannot be rebuilt, or
            they change with the length (dynamic / longrope scaling).
    """
    try:
        parameters = inspect.signature(original.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_embeddings" not in parameters:
        return None
    config = getattr(original, "config", None)
    module = sys.modules.get(type(original).__module__)
    classes = [v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and isinstance(v, type)] \
        if module is not None else []
    prefix = type(original).__name__.split("Attention")[0]
    classes.sort(key=lambda c: not c.__name__.startswith(prefix))
    fix = "distill linear with init='none' (--distill-set init=none) or choose another replacement (mhlstm, gru, conv)"
    if config is None or not classes:
        raise SurgeryError(f"site {site!r} ({type(original).__name__}) takes rotary position embeddings whose "
                           f"frequencies linear cannot read (no config or rotary class); {fix}")
    try:
        rotary = classes[0](config)
    except Exception as error:  # noqa: BLE001 - any failure of a foreign constructor means unreadable
        raise SurgeryError(f"site {site!r}: its rotary embedding ({classes[0].__name__}) could not be rebuilt "
                           f"({type(error).__name__}); {fix}") from None
    kind = getattr(rotary, "rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise SurgeryError(f"site {site!r} uses {kind!r} rotary scaling, whose frequencies change with the length; "
                           f"{fix}")
    return rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))


def copy_projections(mixer: "GatedLinearAttention", original: nn.Module, site: str = "?") -> None:
    """Copy the original block's query/key/value projections into ``mixer`` (in place); a teacher with
    fewer key/value heads than the mixer has them repeated per group (grouped-query attention). A
    Llama-style teacher's rotary embedding comes along (queries and keys are rotated before the
    feature map and the window's softmax), and so does its logit scale.

    Args:
        mixer: a ``GatedLinearAttention``.
        original: the attention block it replaces.
        site: the site's name, for the error.

    Raises:
        SurgeryError: the projections (or the rotary frequencies) cannot be read, or their shapes do
            not fit the mixer.
    """
    read = attention_projections(original, mixer.shape.output_dim)
    if read is None or _normed(original):
        why = "normalises its queries/keys after projecting them" if read is not None else \
            "has no query/key/value projections linear can read (qkv, query/key/value, q_proj/k_proj/v_proj, c_attn)"
        raise SurgeryError(f"site {site!r} ({type(original).__name__}) {why}; distill linear with init='none' "
                           "(--distill-set init=none) or choose another replacement (mhlstm, gru, conv)")
    rotary = rotary_of(original, site)
    if rotary is not None and 2 * rotary[0].numel() > mixer.head_dim:
        raise SurgeryError(f"site {site!r}: its rotary frequencies ({rotary[0].numel()}) do not fit linear's head "
                           f"width {mixer.head_dim}; distill with init='none'")
    with torch.no_grad():
        for layer, (weight, bias) in zip((mixer.q, mixer.k, mixer.v), read):
            rows = layer.weight.shape[0]
            if weight.shape[1] != layer.weight.shape[1] or rows % weight.shape[0]:
                raise SurgeryError(f"site {site!r}: its projection {tuple(weight.shape)} does not fit linear's "
                                   f"{tuple(layer.weight.shape)} (pruned or resized?); distill with init='none'")
            repeat = rows // weight.shape[0]
            head = mixer.head_dim
            # HF repeat_kv: key/value head g serves query heads g*repeat .. g*repeat + repeat - 1
            grouped = weight.reshape(-1, 1, head, weight.shape[1]).expand(-1, repeat, -1, -1).reshape(rows, -1)
            layer.weight.copy_(grouped)
            if bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias.reshape(-1, 1, head).expand(-1, repeat, -1).reshape(rows))
        if mixer.softmax_scale is not None:
            mixer.softmax_scale.fill_(_softmax_scale(original, mixer.head_dim))
    if rotary is not None:
        mixer.set_rotary(rotary[0].to(mixer.q.weight.device), rotary[1])


def fit_tail_scale(mixer: "GatedLinearAttention", records: list, max_tokens: int = 512) -> list[float]:
    """Set each head's weight of the linear part beyond the window (``tail_log_scale``) so that, summed
    over the captured tokens, it puts as much weight beyond the window as the teacher's softmax does
    (both relative to the window's largest ``exp(q . k * scale)``); in place, from the copied q/k.

    Args:
        mixer: a ``GatedLinearAttention`` with a window, its q/k copied from the teacher.
        records: captured (hidden [B, N, D], valid [B, N] or None, target) of the site.
        max_tokens: the fit reads at most this many tokens of each record (it is quadratic in them).

    Returns:
        The scales per head (1.0 where no token lay beyond the window).
    """
    heads, window = mixer.shape.num_heads, mixer.config.window
    softmax_mass = mixer.q.weight.new_zeros(heads, dtype=torch.float64)
    linear_mass = torch.zeros_like(softmax_mass)
    kind = mixer.config.feature_map
    gamma = None if mixer.decay_logit is None else torch.sigmoid(mixer.decay_logit).view(1, heads, 1, 1)
    with torch.no_grad():
        for hidden, valid, _ in records:
            hidden = hidden[:, :max_tokens].to(mixer.q.weight)
            batch, length, _ = hidden.shape
            valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if valid is None else \
                valid[:, :max_tokens].to(hidden.device).bool()
            q, k = mixer._heads(hidden, mixer.q), mixer._heads(hidden, mixer.k)
            if mixer.rotary:
                position = (valid.long().cumsum(-1) - 1).clamp(min=0)
                q = rotate(q, position, mixer.rope_inv_freq, mixer.rope_scaling)
                k = rotate(k, position, mixer.rope_inv_freq, mixer.rope_scaling)
            q_features = _features(q, mixer.q_map, mixer.q_map_bias, kind)
            k_features = _features(k, mixer.k_map, mixer.k_map_bias, kind)
            k, k_features = mixer._repeat(k, k_features)
            index = torch.arange(length, device=hidden.device)
            diff = index.unsqueeze(1) - index.unsqueeze(0)
            near = (diff >= 0) & (diff < window) if mixer.shape.causal else diff.abs() < window
            far = diff >= window if mixer.shape.causal else ~near
            keys = valid.view(batch, 1, 1, length)
            queries = valid.view(batch, 1, length, 1).to(q.dtype)
            scores = (q @ k.transpose(-1, -2)) * mixer.softmax_scale
            peak = scores.masked_fill(~(near & keys), float("-inf")).amax(-1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            beyond = (far & keys).to(q.dtype)
            softmax_mass += (torch.exp(scores - peak) * beyond * queries).sum((0, 2, 3)).double()
            linear = q_features @ k_features.transpose(-1, -2)
            if gamma is not None:
                linear = linear * gamma ** diff.abs().to(q.dtype)
            linear_mass += (linear * torch.exp(-peak) * beyond * queries).sum((0, 2, 3)).double()
        fitted = torch.where((softmax_mass > 0) & (linear_mass > 0), softmax_mass / linear_mass,
                             torch.ones_like(softmax_mass))
        mixer.tail_log_scale.copy_(fitted.log().to(mixer.tail_log_scale))
    return [round(float(c), 6) for c in fitted]


def init_from_teacher(mixer: "GatedLinearAttention", evidence: TeacherEvidence) -> list[float] | None:
    """Copy the original attention's q/k/v (and rotary embedding) into the mixer; feature maps stay at
    their identity start and decays at their spread; with a window, each head's weight beyond it is
    fitted to the teacher's (``fit_tail_scale``). Returns the decays per head (empty without decay),
    followed with a window by the fitted weights per head."""
    original = getattr(evidence, "original", None)
    if original is None:
        return None  # the evidence carries only the value projection: nothing to copy q/k from
    site = getattr(evidence, "site", None)
    copy_projections(mixer, original, getattr(site, "name", "?"))
    summary = [] if mixer.decay_logit is None else [round(float(g), 6) for g in torch.sigmoid(mixer.decay_logit)]
    if mixer.config.window and evidence.records:
        summary += fit_tail_scale(mixer, evidence.records)
    return summary


def copy_attention_weights(model: nn.Module) -> list[str]:
    """Copy q/k/v from the kept originals into every ``linear`` mixer of a replaced model (before
    ``finalize``); for models whose value projection the distillation's teacher start does not
    recognise (Llama ``v_proj``, GPT-2 ``c_attn``), or to start without distilling.

    Args:
        model: a model after ``replace_attention(model, "linear")``.

    Returns:
        The names of the sites copied.

    Example:
        >>> import timm, surgery
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1)
        >>> _ = surgery.replace_attention(vit, "linear")
        >>> copy_attention_weights(vit)
        ['blocks.0.attn']
    """
    done = []
    for module in model.modules():
        if getattr(module, "is_replaced_site", False) and isinstance(module.mixer, GatedLinearAttention):
            if module.original is None:
                raise SurgeryError(f"site {module.site.name!r} was finalized: its original attention is gone; "
                                   "copy the weights before surgery.finalize")
            copy_projections(module.mixer, module.original, module.site.name)
            done.append(module.site.name)
    return done


@register_replacement("linear", config=LinearAttentionConfig, pruner=GatedLinearAttentionPruner,
                      init_from_teacher=init_from_teacher, resize=resize, decoding=GatedLinearAttentionDecoding())
class GatedLinearAttention(nn.Module):
    """Linear attention from the site's own q/k/v with a learned feature map, optional per-head decay,
    optional sliding window of exact softmax attention and the teacher's rotary position embedding."""

    def __init__(self, shape: MixerShape, config: LinearAttentionConfig) -> None:
        super().__init__()
        heads, context = shape.num_heads, shape.output_dim
        if heads < 1 or context % heads:
            raise ValueError(f"linear needs the context width ({context}) divisible by the heads ({heads})")
        if config.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {config.feature_map!r}; use one of {list(FEATURE_MAPS)}")
        groups = shape.key_value_heads if config.kv_heads == -1 else (config.kv_heads or heads)
        if groups < 1 or heads % groups:
            raise ValueError(f"kv_heads={config.kv_heads} must be -1 (the site's), 0 (the query heads) or divide "
                             f"the {heads} heads")
        if config.chunk_size < 1 or config.feature_dim < 0 or config.window < 0:
            raise ValueError("linear needs chunk_size >= 1, feature_dim >= 0 and window >= 0")
        self.shape = shape
        self.config = config
        self.head_dim = head = context // heads
        self.kv_heads = groups
        width = config.feature_dim or head
        self.q = nn.Linear(shape.input_dim, context)
        self.k = nn.Linear(shape.input_dim, groups * head)
        self.v = nn.Linear(shape.input_dim, groups * head)
        identity = torch.eye(head, width)
        self.q_map = nn.Parameter(identity.repeat(heads, 1, 1))
        self.q_map_bias = nn.Parameter(torch.zeros(heads, width))
        self.k_map = nn.Parameter(identity.repeat(groups, 1, 1))
        self.k_map_bias = nn.Parameter(torch.zeros(groups, width))
        if config.decay:
            # retention's spread: head h forgets over ~2**(5 + 4h/(H-1)) tokens (32 .. 512)
            spans = torch.pow(2.0, torch.linspace(5.0, 9.0, heads)) if heads > 1 else torch.tensor([128.0])
            gamma = 1 - 1 / spans
            self.decay_logit = nn.Parameter(torch.log(gamma / (1 - gamma)))
        else:
            self.register_parameter("decay_logit", None)
        if config.window:
            # weight of the linear part beyond the window relative to exp(q . k * scale), per head;
            # the teacher start fits it to the mass softmax puts there
            self.tail_log_scale = nn.Parameter(torch.zeros(heads))
            self.register_buffer("softmax_scale", torch.tensor(head ** -0.5))
        else:
            self.register_parameter("tail_log_scale", None)
            self.register_buffer("softmax_scale", None)
        # the teacher's rotary position embedding (copy_projections sets it for Llama-style sites)
        self.register_buffer("rope_inv_freq", None)
        self.register_buffer("rope_scaling", None)

    def set_rotary(self, inv_freq: torch.Tensor, scaling: float | torch.Tensor) -> None:
        """Rotate queries and keys as the teacher does (frequencies [R], 2R <= head width; cos/sin scale)."""
        if 2 * inv_freq.numel() > self.head_dim or inv_freq.dim() != 1:
            raise ValueError(f"rotary frequencies {tuple(inv_freq.shape)} do not fit the head width {self.head_dim}")
        self.register_buffer("rope_inv_freq", inv_freq.detach().clone().float())
        self.register_buffer("rope_scaling", torch.as_tensor(scaling, dtype=torch.float32).detach().clone())

    @property
    def feature_count(self) -> int:
        width = self.q_map.shape[-1]
        return 2 * width if self.config.feature_map == "hedgehog" else width

    @property
    def rotary(self) -> bool:
        return self.rope_inv_freq is not None

    def _heads(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        batch, length, _ = x.shape
        return layer(x).view(batch, length, -1, self.head_dim).transpose(1, 2)

    @property
    def state_parts(self) -> int:
        """How many tensors the decoding state holds (``empty_state``'s length, without building it)."""
        return 1 + 2 * bool(self.config.window) + self.rotary

    def empty_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The decoding state before the first token: (linear state [B, H, F, head_dim + 1], then with a
        window the last ``window`` rotated keys [B, kv_heads, W, head_dim] and values with their
        normaliser [B, kv_heads, W, head_dim + 1], then with rotary positions the next position [B])."""
        reference = self.q.weight
        state = [reference.new_zeros(batch, self.shape.num_heads, self.feature_count, self.head_dim + 1)]
        if self.config.window:
            window = self.config.window
            state += [reference.new_zeros(batch, self.kv_heads, window, self.head_dim),
                      reference.new_zeros(batch, self.kv_heads, window, self.head_dim + 1)]
        if self.rotary:
            state.append(torch.zeros(batch, dtype=torch.long, device=reference.device))
        return tuple(state)

    def sequence(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                 state: tuple[torch.Tensor, ...] | torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The output [B, N, C] and (causal sites) the state after the last token, continuing ``state``
        (a tuple as ``empty_state`` gives)."""
        batch, length, _ = x.shape
        kind, window = self.config.feature_map, self.config.window
        if state is not None and not isinstance(state, tuple):
            state = (state,)
        if state is not None and len(state) != self.state_parts:
            raise SurgeryError(f"linear's decoding state has {len(state)} parts, this mixer keeps "
                               f"{self.state_parts} (window={window}, rotary={self.rotary}); start a new state")
        q, k, v = self._heads(x, self.q), self._heads(x, self.k), self._heads(x, self.v)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: the normaliser
        keep = None
        if padding_mask is not None:
            keep = padding_mask.to(x.dtype).view(batch, 1, length, 1)
            v = v * keep
        position = None
        if self.rotary:
            if padding_mask is None:
                offsets = torch.arange(length, device=x.device).expand(batch, length)
            else:  # as generate() numbers left-padded prompts: the first real token is at 0
                offsets = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
            start = state[-1] if state is not None else torch.zeros(batch, dtype=torch.long, device=x.device)
            q = rotate(q, start.unsqueeze(1) + offsets, self.rope_inv_freq, self.rope_scaling)
            k = rotate(k, start.unsqueeze(1) + offsets, self.rope_inv_freq, self.rope_scaling)
            position = start + (length if padding_mask is None else padding_mask.long().sum(-1))
        log_decay = None if self.decay_logit is None else F.logsigmoid(self.decay_logit)
        linear_state = None if state is None else state[0]
        if window:
            out, new = self._windowed(q, k, v, log_decay, state)
        else:
            out, new = self._linear(q, k, v, keep, log_decay, linear_state)
        y = out[..., :-1] / (out[..., -1:] + _EPS) if not window else \
            out[..., :-1] / torch.where(out[..., -1:] > 0, out[..., -1:], torch.ones_like(out[..., -1:]))
        if keep is not None:
            y = y * keep
        if new is not None and position is not None:
            new = new + (position,)
        return y.transpose(1, 2).reshape(batch, length, -1), new

    def _repeat(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        repeat = self.shape.num_heads // self.kv_heads
        return [t.repeat_interleave(repeat, dim=1) if repeat > 1 else t for t in tensors]

    def _linear(self, q, k, v, keep, log_decay, state):
        """Linear attention everywhere (no window): numerators with the normaliser column [B, H, N, E]."""
        kind = self.config.feature_map
        q = _features(q, self.q_map, self.q_map_bias, kind)
        k = _features(k, self.k_map, self.k_map_bias, kind)
        k, v = self._repeat(k, v)
        if keep is not None:
            k = k * keep
        chunk = self.config.chunk_size
        if self.shape.causal:
            out, state = causal_chunks(q, k, v, log_decay, chunk, state)
            return out, (state,)
        if log_decay is None:
            return q @ (k.transpose(-1, -2) @ v), None
        # both directions of the decayed sum; the token itself is in both
        forward, _ = causal_chunks(q, k, v, log_decay, chunk)
        backward, _ = causal_chunks(q.flip(2), k.flip(2), v.flip(2), log_decay, chunk)
        return forward + backward.flip(2) - (q * k).sum(-1, keepdim=True) * v, None

    def _beyond(self, q_features, keys, values, log_decay, state):
        """Linear part over keys lagging the queries by ``window`` (key row j serves query rows >= j)."""
        kind, window = self.config.feature_map, self.config.window
        k = _features(keys, self.k_map, self.k_map_bias, kind)
        k, values = self._repeat(k, values)
        k = k * (values[..., -1:] > 0).to(k.dtype)
        out, state = causal_chunks(q_features, k, values, log_decay, self.config.chunk_size, state)
        if log_decay is not None:  # the lag: query i and key row j are window + i - j tokens apart
            out = out * torch.exp(window * log_decay).view(1, -1, 1, 1)
        return out, state

    def _windowed(self, q, k, v, log_decay, state):
        """Softmax over the window plus the linear part beyond it, numerators over one normaliser."""
        window, length = self.config.window, q.shape[2]
        block = self.config.chunk_size
        q_features = _features(q, self.q_map, self.q_map_bias, self.config.feature_map)
        if self.shape.causal:
            # rows: the window tokens before (state, or empty slots) then the new ones; query i reads
            # rows i+1 .. i+window by softmax, and rows <= i (and the linear state) linearly
            if state is None:
                past_k = k.new_zeros(*k.shape[:2], window, k.shape[-1])
                past_v = v.new_zeros(*v.shape[:2], window, v.shape[-1])
                linear_state = None
            else:
                linear_state, past_k, past_v = state[0], state[1], state[2]
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            near, peak = window_softmax(q, *self._repeat(keys, values), self.softmax_scale, 1, window, block)
            far, linear_state = self._beyond(q_features, keys[:, :, :length], values[:, :, :length], log_decay,
                                             linear_state)
            new = (linear_state, keys[:, :, -window:], values[:, :, -window:])
        else:
            near, peak = window_softmax(q, *self._repeat(k, v), self.softmax_scale, 1 - window, window - 1, block)
            if window >= length:
                far = torch.zeros_like(near)
            else:  # keys window or more tokens before, and (flipped) after
                lag_k = torch.cat([k.new_zeros(*k.shape[:2], window, k.shape[-1]), k], dim=2)[:, :, :length]
                lag_v = torch.cat([v.new_zeros(*v.shape[:2], window, v.shape[-1]), v], dim=2)[:, :, :length]
                before, _ = self._beyond(q_features, lag_k, lag_v, log_decay, None)
                lag_k = torch.cat([k.new_zeros(*k.shape[:2], window, k.shape[-1]), k.flip(2)], dim=2)[:, :, :length]
                lag_v = torch.cat([v.new_zeros(*v.shape[:2], window, v.shape[-1]), v.flip(2)], dim=2)[:, :, :length]
                after, _ = self._beyond(q_features.flip(2), lag_k, lag_v, log_decay, None)
                far = before + after.flip(2)
            new = None
        tail = torch.exp(self.tail_log_scale.view(1, -1, 1, 1) - peak)
        return near + tail * far, new

    def _step_pack(self) -> dict[str, Any]:
        """The weights the decode step reads, packed once per weight version (``weights_token``): one
        fused q/k/v matrix, the feature maps as batched-matmul operands, the decay, lag and tail
        factors already exponentiated. Not a submodule; rebuilt when a weight or shape changes."""
        key = weights_token(self)
        cached = self.__dict__.get("_step_cache")
        if cached is not None and cached[0] is key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            layers = (self.q, self.k, self.v)
            weight = torch.cat([layer.weight for layer in layers])
            bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                              for layer in layers])
            heads, groups = self.shape.num_heads, self.kv_heads
            pack = {"weight": weight, "bias": bias, "split": [layer.out_features for layer in layers],
                    "q_map": self.q_map.detach(), "q_bias": self.q_map_bias.detach().unsqueeze(1),
                    "k_map": self.k_map.detach(), "k_bias": self.k_map_bias.detach().unsqueeze(1),
                    "decay": None, "lag": None, "tail": None}
            if self.decay_logit is not None:
                log_decay = F.logsigmoid(self.decay_logit.detach())
                pack["decay"] = torch.exp(log_decay).view(1, groups, heads // groups, 1, 1)
                if self.config.window:
                    pack["lag"] = torch.exp(self.config.window * log_decay).view(1, heads, 1, 1)
            if self.tail_log_scale is not None:
                pack["tail"] = self.tail_log_scale.detach().view(1, heads, 1, 1)
        object.__setattr__(self, "_step_cache", (key, pack))
        return pack

    def step(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One new token x [B, 1, D] at a causal site continuing ``state`` -> (output [B, 1, C], new state):
        what ``sequence`` computes for a length-1 input, as one update of the state (the decode step).

        Without gradients it reads the packed weights (``_step_pack``: one q/k/v matmul, the feature
        maps as batched matmuls, one rotation for queries and keys); the window's softmax runs per
        key/value group (the query heads of a group share its keys), so grouped-query attention is
        never repeated to the query heads there. With gradients, under a tracer, or for another
        shape, it is ``sequence``.
        """
        # a tracer (torch.export of a DecodeStep) records the parameters' own ops: the pack is a cache
        if (torch.is_grad_enabled() or _tracing() or not self.shape.causal or x.shape[1] != 1
                or not isinstance(state, tuple) or len(state) != self.state_parts):
            return self.sequence(x, None, state)
        pack = self._step_pack()
        batch, heads, groups, head = x.shape[0], self.shape.num_heads, self.kv_heads, self.head_dim
        share, window, hedgehog = heads // groups, self.config.window, self.config.feature_map == "hedgehog"

        def features(z_in: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            # z_in [B, h, d] -> phi [B, h, 1, F]; per-head maps as one batched matmul over heads
            z = torch.baddbmm(bias, z_in.transpose(0, 1), weight).transpose(0, 1).unsqueeze(2)
            return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1) if hedgehog \
                else F.elu(z) + 1

        qkv = torch.addmm(pack["bias"], x.reshape(batch, -1), pack["weight"].t())
        q, k, v = qkv.split(pack["split"], dim=-1)
        qk = torch.cat([q, k], dim=-1).view(batch, heads + groups, 1, head)
        if self.rotary:
            qk = rotate(qk, state[-1].unsqueeze(1), self.rope_inv_freq, self.rope_scaling)
        q, k = qk[:, :heads], qk[:, heads:]  # [B, H, 1, d], [B, G, 1, d]
        v = torch.cat([v.view(batch, groups, 1, head), v.new_ones(batch, groups, 1, 1)], dim=-1)
        if window:
            keys = torch.cat([state[1], k], dim=2)    # [B, G, W + 1, d]: the row leaving the window first
            values = torch.cat([state[2], v], dim=2)  # [B, G, W + 1, d + 1]
            near_k, near_v = keys[:, :, 1:], values[:, :, 1:]
            # exact softmax over the window, per group: [B, G, share, W]
            scores = torch.matmul(q.reshape(batch, groups, share, head), near_k.transpose(-1, -2))
            scores = (scores * self.softmax_scale).masked_fill((near_v[..., -1] <= 0).unsqueeze(2), float("-inf"))
            peak = scores.amax(dim=-1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            near = torch.matmul(torch.exp(scores - peak), near_v).view(batch, heads, 1, head + 1)
            # the row leaving the window joins the linear state (empty slots carry a zero normaliser)
            new_v = values[:, :, :1]
            new_k = features(keys[:, :, 0], pack["k_map"], pack["k_bias"]) * (new_v[..., -1:] > 0).to(x.dtype)
        else:
            new_k, new_v = features(k[:, :, 0], pack["k_map"], pack["k_bias"]), v
        features_count = new_k.shape[-1]
        # reshape: a cache reordered by beam search need not be contiguous
        linear = state[0].reshape(batch, groups, share, features_count, head + 1)
        if pack["decay"] is not None:
            linear = pack["decay"] * linear
        linear = (linear + torch.matmul(new_k.transpose(-1, -2), new_v).unsqueeze(2)).view(
            batch, heads, features_count, head + 1)
        far = torch.matmul(features(q[:, :, 0], pack["q_map"], pack["q_bias"]), linear)  # [B, H, 1, E]
        if window:
            if pack["lag"] is not None:  # the lag of the linear part behind the query
                far = far * pack["lag"]
            out = near + torch.exp(pack["tail"] - peak.view(batch, heads, 1, 1)) * far
            norm = out[..., -1:]
            y = out[..., :-1] / torch.where(norm > 0, norm, torch.ones_like(norm))
            new = (linear, keys[:, :, -window:], values[:, :, -window:])
        else:
            y = far[..., :-1] / (far[..., -1:] + _EPS)
            new = (linear,)
        if self.rotary:
            new = new + (state[-1] + 1,)
        return y.transpose(1, 2).reshape(batch, 1, -1), new

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sequence form; at an encoder site without window, decay or rotary positions, in eval
        mode without gradients (no tracer, not inside ``reference_forms()``), its inference form
        (``_encoder_forward``: the same function with the feature maps multiplied into one packed
        projection)."""
        if (not self.training and not torch.is_grad_enabled() and not self.shape.causal and not self.config.window
                and self.decay_logit is None and not self.rotary and not using_reference_forms() and not _tracing()):
            return self._encoder_forward(x, padding_mask)
        return self.sequence(x, padding_mask)[0]

    def _encoder_pack(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(weight [D_in, H*F + G*F + G*d], bias, split sizes): one matrix that maps the input straight
        to the feature maps' inputs z_q, z_k (each head's projection multiplied by its map, which is
        linear in x) and to the values; packed in float64 once per weight version (``weights_token``).
        Not a submodule: nothing of it is saved or copied."""
        key = weights_token(self)
        cached = self.__dict__.get("_encoder_cache")
        if cached is not None and cached[0] is key:
            return cached[1]
        heads, groups, head = self.shape.num_heads, self.kv_heads, self.head_dim
        with torch.inference_mode(False), torch.no_grad():
            parts, biases = [], []
            for layer, maps, map_bias, count in ((self.q, self.q_map, self.q_map_bias, heads),
                                                 (self.k, self.k_map, self.k_map_bias, groups)):
                weight = layer.weight.double().view(count, head, -1)          # [h, d, D_in]
                bias = (layer.bias.double() if layer.bias is not None
                        else weight.new_zeros(count * head)).view(count, head)
                parts.append(torch.einsum("hdi,hdf->ihf", weight, maps.double()).reshape(weight.shape[-1], -1))
                biases.append((torch.einsum("hd,hdf->hf", bias, maps.double()) + map_bias.double()).reshape(-1))
            parts.append(self.v.weight.double().T)
            biases.append(self.v.bias.double() if self.v.bias is not None else parts[-1].new_zeros(parts[-1].shape[1]))
            reference = self.q.weight
            packed = (torch.cat(parts, dim=1).to(reference).contiguous(), torch.cat(biases).to(reference),
                      [part.shape[1] for part in parts])
        object.__setattr__(self, "_encoder_cache", (key, packed))
        return packed

    def _encoder_forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """``sequence`` at an encoder site (no window, decay or rotary): phi(q) (phi(k)^T v) over phi(q)
        (phi(k)^T 1), with z_q, z_k and v from one GEMM (``_encoder_pack``) and the normaliser as its
        own sum rather than a column of ones appended to v. Equal to ``sequence`` within 1e-5 (tests)."""
        batch, length, _ = x.shape
        weight, bias, sizes = self._encoder_pack()
        z = torch.addmm(bias, x.reshape(batch * length, -1), weight)
        zq, zk, v = z.split(sizes, dim=-1)
        widths = (self.q_map.shape[-1], self.k_map.shape[-1], self.head_dim)
        native = _native_hedgehog(z) if self.config.feature_map == "hedgehog" else None
        if native is not None:  # the map and the transpose to [B, H, N, 2f] in one pass
            q = native.hedgehog(zq, batch, self.shape.num_heads, widths[0])
            k = native.hedgehog(zk, batch, self.kv_heads, widths[1])
        else:
            q, k = (_feature_map(part.view(batch, length, -1, width).transpose(1, 2), self.config.feature_map)
                    for part, width in ((zq, widths[0]), (zk, widths[1])))
        v = v.view(batch, length, -1, widths[2]).transpose(1, 2)
        k, v = self._repeat(k, v)
        if padding_mask is not None:
            keep = padding_mask.to(x.dtype).view(batch, 1, length, 1)
            k, v = k * keep, v * keep
        numerator = q @ (k.transpose(-1, -2) @ v)                      # [B, H, N, d]
        normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # [B, H, N, 1]
        y = numerator / (normaliser + _EPS)
        if padding_mask is not None:
            y = y * keep
        return y.transpose(1, 2).reshape(batch, length, -1)

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={self.shape.num_heads}, kv_heads={self.kv_heads}, feature_map={c.feature_map}, "
                f"features={self.feature_count}, decay={c.decay}, window={c.window}, rotary={self.rotary}, "
                f"causal={self.shape.causal}")


__all__ = ["GatedLinearAttention", "GatedLinearAttentionDecoding", "GatedLinearAttentionPruner",
           "LinearAttentionConfig", "attention_projections",
           "copy_attention_weights", "copy_projections", "causal_chunks"]
