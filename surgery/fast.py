"""Fast inference for the multi-head recurrent replacements (``mhlstm``, ``gru``).

``optimize(model)`` swaps every ``MultiHeadRecurrent`` mixer for a ``FastMultiHeadRecurrent`` that
computes the same function with far less overhead at small batch sizes:

- the input projections of all heads, directions and time steps are one batched matmul
  (``baddbmm`` over heads), as is the per-head output projection;
- the recurrences of all heads and both directions run in ONE native call (a small C++ kernel
  compiled on first use with ``torch.utils.cpp_extension``, cached afterwards), spread over torch's
  intra-op threads; a step is only ``h @ W_hh^T`` plus vectorised gate nonlinearities;
- weights are rearranged once, at conversion time (transposed, stacked, zero-padded so heads pruned
  to different sizes share one layout without changing any value).

Without a C++ compiler the same layout runs through a PyTorch loop (correct, not fast); see
``kernel_status()``. The fast form is for inference: convert after loading or training, not before
saving (its tensors are buffers, not the training parameters).
"""

from __future__ import annotations

_KERNEL_SOURCE = r'''
// Recurrence of many small independent LSTMs/GRUs (heads x directions) in one native call.
//
// At batch 1 a multi-head recurrent mixer is dominated by per-step overhead, not FLOPs: every head
// and direction is a separate 197-step loop of tiny mat-vecs. This kernel runs all of them in one
// call, spread over torch's intra-op threads (at::parallel_for), with the input projections for
// every step already done as one batched matmul outside, so a step is only h @ W_hh^T plus the gate
// nonlinearities (vectorised through libmvec: compiled with -ffast-math, never linked with it).
//
// Layouts (U = heads * directions, unit u = head * D + direction, P = padded hidden size):
//   xg   [K, B, T, D, G*P]  input gates incl. b_ih (zeros in padded slots)
//   whh  [U, P, G*P]        W_hh transposed and zero-padded; bhh [U, G*P]
//   out  [K, B, T, D, P]    hidden states (zeros at padded tokens and padded units)
// Padded hidden units stay exactly zero (zero weights and biases keep c = 0 and h = 0), so heads
// of different sizes after pruning share one layout without changing any real value.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// 8 floats: GCC/Clang map it to one AVX register (or two SSE ones); aligned(4) allows unaligned loads
typedef float v8 __attribute__((vector_size(32), aligned(4)));

// acc[0:8*NV] = bias[...] + sum_i h[i] * w[i, 0:8*NV] with the accumulators held in registers
// across the whole i loop (a plain loop would load and store acc for every i).
template <int NV>
inline void matvec_tile(const float* __restrict w, const float* __restrict h, const float* __restrict bias,
                        float* __restrict acc, int64_t hidden, int64_t row_stride) {
  v8 a[NV];
  for (int v = 0; v < NV; ++v) a[v] = *reinterpret_cast<const v8*>(bias + 8 * v);
  for (int64_t i = 0; i < hidden; ++i) {
    const float hi = h[i];
    const float* __restrict row = w + i * row_stride;
    for (int v = 0; v < NV; ++v) a[v] += hi * *reinterpret_cast<const v8*>(row + 8 * v);
  }
  for (int v = 0; v < NV; ++v) *reinterpret_cast<v8*>(acc + 8 * v) = a[v];
}

template <bool IS_LSTM>
inline void gates(const float* __restrict x, const float* __restrict a, float* __restrict hp,
                  float* __restrict cp, float* __restrict o, int64_t P) {
  if (IS_LSTM) {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) {
      const float ig = sigmoid(x[j] + a[j]);
      const float fg = sigmoid(x[P + j] + a[P + j]);
      const float gg = tanhf(x[2 * P + j] + a[2 * P + j]);
      const float og = sigmoid(x[3 * P + j] + a[3 * P + j]);
      const float cj = fg * cp[j] + ig * gg;
      cp[j] = cj;
      const float hj = og * tanhf(cj);
      hp[j] = hj;
      o[j] = hj;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < P; ++j) {
      const float rg = sigmoid(x[j] + a[j]);
      const float zg = sigmoid(x[P + j] + a[P + j]);
      const float ng = tanhf(x[2 * P + j] + rg * a[2 * P + j]);
      const float hj = (1.f - zg) * ng + zg * hp[j];
      hp[j] = hj;
      o[j] = hj;
    }
  }
}

// One unit (head, direction) for a group of samples advanced in lockstep: W_hh is walked tile by
// tile and each tile (64 gate columns x hidden rows, <= 16 KiB) serves every sample of the group
// from L1, instead of streaming the whole matrix from L2 once per sample and step.
template <bool IS_LSTM>
void run_group(const float* __restrict xg, const float* __restrict whh, const float* __restrict bhh,
               float* __restrict out, int64_t samples, const int64_t* lengths, bool reverse,
               int64_t hidden, int64_t P, int64_t x_step, int64_t o_step, int64_t x_sample,
               int64_t o_sample) {
  constexpr int64_t G = IS_LSTM ? 4 : 3;
  const int64_t GP = G * P;  // a multiple of 8: P is padded to a multiple of 8
  std::vector<float> acc(samples * GP), h(samples * P, 0.f), c(samples * P, 0.f);
  int64_t longest = 0;
  for (int64_t b = 0; b < samples; ++b) longest = std::max(longest, lengths[b]);
  for (int64_t s = 0; s < longest; ++s) {
    int64_t r = 0;
    for (; r + 64 <= GP; r += 64)
      for (int64_t b = 0; b < samples; ++b)
        if (s < lengths[b]) matvec_tile<8>(whh + r, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden, GP);
    for (; r < GP; r += 8)
      for (int64_t b = 0; b < samples; ++b)
        if (s < lengths[b]) matvec_tile<1>(whh + r, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden, GP);
    for (int64_t b = 0; b < samples; ++b) {
      if (s >= lengths[b]) continue;
      const int64_t t = reverse ? lengths[b] - 1 - s : s;
      gates<IS_LSTM>(xg + b * x_sample + t * x_step, acc.data() + b * GP, h.data() + b * P,
                     c.data() + b * P, out + b * o_sample + t * o_step, P);
    }
  }
}

}  // namespace

// xg [K, B, T, D, G*P]; whh [U, P, G*P]; bhh [U, G*P]; sizes [U] (real hidden size per unit);
// lengths [B] int64 (real tokens, right padded) or an empty tensor for "all T".
torch::Tensor recurrence(torch::Tensor xg, torch::Tensor whh, torch::Tensor bhh, torch::Tensor sizes,
                         torch::Tensor lengths, bool is_lstm) {
  TORCH_CHECK(xg.dim() == 5 && xg.is_contiguous() && xg.scalar_type() == torch::kFloat,
              "xg must be a contiguous float32 [K, B, T, D, G*P] tensor");
  const int64_t K = xg.size(0), B = xg.size(1), T = xg.size(2), D = xg.size(3);
  const int64_t G = is_lstm ? 4 : 3;
  const int64_t P = xg.size(4) / G;
  TORCH_CHECK(P % 8 == 0, "the padded hidden size must be a multiple of 8");
  TORCH_CHECK(whh.is_contiguous() && whh.size(0) == K * D && whh.size(1) == P && whh.size(2) == G * P,
              "whh must be contiguous [heads*directions, P, G*P]");
  TORCH_CHECK(bhh.is_contiguous() && bhh.size(0) == K * D && bhh.size(1) == G * P, "bad bhh shape");
  auto out = torch::zeros({K, B, T, D, P}, xg.options());
  auto sizes_a = sizes.accessor<int64_t, 1>();
  const bool has_lengths = lengths.numel() > 0;
  std::vector<int64_t> len(B, T);
  if (has_lengths) {
    auto l = lengths.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) len[b] = l[b];
  }
  const float* xp = xg.data_ptr<float>();
  const float* wp = whh.data_ptr<float>();
  const float* bp = bhh.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t x_step = D * G * P, o_step = D * P;
  // one work item = one (head, direction) and a group of up to 4 samples: independent recurrences
  constexpr int64_t GROUP = 4;
  const int64_t groups = (B + GROUP - 1) / GROUP;
  const int64_t x_sample = T * x_step, o_sample = T * o_step;
  at::parallel_for(0, K * D * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, unit = item / groups, k = unit / D, d = unit % D;
      const int64_t b0 = g * GROUP, samples = std::min(GROUP, B - b0);
      const float* x = xp + ((k * B + b0) * T * D + d) * G * P;
      float* o = op + ((k * B + b0) * T * D + d) * P;
      const float* w = wp + unit * P * G * P;
      const float* bb = bp + unit * G * P;
      if (is_lstm)
        run_group<true>(x, w, bb, o, samples, len.data() + b0, d == 1, sizes_a[unit], P, x_step,
                        o_step, x_sample, o_sample);
      else
        run_group<false>(x, w, bb, o, samples, len.data() + b0, d == 1, sizes_a[unit], P, x_step,
                         o_step, x_sample, o_sample);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recurrence", &recurrence, "multi-head multi-direction LSTM/GRU recurrence (inference)");
}
'''

