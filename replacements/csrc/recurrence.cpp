// Recurrence of many small independent LSTMs/GRUs (heads x directions) in one native call.
//
// At batch 1 a multi-head recurrent mixer is dominated by per-step overhead, not FLOPs: every head
// and direction is a separate 197-step loop of tiny mat-vecs. This kernel runs all of them in one
// call, spread over torch's intra-op threads (at::parallel_for), with the input projections for
// every step already done as one batched matmul outside, so a step is only h @ W_hh^T plus the gate
// nonlinearities (vectorised through libmvec: compiled with -ffast-math, never linked with it).
//
// Built by replacements/native.py with torch.utils.cpp_extension.load, cached by a hash of this
// file, the flags and torch's version. The PyTorch loop in replacements/recurrence.py
// (_recurrence_torch) is the reference it is tested against (tests/test_fast.py).
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
