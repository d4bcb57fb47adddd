"""Stateful decoding of replaced causal sites: a fixed-size state per site instead of a KV cache.

Two ways to hold the states:

- **HuggingFace**: the model's own ``Cache``. The first cached call at a replaced site puts a
  ``SiteStateLayer`` (a transformers ``LinearAttentionAndFullAttentionLayer``) at the site's layer
  index; it keeps the replacement's state tensors (batch first, so ``reorder_cache``,
  ``batch_repeat_interleave`` and ``batch_select_indices`` work for beam search) and counts the
  tokens it has seen, so ``get_seq_length()`` / ``get_mask_sizes()`` report the positions the rest
  of the model derives from it. Attention layers left in a hybrid keep their KV layers in the same
  cache. ``model.generate(..., use_cache=True)`` then decodes token by token at constant cost.
- **Plain PyTorch**: ``with surgery.decoding.stateful(model) as state:``, then call the model on a
  prompt and on one token (or a chunk) at a time; each replaced site continues from its state.

Each replacement brings its ``DecodingForm`` (``surgery.registry``): ``prefill`` runs the sequence
form and returns the final state, ``step`` advances one token. A recurrent state cannot be rolled
back, cropped, or continued from a cache that was not built by this model: each is one
``SurgeryError`` line naming the site.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.registry import get_replacement

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_MASK_KWARGS = ("attention_mask", "attn_mask")


def decoding_form(wrapper: nn.Module) -> Any:
    """The ``DecodingForm`` of a replaced site, or None (no form registered, or a non-causal site)."""
    if not wrapper.site.causal:
        return None
    return get_replacement(wrapper.replacement).decoding


def _fix(site: str, reason: str) -> SurgeryError:
    return SurgeryError(f"site {site!r} {reason}")


# ----------------------------------------------------------------------------- the cache layer

_LAYER_CLASS: type | None = None


def _layer_class() -> type:
    """``SiteStateLayer``, built on first use (transformers is an optional dependency)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    from transformers.cache_utils import LinearAttentionAndFullAttentionLayer

    class SiteStateLayer(LinearAttentionAndFullAttentionLayer):
        """The cache layer of one replaced site: its state tensors (``recurrent_states``) and the
        number of tokens they summarise (what ``get_seq_length`` reports). It holds no keys or
        values; cropping or rolling it back is refused (a recurrent state cannot be undone)."""

        is_croppable = False
        is_sliding = False

        def __init__(self, wrapper: nn.Module) -> None:
            super().__init__(number_of_states=1)
            self.site = wrapper.site.name
            self.owner = weakref.ref(wrapper)
            self.seen = 0
            self.kept = True  # False: a call in training mode / with gradients kept no state

        def __repr__(self) -> str:
            return f"SiteStateLayer(site={self.site!r}, tokens={self.seen})"

        @property
        def state(self) -> tuple[torch.Tensor, ...] | None:
            if not self.is_recurrent_states_initialized.get(0):
                return None
            return tuple(self.recurrent_states[i] for i in range(self.number_of_states))

        def store(self, state: tuple[torch.Tensor, ...]) -> None:
            if self.is_recurrent_states_initialized.get(0) and self.number_of_states == len(state) \
                    and state[0].device == self.device and state[0].dtype == self.dtype:
                self.recurrent_states = dict(enumerate(state))  # a decode step: only the tensors change
                return
            self.number_of_states = len(state)
            self.recurrent_states = dict(enumerate(state))
            self.conv_states = dict.fromkeys(range(len(state)))
            self.is_recurrent_states_initialized = dict.fromkeys(range(len(state)), True)
            self.is_conv_states_initialized = dict.fromkeys(range(len(state)), False)
            self.has_previous_state = dict.fromkeys(range(len(state)), True)
            self.conv_kernel_size = dict.fromkeys(range(len(state)))
            self.device, self.dtype = state[0].device, state[0].dtype

        @property
        def batch_size(self) -> int:
            state = self.state
            return state[0].shape[0] if state else -1

        def get_seq_length(self) -> int:
            return self.seen

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.seen + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def _apply(self, change) -> None:
            state = self.state
            if state is not None:
                self.store(tuple(change(s) for s in state))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._apply(lambda s: s.index_select(0, beam_idx.to(s.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._apply(lambda s: s.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._apply(lambda s: s[indices, ...])

        def reset(self) -> None:
            self.is_recurrent_states_initialized = dict.fromkeys(range(self.number_of_states), False)
            self.recurrent_states = dict.fromkeys(range(self.number_of_states))
            self.has_previous_state = dict.fromkeys(range(self.number_of_states), False)
            self.seen = 0
            self.kept = True

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove == 0 or (tokens_to_remove > 0 and tokens_to_remove >= self.seen):
                return  # nothing removed (a positive value is the length to keep)
            raise _fix(self.site, f"holds a recurrent state of {self.seen} tokens, which cannot be cropped or "
                       "rolled back; decode again from the prompt with a fresh cache")

        def activate_past_recording(self) -> None:
            raise _fix(self.site, "holds a recurrent state, which cannot record its past for a later "
                       "rollback (assisted decoding); generate without an assistant model")

    _LAYER_CLASS = SiteStateLayer
    return SiteStateLayer


# ------------------------------------------------------------------------ plain PyTorch states

class DecodingState:
    """The states of a model's replaced causal sites for plain-PyTorch decoding (``stateful``).

    Attributes:
        tokens: tokens seen so far (the same at every site).
    """

    def __init__(self, model: nn.Module) -> None:
        # keyed by site name: a tracer (torch.export) may run copies of the site modules
        self._sites: dict[str, tuple | None] = {}
        self._seen: dict[str, int] = {}
        self._wrappers: dict[str, nn.Module] = {}
        for module in model.modules():
            if getattr(module, "is_replaced_site", False):
                if decoding_form(module) is None:
                    raise _fix(module.site.name, f"({module.replacement!r}, causal={module.site.causal}) has no "
                               "decoding form: only causal sites of replacements with one decode token by token")
                name = module.site.name
                self._sites[name], self._seen[name], self._wrappers[name] = None, 0, module
        if not self._sites:
            raise SurgeryError(f"{type(model).__name__} has no replaced sites; replace its attention first "
                               "(surgery.replace_attention)")

    @property
    def tokens(self) -> int:
        return max(self._seen.values())

    def reset(self) -> None:
        """Forget every state (the next call is a new prompt)."""
        for site in self._sites:
            self._sites[site], self._seen[site] = None, 0

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the beams chosen by a search."""
        for site, state in self._sites.items():
            if state is not None:
                self._sites[site] = tuple(s.index_select(0, indices.to(s.device)) for s in state)

    @property
    def nbytes(self) -> int:
        """Bytes held by all states (independent of the context length)."""
        return sum(s.numel() * s.element_size() for state in self._sites.values() if state for s in state)


_ACTIVE: contextvars.ContextVar[DecodingState | None] = contextvars.ContextVar("surgery_decoding", default=None)


@contextlib.contextmanager
def stateful(model: nn.Module) -> Iterator[DecodingState]:
    """Decode a replaced (non-HuggingFace) causal model token by token.

    Inside the block every replaced causal site keeps its state between calls: call the model on the
    prompt, then on each new token (or a chunk of them); positions are the caller's business.
    Every token mixer of the model must be a replaced site (other attention would need its own
    cache). Inference only: no gradients flow between calls.

    Example:
        >>> import torch, surgery
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        >>> model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        >>> mask = torch.nn.Transformer.generate_square_subsequent_mask(6)
        >>> _ = surgery.replace_attention(model, "gru", ((torch.randn(1, 6, 16),),
        ...                                               {"mask": mask, "is_causal": True}))
        >>> x = torch.randn(1, 6, 16)
        >>> with torch.no_grad(), surgery.decoding.stateful(model) as state:
        ...     first = model(x[:, :4])
        ...     last = torch.cat([model(x[:, i:i + 1]) for i in (4, 5)], dim=1)
        >>> state.tokens
        6
    """
    state = DecodingState(model)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


# -------------------------------------------------------------------------------- the dispatch

def _new_valid(kwargs: dict, tokens: int) -> torch.Tensor | None:
    """Validity [B, N] of the N new tokens from a 2-D [B, K] or 4-D [B, 1, N, K] mask whose last N
    key columns are the new tokens; None = all real."""
    mask = next((kwargs[k] for k in _MASK_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if mask is None or mask.dim() not in (2, 4) or mask.shape[-1] < tokens:
        return None
    mask = mask[..., mask.shape[-1] - tokens:]
    if mask.dim() == 2:
        valid = mask.bool()
    else:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        valid = allowed.any(dim=-2)[:, 0]
    return None if bool(valid.all()) else valid


def _run(form: Any, mixer: nn.Module, hidden: torch.Tensor, valid: torch.Tensor | None,
         state: tuple | None) -> tuple[torch.Tensor, tuple]:
    if valid is not None and bool(valid.all()):
        valid = None
    if hidden.shape[1] == 1 and valid is None:
        return form.step(mixer, hidden, state if state is not None else form.init_state(mixer, hidden.shape[0]))
    return form.prefill(mixer, hidden, valid, state)


def _start_position(kwargs: dict) -> int | None:
    """The position of the first new token where the call says it unambiguously, else None."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    position = kwargs.get("position_ids")
    if isinstance(position, torch.Tensor) and position.dim() == 2 and position.shape[0] == 1 and position.numel():
        return int(position[0, 0])
    return None


def _hf_layers(cache: Any) -> Any:
    inner = getattr(cache, "self_attention_cache", None)  # EncoderDecoderCache: the decoder's own
    return inner if inner is not None else cache


def site_call(wrapper: nn.Module, hidden: torch.Tensor, valid: torch.Tensor | None,
              kwargs: dict) -> torch.Tensor | None:
    """The mixer's output for a call that decodes (a ``stateful`` session, or a HuggingFace cache
    reaching a site with a decoding form), or None when the call is an ordinary one.

    Args:
        wrapper: the ``ReplacedAttention`` called.
        hidden: its hidden states [B, N, D] (the N new tokens).
        valid: the padding mask the site read for these N tokens (None = none, or not of length N).
        kwargs: the call's keyword arguments (cache, mask, positions).
    """
    # a DecodeStep pins its session on the sites (a tracer may run the model outside this context)
    pinned = wrapper.__dict__.get("_surgery_session")
    session = pinned or _ACTIVE.get()
    key = wrapper.site.name
    if session is not None and key in session._sites and (pinned is not None or session._wrappers[key] is wrapper):
        form = decoding_form(wrapper)
        state = session._sites[key]
        if state is not None and state[0].shape[0] != hidden.shape[0]:
            raise _fix(wrapper.site.name, f"holds states for a batch of {state[0].shape[0]}, got {hidden.shape[0]} "
                       "rows; state.reset() for a new batch, or state.select(rows) to keep some")
        with torch.no_grad():
            output, state = _run(form, wrapper.mixer, hidden, valid, state)
        session._sites[key] = state
        session._seen[key] += hidden.shape[1]
        return output
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None or not hasattr(_hf_layers(cache), "layers"):
        return None
    form = decoding_form(wrapper)
    if form is None:
        return None
    return _cached_call(wrapper, form, _hf_layers(cache), hidden, valid, kwargs)


def _cached_call(wrapper: nn.Module, form: Any, cache: Any, hidden: torch.Tensor, sequence_valid: torch.Tensor | None,
                 kwargs: dict) -> torch.Tensor:
    site = wrapper.site.name
    index = getattr(wrapper, "layer_idx", None)
    if not isinstance(index, int):
        raise _fix(site, "has no layer_idx, so the model's cache has no place for its state; call the model "
                   "with use_cache=False")
    layer_class = _layer_class()
    tokens = hidden.shape[1]
    layer = cache.layers[index] if index < len(cache.layers) else None
    start = _start_position(kwargs)
    if isinstance(layer, layer_class):
        if layer.owner() is not wrapper:
            raise _fix(site, "got a cache built by another model (its state belongs to another replaced site); "
                       "pass this model's own cache, or none")
        if not layer.kept and layer.seen:
            raise _fix(site, f"kept no state for the {layer.seen} tokens of this cache (they ran in training mode "
                       "or with gradients); decode in eval mode under torch.no_grad(), or use_cache=False")
        state = layer.state
        if state is not None and state[0].shape[0] != hidden.shape[0]:
            raise _fix(site, f"holds states for a batch of {state[0].shape[0]}, got {hidden.shape[0]} rows; "
                       "pass a fresh cache for a new batch")
    else:
        filled = layer is not None and layer.get_seq_length() > 0
        if filled or (start is not None and start > 0):
            what = f"a filled KV cache ({layer.get_seq_length()} tokens)" if filled else \
                f"tokens at position {start} but holds no state"
            raise _fix(site, f"got {what}: the cache was not built for its replacement (another model's, or filled "
                       "before surgery); pass a fresh cache, or none (use_cache=False)")
        layer = layer_class(wrapper)
        while len(cache.layers) <= index:
            maker = getattr(cache, "layer_class_to_replicate", None)
            from transformers.cache_utils import DynamicLayer

            cache.layers.append((maker or DynamicLayer)())
        cache.layers[index] = layer
        state = None
    if start is not None and start != layer.seen:
        raise _fix(site, f"holds a recurrent state after {layer.seen} tokens but got tokens from position {start}: "
                   "a recurrent state cannot be rolled back or skip ahead; decode again from the prompt with a "
                   "fresh cache")
    valid = _new_valid(kwargs, tokens)
    learning = wrapper.mixer.training or (torch.is_grad_enabled()
                                          and any(p.requires_grad for p in wrapper.mixer.parameters()))
    if learning and state is None:
        # an ordinary training call that happens to carry a cache (HF's use_cache default): the
        # mixer's own training form; nothing is kept, and continuing from this cache is refused
        layer.kept = False
        layer.seen += tokens
        return wrapper.mixer(hidden, sequence_valid)
    output, state = _run(form, wrapper.mixer, hidden, valid, state)
    layer.store(tuple(s.detach() for s in state))
    layer.seen += tokens
    return output


def state_bytes(cache: Any) -> int:
    """Bytes the replaced sites' states take in a HuggingFace cache (KV layers not counted)."""
    layer_class = _layer_class()
    total = 0
    for layer in _hf_layers(cache).layers:
        if isinstance(layer, layer_class) and layer.state:
            total += sum(s.numel() * s.element_size() for s in layer.state)
    return total


def kv_bytes(cache: Any) -> int:
    """Bytes of the keys and values in a HuggingFace cache (replaced sites' states not counted)."""
    total = 0
    for layer in _hf_layers(cache).layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------------ measuring decode speed

def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_keyword(model: nn.Module) -> str:
    return "cache" if _accepts(model, "cache") else "past_key_values"  # transformers 5.x renamed it


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def prefill(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Run a HuggingFace causal LM on a prompt with its cache on; what ``time_steps`` continues from.

    Only the last position's logits are computed where the model takes ``logits_to_keep`` (a long
    prompt's full logits would take vocabulary x tokens of memory).

    Returns:
        ``{"cache", "token": the greedy next token [B, 1], "prefill_s", "kv_bytes", "state_bytes",
        "context": T, "batch": B}``.
    """
    import time

    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with torch.no_grad():
        began = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, **extra)
        seconds = time.perf_counter() - began
    cache = _returned_cache(out)
    if cache is None:
        raise SurgeryError(f"{type(model).__name__} returned no cache from use_cache=True; decode timing "
                           "measures decoding with the model's own cache")
    return {"cache": cache, "token": out.logits[:, -1:].argmax(-1), "prefill_s": round(seconds, 3),
            "kv_bytes": kv_bytes(cache), "state_bytes": state_bytes(cache),
            "context": int(input_ids.shape[1]), "batch": int(input_ids.shape[0])}


def time_steps(models: dict[str, nn.Module], prefilled: dict[str, dict], steps: int = 16,
               batch: int | None = None) -> dict[str, dict]:
    """Time ``steps`` greedy decode steps of each model from its ``prefill``, the models interleaved.

    The models take turns at every step, so load on the machine hits them alike; the first step is
    a warm-up, left out of the median. The prefilled caches are copied, never advanced, so one
    prefill serves several calls.

    Args:
        models: name -> causal LM in eval mode.
        prefilled: name -> what ``prefill`` returned for that model.
        steps: decode steps per model (at least 2).
        batch: decode this many rows, each a copy of the prefilled rows (``batch_repeat_interleave``
            of the cache: a batch-1 prefill serves batch 8); None = the prefilled batch.

    Returns:
        name -> ``{"ms_per_token": median ms of steps 2.., "ms_steps", "prefill_s", "kv_bytes" and
        "state_bytes" (of the cache decoded from, at this batch), "context", "batch", "generated": the
        greedy tokens of row 0 (the prefill's next token, then one per step)}``.
    """
    import copy
    import statistics
    import time

    if steps < 2:
        raise SurgeryError(f"decode timing needs steps >= 2 (the first is a warm-up), got {steps}")
    caches, tokens, rows = {}, {}, {}
    for name in models:
        start = prefilled[name]
        cache, token = copy.deepcopy(start["cache"]), start["token"]
        repeat = 1 if batch is None else batch // start["batch"]
        if batch is not None and (batch < 1 or repeat * start["batch"] != batch):
            raise SurgeryError(f"batch {batch} is not a multiple of the prefilled batch {start['batch']}")
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
            token = token.repeat_interleave(repeat, dim=0)
        caches[name], tokens[name] = cache, token
        rows[name] = {"context": start["context"], "batch": start["batch"] * repeat, "prefill_s": start["prefill_s"],
                      "kv_bytes": kv_bytes(cache), "state_bytes": state_bytes(cache), "ms_steps": [],
                      "generated": [int(token[0, 0])]}
    keywords = {name: _cache_keyword(model) for name, model in models.items()}
    with torch.no_grad():
        for _ in range(steps):
            for name, model in models.items():
                began = time.perf_counter()
                out = model(input_ids=tokens[name], use_cache=True, **{keywords[name]: caches[name]})
                rows[name]["ms_steps"].append(round(1000 * (time.perf_counter() - began), 3))
                caches[name], tokens[name] = _returned_cache(out), out.logits[:, -1:].argmax(-1)
                rows[name]["generated"].append(int(tokens[name][0, 0]))
    for row in rows.values():
        row["ms_per_token"] = round(statistics.median(row["ms_steps"][1:]), 3)
    return rows


def time_decoding(models: dict[str, nn.Module], input_ids: torch.Tensor, steps: int = 16) -> dict[str, dict]:
    """Per-token greedy decode latency of HuggingFace causal LMs with their own caches, interleaved:
    ``prefill`` each on ``input_ids``, then ``time_steps``.

    Args:
        models: name -> model in eval mode (e.g. ``{"attention": original, "mhlstm": replaced}``).
        input_ids: the prompt [B, T] (the context the decode steps run after).
        steps: decode steps timed per model (at least 2; the first is a warm-up).

    Returns:
        name -> ``{"ms_per_token", "ms_steps", "prefill_s", "kv_bytes", "state_bytes", "context", "batch"}``.

    Example:
        >>> import torch, transformers, surgery
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> row = surgery.decoding.time_decoding({"attention": model}, torch.randint(0, 64, (1, 16)), steps=3)
        >>> row["attention"]["kv_bytes"]  # 2 layers x (keys + values) x 1 KV head x 16 dim x 16 tokens x 4 bytes
        4096
    """
    if steps < 2:
        raise SurgeryError(f"decode timing needs steps >= 2 (the first is a warm-up), got {steps}")
    return time_steps(models, {name: prefill(model, input_ids) for name, model in models.items()}, steps)


# ------------------------------------------------------------------------- an exportable step

class DecodeStep(nn.Module):
    """One decode step of a replaced plain-PyTorch causal model with its states as explicit tensors:
    ``forward(x_t, *states) -> (y_t, *new_states)``, for ``torch.export`` / ONNX (the states are
    graph inputs and outputs, so a runtime carries them between calls).

    Args:
        model: a model whose token mixers are all replaced causal sites (as for ``stateful``).

    Example:
        >>> import torch, surgery
        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        >>> model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
        >>> mask = torch.nn.Transformer.generate_square_subsequent_mask(4)
        >>> _ = surgery.replace_attention(model, "gru", ((torch.randn(1, 4, 16),), {"mask": mask, "is_causal": True}))
        >>> step = surgery.decoding.DecodeStep(model)
        >>> y, *states = step(torch.randn(1, 1, 16), *step.initial_states(1))
        >>> y.shape, len(states)
        (torch.Size([1, 1, 16]), 1)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        probe = DecodingState(model)
        self._sites = list(probe._wrappers.values())
        self._counts = []
        for wrapper in self._sites:
            self._counts.append(len(decoding_form(wrapper).init_state(wrapper.mixer, 1)))

    def initial_states(self, batch: int) -> list[torch.Tensor]:
        """The empty states, flat, in the order ``forward`` takes them."""
        return [s for wrapper in self._sites for s in decoding_form(wrapper).init_state(wrapper.mixer, batch)]

    def forward(self, x_t: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(states) != sum(self._counts):
            raise SurgeryError(f"DecodeStep takes {sum(self._counts)} state tensors after the input, got {len(states)}; "
                               "start from step.initial_states(batch)")
        session = DecodingState(self.model)
        offset = 0
        for wrapper, count in zip(self._sites, self._counts):
            session._sites[wrapper.site.name] = tuple(states[offset:offset + count])
            offset += count
        for wrapper in self._sites:
            object.__setattr__(wrapper, "_surgery_session", session)
        try:
            y = self.model(x_t)
        finally:
            for wrapper in self._sites:
                wrapper.__dict__.pop("_surgery_session", None)
        return (y, *[s for wrapper in self._sites for s in session._sites[wrapper.site.name]])