import os
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from replacements.recurrent import MultiHeadRecurrent, _is_right_padded
from surgery.errors import SurgeryError

__all__ = ["FastMultiHeadRecurrent", "FastTokenConvolution", "kernel_status", "optimize"]

_KERNEL_NAME = "surgery_fast_recurrent_v3"
_kernel_lock = threading.Lock()
_kernel: Any = None
_kernel_error: str | None = None


def _load_kernel() -> Any:
    """The compiled kernel module, or None (the reason is kept for ``kernel_status``)."""
    global _kernel, _kernel_error
    with _kernel_lock:
        if _kernel is not None or _kernel_error is not None:
            return _kernel
        if os.environ.get("SURGERY_FAST_KERNEL", "1") == "0":
            _kernel_error = "disabled by SURGERY_FAST_KERNEL=0"
            return None
        import logging

        # importing cpp_extension warns "No CUDA runtime is found" on CPU machines: not our concern
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load_inline

            # -ffast-math only when compiling (it lets GCC call libmvec's vector expf/tanhf); the
            # link line never sees it, so crtfastmath's flush-to-zero is not set for the process
            _kernel = load_inline(name=f"{_KERNEL_NAME}_{_cpu_fingerprint()}", cpp_sources=[_KERNEL_SOURCE],
                                  extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:  # no compiler, no headers, ...: the PyTorch loop still works
            lines = str(error).strip().splitlines()
            _kernel_error = f"{type(error).__name__}: {lines[-1] if lines else ''}"
        finally:
            cpp_logger.setLevel(level)
        return _kernel


def _cpu_fingerprint() -> str:
    """Short hash of the CPU model and its instruction-set flags and of torch's version: the kernel
    is built with -march=native, so a build cache shared by different CPUs must not mix builds."""
    import hashlib
    import platform

    identity = [platform.machine(), torch.__version__]
    try:
        with open("/proc/cpuinfo") as handle:
            identity += sorted({line for line in handle if line.startswith(("model name", "flags"))})
    except OSError:
        identity.append(platform.processor())
    return hashlib.sha256("".join(identity).encode()).hexdigest()[:10]


def kernel_status() -> dict[str, Any]:
    """Whether the native recurrence kernel is available (compiling it on first call).

    Example:
        >>> sorted(kernel_status())
        ['available', 'error']
    """
    kernel = _load_kernel()
    return {"available": kernel is not None, "error": _kernel_error}


def _recurrence_torch(xg: torch.Tensor, whh: torch.Tensor, bhh: torch.Tensor,
                      lengths: torch.Tensor | None, is_lstm: bool) -> torch.Tensor:
    """The kernel's computation in plain PyTorch: a step loop with all units in one bmm."""
    K, B, T, D, GP = xg.shape
    P = whh.shape[1]
    out = xg.new_zeros(K, B, T, D, P)
    units = K * D
    for b in range(B):
        length = T if lengths is None else int(lengths[b])
        seq = xg[:, b, :length]  # [K, L, D, GP]
        if D == 2:
            seq = torch.stack([seq[:, :, 0], seq[:, :, 1].flip(1)], dim=2)
        seq = seq.permute(1, 0, 2, 3).reshape(length, units, GP)
        h = xg.new_zeros(units, P)
        c = xg.new_zeros(units, P)
        states = []
        for t in range(length):
            a = bhh + torch.bmm(h.unsqueeze(1), whh).squeeze(1)
            x = seq[t]
            if is_lstm:
                i, f, g, o = (x + a).split(P, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = x.split(P, dim=1)
                ar, az, an = a.split(P, dim=1)
                r, z = torch.sigmoid(xr + ar), torch.sigmoid(xz + az)
                h = (1 - z) * torch.tanh(xn + r * an) + z * h
            states.append(h)
        hs = torch.stack(states).view(length, K, D, P).permute(1, 0, 2, 3)
        if D == 2:
            hs = torch.stack([hs[:, :, 0], hs[:, :, 1].flip(1)], dim=2)
        out[:, b, :length] = hs
    return out


class FastMultiHeadRecurrent(nn.Module):
    """Inference form of a ``MultiHeadRecurrent`` mixer (``mhlstm``/``gru``): same function, batched
    projections, one native call for every head's and direction's recurrence.

    Args:
        source: the trained mixer; its pre-projection is shared, its recurrent and output weights
            are copied into stacked, transposed, zero-padded buffers.
        use_kernel: run the compiled kernel (default when it is available) or the PyTorch loop.

    Example:
        >>> from replacements.mhlstm import MultiHeadLSTM, MultiHeadLSTMConfig
        >>> from surgery.registry import MixerShape
        >>> mixer = MultiHeadLSTM(MixerShape(16, 16, 2, False), MultiHeadLSTMConfig()).eval()
        >>> fast = FastMultiHeadRecurrent(mixer, use_kernel=False)
        >>> x = torch.randn(1, 5, 16)
        >>> with torch.no_grad():
        ...     torch.allclose(fast(x), mixer(x), atol=1e-5)
        True
    """

    def __init__(self, source: MultiHeadRecurrent, use_kernel: bool | None = None,
                 projection: nn.Linear | None = None) -> None:
        super().__init__()
        rnns = [head.rnn for head in source.heads]
        kinds = {type(rnn) for rnn in rnns}
        if len(kinds) != 1 or not issubclass(kinds.pop(), (nn.LSTM, nn.GRU)):
            raise ValueError("every head must be an nn.LSTM or every head an nn.GRU")
        first = rnns[0]
        if any(getattr(rnn, "proj_size", 0) for rnn in rnns):
            raise ValueError("LSTMs with proj_size are not supported by the fast form")
        if any(rnn.num_layers != first.num_layers or rnn.bidirectional != first.bidirectional
               for rnn in rnns):
            raise ValueError("heads must share num_layers and bidirectional")
        self.is_lstm = isinstance(first, nn.LSTM)
        self.gates = 4 if self.is_lstm else 3
        self.directions = 2 if first.bidirectional else 1
        self.num_layers = first.num_layers
        self.bidirectional = source.bidirectional
        self.pre_proj = source.pre_proj
        self.use_kernel = use_kernel
        self.hidden_sizes = [rnn.hidden_size for rnn in rnns]
        self.input_sizes = [rnn.input_size for rnn in rnns]
        self.output_sizes = [head.out.out_features for head in source.heads]
        # a multiple of 8 floats, so the kernel's mat-vec runs in whole vector registers
        self.padded = -(-max(self.hidden_sizes) // 8) * 8
        reference = first.weight_ih_l0
        with torch.no_grad():
            for layer in range(self.num_layers):
                w_in, b_in, w_hh, b_hh = self._layer_weights(rnns, layer)
                self.register_buffer(f"w_in{layer}", w_in.to(reference))
                self.register_buffer(f"b_in{layer}", b_in.to(reference))
                self.register_buffer(f"w_hh{layer}", w_hh.to(reference))
                self.register_buffer(f"b_hh{layer}", b_hh.to(reference))
            w_out, b_out = self._output_weights(source)
            self.register_buffer("w_out", w_out.to(reference))
            self.register_buffer("b_out", b_out.to(reference))
            self.folded = projection is not None
            if projection is not None:
                # the per-head output Linears and the reused out-projection, multiplied out: one
                # GEMM from every head's hidden states straight to the block's output
                w_fold, b_fold = self._fold(w_out, b_out, projection)
                self.register_buffer("w_fold", w_fold.to(reference))
                self.register_buffer("b_fold", b_fold.to(reference))
        self.register_buffer("sizes", torch.tensor(
            [h for h in self.hidden_sizes for _ in range(self.directions)], dtype=torch.long),
            persistent=False)

    def _layer_weights(self, rnns: list[nn.RNNBase], layer: int) -> tuple[torch.Tensor, ...]:
        K, D, G, P = len(rnns), self.directions, self.gates, self.padded
        inputs = max(self.input_sizes) if layer == 0 else D * P
        w_in = torch.zeros(K, inputs, D * G * P)
        b_in = torch.zeros(K, 1, D * G * P)
        w_hh = torch.zeros(K * D, P, G * P)
        b_hh = torch.zeros(K * D, G * P)
        for k, rnn in enumerate(rnns):
            H = rnn.hidden_size
            for d in range(D):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                weight_ih = getattr(rnn, "weight_ih" + suffix).detach().float().cpu()
                weight_hh = getattr(rnn, "weight_hh" + suffix).detach().float().cpu()
                bias_ih = getattr(rnn, "bias_ih" + suffix, None) if rnn.bias else None
                bias_hh = getattr(rnn, "bias_hh" + suffix, None) if rnn.bias else None
                unit = k * D + d
                for g in range(G):
                    rows = slice(g * H, (g + 1) * H)
                    column = d * G * P + g * P
                    block = weight_ih[rows]  # [H, inputs of this head]
                    if layer == 0:
                        w_in[k, : block.shape[1], column: column + H] = block.T
                    else:  # input = previous layer's [forward H | backward H], padded to P each
                        for dd in range(D):
                            w_in[k, dd * P: dd * P + H, column: column + H] = block[:, dd * H:(dd + 1) * H].T
                    w_hh[unit, :H, g * P: g * P + H] = weight_hh[rows].T
                    if bias_ih is not None:
                        b_in[k, 0, column: column + H] = bias_ih.detach().float().cpu()[rows]
                        b_hh[unit, g * P: g * P + H] = bias_hh.detach().float().cpu()[rows]
        return w_in, b_in, w_hh.contiguous(), b_hh.contiguous()

    def _output_weights(self, source: MultiHeadRecurrent) -> tuple[torch.Tensor, torch.Tensor]:
        K, D, P = len(source.heads), self.directions, self.padded
        w_out = torch.zeros(K, D * P, max(self.output_sizes))
        b_out = torch.zeros(K, 1, max(self.output_sizes))
        for k, head in enumerate(source.heads):
            H = head.rnn.hidden_size
            weight = head.out.weight.detach().float().cpu()  # [O, D*H]
            for d in range(D):
                w_out[k, d * P: d * P + H, : weight.shape[0]] = weight[:, d * H:(d + 1) * H].T
            if head.out.bias is not None:
                b_out[k, 0, : weight.shape[0]] = head.out.bias.detach().float().cpu()
        return w_out, b_out

    def _fold(self, w_out: torch.Tensor, b_out: torch.Tensor,
              projection: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        weight = projection.weight.detach().double().cpu()  # [D_out, sum O_k]
        if weight.shape[1] != sum(self.output_sizes):
            raise ValueError("the projection does not read the concatenated head outputs")
        blocks, offset = [], 0
        bias = (projection.bias.detach().double().cpu() if projection.bias is not None
                else torch.zeros(weight.shape[0], dtype=torch.float64))
        for k, width in enumerate(self.output_sizes):
            part = weight[:, offset: offset + width]  # [D_out, O_k]
            blocks.append(w_out[k, :, :width].double() @ part.T)  # [D*P, D_out]
            bias = bias + b_out[k, 0, :width].double() @ part.T
            offset += width
        return torch.cat(blocks).float().contiguous(), bias.float()

    def _recurrence(self, xg: torch.Tensor, layer: int, lengths: torch.Tensor | None) -> torch.Tensor:
        w_hh, b_hh = getattr(self, f"w_hh{layer}"), getattr(self, f"b_hh{layer}")
        use_kernel = self.use_kernel if self.use_kernel is not None else True
        kernel = _load_kernel() if use_kernel and xg.device.type == "cpu" and xg.dtype == torch.float32 else None
        if kernel is not None:
            empty = torch.empty(0, dtype=torch.long)
            return kernel.recurrence(xg.contiguous(), w_hh, b_hh, self.sizes.cpu(),
                                     empty if lengths is None else lengths.cpu().long(), self.is_lstm)
        return _recurrence_torch(xg, w_hh, b_hh, lengths, self.is_lstm)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_proj(x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise SurgeryError("the fast recurrent form is inference-only (no gradients); run it under "
                               "torch.inference_mode() or torch.no_grad(), or train the original form")
        lengths = None
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
            if self.bidirectional and _is_right_padded(padding_mask):
                lengths = padding_mask.sum(1)
        B, T, _ = x.shape
        K, D, G, P = len(self.hidden_sizes), self.directions, self.gates, self.padded
        flat = x.reshape(B * T, -1)
        if len(set(self.input_sizes)) == 1:
            states = flat.view(B * T, K, self.input_sizes[0]).transpose(0, 1)
        else:
            width = max(self.input_sizes)
            states = torch.stack([F.pad(c, (0, width - c.shape[-1]))
                                  for c in flat.split(self.input_sizes, dim=-1)])
        for layer in range(self.num_layers):
            xg = torch.baddbmm(getattr(self, f"b_in{layer}"), states, getattr(self, f"w_in{layer}"))
            hidden = self._recurrence(xg.view(K, B, T, D, G * P), layer, lengths)
            states = hidden.view(K, B * T, D * P)
        if self.folded:
            flat_states = states.transpose(0, 1).reshape(B * T, K * D * P)
            return torch.addmm(self.b_fold, flat_states, self.w_fold).view(B, T, -1)
        y = torch.baddbmm(self.b_out, states, self.w_out)  # [K, B*T, O]
        if len(set(self.output_sizes)) == 1:
            return y.transpose(0, 1).reshape(B, T, -1)
        return torch.cat([y[k, :, :o] for k, o in enumerate(self.output_sizes)], dim=-1).view(B, T, -1)

    def extra_repr(self) -> str:
        kind = "lstm" if self.is_lstm else "gru"
        return (f"{kind}, heads={len(self.hidden_sizes)}, hidden={self.hidden_sizes}, "
                f"directions={self.directions}, layers={self.num_layers}, "
                f"projection_folded={self.folded}")


class FastTokenConvolution(nn.Module):
    """Inference form of ``conv`` (``TokenConvolution``): padding done inside the convolution when
    it is symmetric, and optionally the reused out-projection multiplied into the last Linear.

    Args:
        source: the trained mixer (its pre-projection and convolutions are shared, not copied).
        projection: the site's reused output projection to fold in (the wrapper then skips it).

    Example:
        >>> from replacements.conv import TokenConvolution, TokenConvolutionConfig
        >>> from surgery.registry import MixerShape
        >>> mixer = TokenConvolution(MixerShape(8, 8, 2, False), TokenConvolutionConfig()).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(FastTokenConvolution(mixer)(x), mixer(x), atol=1e-6)
        True
    """

    def __init__(self, source: nn.Module, projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.pre_proj = source.pre_proj
        self.convs = source.convs
        self.pads = source._pad()
        self.folded = projection is not None
        with torch.no_grad():
            weight, bias = source.out.weight.detach(), source.out.bias
            bias = bias.detach() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
            if projection is not None:
                p_bias = projection.bias.detach() if projection.bias is not None else 0
                weight, bias = (projection.weight.double() @ weight.double()).to(weight.dtype), (
                    projection.weight.double() @ bias.double() + p_bias).to(weight.dtype)
            self.out = nn.Linear(weight.shape[1], weight.shape[0]).to(weight)
            self.out.weight.copy_(weight)
            self.out.bias.copy_(bias)
        self.out.requires_grad_(False)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_proj(x)
        keep = None if padding_mask is None else padding_mask.unsqueeze(1).to(x.dtype)
        y = x.transpose(1, 2)
        left, right = self.pads
        for conv in self.convs:
            if keep is not None:
                y = y * keep
            if left == right:  # oneDNN pads inside the kernel: no padded copy of the sequence
                z = F.conv1d(y, conv.weight, conv.bias, padding=left, groups=conv.groups)
            else:
                z = conv(F.pad(y, (left, right)))
            y = F.gelu(z) + y
        return self.out(y.transpose(1, 2))


def _pad_hidden_linears(model: nn.Module, multiple: int = 8) -> int:
    """Pad pruned MLP hidden widths (``fc1`` -> activation -> ``fc2``, timm's ``Mlp``) to a multiple
    of ``multiple`` with zero rows in fc1 and zero columns in fc2; returns how many were padded.

    Exact: whatever the activation makes of the padded channels, fc2 multiplies it by zero. Odd
    widths left by pruning are slow in MKL: fc1 192 -> 379 took 0.53 ms against 0.35 ms for
    192 -> 384 (197 tokens, 1 thread); on a whole pruned DeiT-T the gain was within noise.
    """
    padded = 0
    for module in model.modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            continue
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            continue  # a norm over the hidden channels would see the padding
        width = fc1.out_features
        if fc2.in_features != width or width % multiple == 0:
            continue
        extra = multiple - width % multiple
        with torch.no_grad():
            grown1 = nn.Linear(fc1.in_features, width + extra, bias=fc1.bias is not None).to(fc1.weight)
            grown1.weight.zero_()
            grown1.weight[:width] = fc1.weight
            if fc1.bias is not None:
                grown1.bias.zero_()
                grown1.bias[:width] = fc1.bias
            grown2 = nn.Linear(width + extra, fc2.out_features, bias=fc2.bias is not None).to(fc2.weight)
            grown2.weight.zero_()
            grown2.weight[:, :width] = fc2.weight
            if fc2.bias is not None:
                grown2.bias.copy_(fc2.bias)
        module.fc1, module.fc2 = grown1.requires_grad_(False), grown2.requires_grad_(False)
        padded += 1
    return padded


def optimize(model: nn.Module, *, use_kernel: bool | None = None, fold_projection: bool = True,
             pad_mlp: bool = False) -> nn.Module:
    """Swap every ``mhlstm``/``gru``/``conv`` mixer in ``model`` (in place) for its fast inference form.

    Recurrent mixers get ``FastMultiHeadRecurrent`` (CPU float32 only: on GPUs the cuDNN recurrences
    are already fused), conv mixers ``FastTokenConvolution``. With ``fold_projection`` the site's
    reused output projection (a Linear) is multiplied into the mixer's last layer and the wrapper's
    projection becomes an identity: one GEMM less per block. With ``pad_mlp`` MLP widths left odd
    by pruning are zero-padded to a multiple of 8 (faster GEMMs, same outputs). Convert after training, pruning and
    loading: the fast forms have no gradients and save under other keys.

    Args:
        model: a model with replaced attention.
        use_kernel: force the native kernel (True) or the PyTorch loop (False); None = kernel if
            it compiles.
        fold_projection: fold the reused output projection into the mixer.
        pad_mlp: pad MLP hidden widths left odd by pruning to a multiple of 8 (exact zeros).

    Returns:
        The same model object.

    Example:
        >>> import timm, surgery
        >>> from surgery.fast import optimize
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> _ = surgery.replace_attention(model, "mhlstm")
        >>> _ = optimize(surgery.finalize(model).eval())
    """
    from replacements.conv import TokenConvolution
    from surgery.swap import replaced_sites

    def convertible(mixer: nn.Module) -> bool:
        if isinstance(mixer, TokenConvolution):
            return True
        if isinstance(mixer, MultiHeadRecurrent):
            weight = mixer.heads[0].rnn.weight_ih_l0
            return weight.device.type == "cpu" and weight.dtype == torch.float32
        return False

    def build(mixer: nn.Module, projection: nn.Linear | None) -> nn.Module:
        if isinstance(mixer, TokenConvolution):
            return FastTokenConvolution(mixer, projection)
        return FastMultiHeadRecurrent(mixer, use_kernel=use_kernel, projection=projection)

    for wrapper in list(replaced_sites(model)):
        if not convertible(wrapper.mixer):
            continue
        projection = wrapper.out_projection
        fold = (fold_projection and isinstance(projection, nn.Linear)
                and type(projection) is nn.Linear)
        wrapper.mixer = build(wrapper.mixer, projection if fold else None)
        if fold:
            setattr(wrapper, wrapper.out_proj_attribute, nn.Identity())
    # mixers used outside a wrapper (a user's own module): converted, nothing folded
    for name, module in list(model.named_modules()):
        if name and isinstance(module, (MultiHeadRecurrent, TokenConvolution)) and convertible(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, build(module, None))
    if pad_mlp:
        _pad_hidden_linears(model)
    return model
