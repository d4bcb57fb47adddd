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

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import PruningError, SurgeryError
from surgery.registry import MixerShape, ReplacementConfig, TeacherEvidence, register_replacement
from surgery.units import Bundle, ReplacementPruner, UnitSet, cut_linear, score_units, shrink

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
        kv_heads: key/value heads (grouped-query attention); 0 = as many as query heads. A
            teacher with fewer key/value heads also fits 0: its heads are repeated.
        chunk_size: tokens per chunk of the causal training form (the work per chunk is
            quadratic in it, the number of chunks is the Python loop).
    """

    feature_map: str = "hedgehog"
    feature_dim: int = 0
    decay: bool = False
    kv_heads: int = 0
    chunk_size: int = 64


def _features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of per-head inputs x [B, H, N, d] through per-head maps weight [H, d, f], bias [H, f]."""
    z = torch.einsum("bhnd,hdf->bhnf", x, weight) + bias.unsqueeze(1)
    if kind == "hedgehog":
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
    return F.elu(z) + 1


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


class GatedLinearAttentionDecoding:
    """Decoding form of ``linear`` at causal sites: the state is one tensor per site,
    ``sum_j gamma**(t-j) phi(k_j) [v_j, 1]^T`` per head [B, heads, features, head_dim + 1] (the
    running sum of keys times values and, in the last column, the normaliser), whatever the length.
    Prefill and step are the sequence form continued from that state.
    """

    def init_state(self, mixer: "GatedLinearAttention", batch: int) -> tuple[torch.Tensor]:
        self._check(mixer)
        reference = mixer.q.weight
        return (reference.new_zeros(batch, mixer.shape.num_heads, mixer.feature_count, mixer.head_dim + 1),)

    def _check(self, mixer: "GatedLinearAttention") -> None:
        if not mixer.shape.causal:
            raise SurgeryError("a bidirectional linear mixer (encoder site) has no decoding form (it reads later "
                               "tokens); only causal sites decode token by token")

    def prefill(self, mixer: "GatedLinearAttention", x: torch.Tensor, mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        self._check(mixer)
        y, new = mixer.sequence(x, mask, None if state is None else state[0])
        return y, (new,)

    def step(self, mixer: "GatedLinearAttention", x_t: torch.Tensor,
             state: tuple[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        """One token ``x_t`` [B, 1, D] -> (output [B, 1, C], new state)."""
        return self.prefill(mixer, x_t, None, state)


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


def copy_projections(mixer: "GatedLinearAttention", original: nn.Module, site: str = "?") -> None:
    """Copy the original block's query/key/value projections into ``mixer`` (in place); a teacher with
    fewer key/value heads than the mixer has them repeated per group (grouped-query attention).

    Args:
        mixer: a ``GatedLinearAttention``.
        original: the attention block it replaces.
        site: the site's name, for the error.

    Raises:
        SurgeryError: the projections cannot be read, or their shapes do not fit the mixer.
    """
    read = attention_projections(original, mixer.shape.output_dim)
    if read is None or _normed(original):
        why = "normalises its queries/keys after projecting them" if read is not None else \
            "has no query/key/value projections linear can read (qkv, query/key/value, q_proj/k_proj/v_proj, c_attn)"
        raise SurgeryError(f"site {site!r} ({type(original).__name__}) {why}; distill linear with init='none' "
                           "(--distill-set init=none) or choose another replacement (mhlstm, gru, conv)")
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


def init_from_teacher(mixer: "GatedLinearAttention", evidence: TeacherEvidence) -> list[float] | None:
    """Copy the original attention's q/k/v into the mixer; feature maps stay at their identity start
    and decays at their spread. Returns the decays per head (empty without decay)."""
    original = getattr(evidence, "original", None)
    if original is None:
        return None  # the evidence carries only the value projection: nothing to copy q/k from
    site = getattr(evidence, "site", None)
    copy_projections(mixer, original, getattr(site, "name", "?"))
    return [] if mixer.decay_logit is None else [round(float(g), 6) for g in torch.sigmoid(mixer.decay_logit)]


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
    """Linear attention from the site's own q/k/v with a learned feature map and optional per-head decay."""

    def __init__(self, shape: MixerShape, config: LinearAttentionConfig) -> None:
        super().__init__()
        heads, context = shape.num_heads, shape.output_dim
        if heads < 1 or context % heads:
            raise ValueError(f"linear needs the context width ({context}) divisible by the heads ({heads})")
        if config.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {config.feature_map!r}; use one of {list(FEATURE_MAPS)}")
        groups = config.kv_heads or heads
        if groups < 1 or heads % groups:
            raise ValueError(f"kv_heads={config.kv_heads} must divide the {heads} heads")
        if config.chunk_size < 1 or config.feature_dim < 0:
            raise ValueError("linear needs chunk_size >= 1 and feature_dim >= 0")
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

    @property
    def feature_count(self) -> int:
        width = self.q_map.shape[-1]
        return 2 * width if self.config.feature_map == "hedgehog" else width

    def _heads(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        batch, length, _ = x.shape
        return layer(x).view(batch, length, -1, self.head_dim).transpose(1, 2)

    def sequence(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                 state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output [B, N, C] and (causal sites) the state after the last token, continuing ``state``."""
        batch, length, _ = x.shape
        kind = self.config.feature_map
        q = _features(self._heads(x, self.q), self.q_map, self.q_map_bias, kind)
        k = _features(self._heads(x, self.k), self.k_map, self.k_map_bias, kind)
        v = self._heads(x, self.v)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: the normaliser
        repeat = self.shape.num_heads // self.kv_heads
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        keep = None
        if padding_mask is not None:
            keep = padding_mask.to(x.dtype).view(batch, 1, length, 1)
            k, v = k * keep, v * keep
        log_decay = None if self.decay_logit is None else F.logsigmoid(self.decay_logit)
        chunk = self.config.chunk_size
        if self.shape.causal:
            out, state = causal_chunks(q, k, v, log_decay, chunk, state)
        elif log_decay is None:
            out, state = q @ (k.transpose(-1, -2) @ v), None
        else:  # both directions of the decayed sum; the token itself is in both
            forward, _ = causal_chunks(q, k, v, log_decay, chunk)
            backward, _ = causal_chunks(q.flip(2), k.flip(2), v.flip(2), log_decay, chunk)
            out, state = forward + backward.flip(2) - (q * k).sum(-1, keepdim=True) * v, None
        y = out[..., :-1] / (out[..., -1:] + _EPS)
        if keep is not None:
            y = y * keep
        return y.transpose(1, 2).reshape(batch, length, -1), state

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.sequence(x, padding_mask)[0]

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={self.shape.num_heads}, kv_heads={self.kv_heads}, feature_map={c.feature_map}, "
                f"features={self.feature_count}, decay={c.decay}, causal={self.shape.causal}")


__all__ = ["GatedLinearAttention", "GatedLinearAttentionDecoding", "GatedLinearAttentionPruner",
           "LinearAttentionConfig", "attention_projections",
           "copy_attention_weights", "copy_projections", "causal_chunks"]
