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
//   xg   [K, B, T, D, G*P]  input gates, incl. b_ih unless bin [U, G*P] brings it (zeros in padded slots)
//   whh  [U, P*G*P]         W_hh transposed, zero-padded and column-tiled (float32, or float16 on
//                           F16C builds): the G*P gate columns are cut into blocks of 64 (then 8)
//                           and the block starting at column r is stored at r*P as [P rows][width],
//                           so a step streams W_hh front to back (see tile_columns in recurrence.py;
//                           measured 0.85x the time of the strided [P, G*P] walk); bhh [U, G*P]
//   out  [K, B, T, D, P]    hidden states (zeros at padded tokens and padded units)
// Padded hidden units stay exactly zero (zero weights and biases keep c = 0 and h = 0), so heads
// of different sizes after pruning share one layout without changing any real value.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vector_math.h"

namespace {

inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

#if SURGERY_AVX2
// 8-wide sigmoid/tanh inline (exp8 in vector_math.h): the gate nonlinearities were ~28% of a
// DeiT-T step through libmvec calls; these measured 0.93x the kernel time. Max relative error
// against float64 over [-30, 30] (tests/test_fast.py): exp 1.2e-7, sigmoid 2.5e-7, tanh 1.9e-7.
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh8(__m256 x) {
  // |x| >= 0.625: 1 - 2 / (exp(2|x|) + 1); below, Cephes' odd polynomial (no cancellation near 0)
  const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 ax = _mm256_andnot_ps(sign_bit, x);
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp8(_mm256_add_ps(ax, ax)), one)));
  const __m256 z = _mm256_mul_ps(ax, ax);
  __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), ax, ax);
  const __m256 r = _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
  return _mm256_or_ps(r, _mm256_and_ps(x, sign_bit));
}
#endif

// 8 floats: GCC/Clang map it to one AVX register (or two SSE ones); aligned(4) allows unaligned loads
typedef float v8 __attribute__((vector_size(32), aligned(4)));

// 8 consecutive weights as floats (float16 weights are widened on load: half the bytes streamed)
inline v8 load8(const float* w) { return *reinterpret_cast<const v8*>(w); }
#if SURGERY_AVX2
inline v8 load8(const at::Half* w) {
  return reinterpret_cast<v8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
#endif

// acc[0:8*NV] = bias[...] + sum_i h[i] * w[i, 0:8*NV] for one column block stored [rows][8*NV]
// (contiguous), the accumulators held in registers across the whole i loop.
template <int NV, typename W>
inline void matvec_tile(const W* __restrict w, const float* __restrict h, const float* __restrict bias,
                        float* __restrict acc, int64_t hidden) {
  v8 a[NV];
  for (int v = 0; v < NV; ++v) a[v] = *reinterpret_cast<const v8*>(bias + 8 * v);
  for (int64_t i = 0; i < hidden; ++i) {
    const float hi = h[i];
    const W* __restrict row = w + i * 8 * NV;
    for (int v = 0; v < NV; ++v) a[v] += hi * load8(row + 8 * v);
  }
  for (int v = 0; v < NV; ++v) *reinterpret_cast<v8*>(acc + 8 * v) = a[v];
}

// acc[0:GP] = bias + h[0:hidden] @ W for a column-tiled [rows, GP] matrix (block at column r at r*rows)
template <typename W>
inline void matvec(const W* __restrict w, const float* __restrict h, const float* __restrict bias,
                   float* __restrict acc, int64_t hidden, int64_t rows, int64_t GP) {
  int64_t r = 0;
  for (; r + 64 <= GP; r += 64) matvec_tile<8>(w + r * rows, h, bias + r, acc + r, hidden);
  for (; r < GP; r += 8) matvec_tile<1>(w + r * rows, h, bias + r, acc + r, hidden);
}


// AVX-512 (vector_math.h): the float32 mat-vec with all 256 gate columns of a 64-wide LSTM head in
// 16 zmm accumulators (same products, same order, so the same sums as the 8-wide one), and
// 16-wide gates
#if SURGERY_AVX512
// acc[0:64*NT] = bias + h[0:hidden] @ W over NT consecutive 64-column tiles of the column-tiled
// float32 layout (tile t at t*64*rows), 4 zmm accumulators per tile, all in registers.
// 16 (or 8) consecutive weights as floats; float16 weights (opt-in) widened on load
SURGERY_TARGET_512 inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
SURGERY_TARGET_512 inline __m512 load16(const at::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
SURGERY_TARGET_512 inline __m256 load8w(const float* w) { return _mm256_loadu_ps(w); }
SURGERY_TARGET_512 inline __m256 load8w(const at::Half* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// acc[0:64*NT] = bias + h[0:hidden] @ W over NT consecutive 64-column tiles of the column-tiled
// layout (tile t at t*64*rows), 4 zmm accumulators per tile, all in registers.
template <int NT, typename W>
SURGERY_TARGET_512 inline void matvec512_tiles(const W* __restrict w, const float* __restrict h,
                                              const float* __restrict bias, float* __restrict acc,
                                              int64_t hidden, int64_t rows) {
  __m512 a[4 * NT];
  for (int v = 0; v < 4 * NT; ++v) a[v] = _mm512_loadu_ps(bias + 16 * v);
  for (int64_t i = 0; i < hidden; ++i) {
    const __m512 hi = _mm512_set1_ps(h[i]);
    for (int t = 0; t < NT; ++t) {
      const W* __restrict row = w + t * 64 * rows + i * 64;
      for (int v = 0; v < 4; ++v) a[4 * t + v] = _mm512_fmadd_ps(hi, load16(row + 16 * v), a[4 * t + v]);
    }
  }
  for (int v = 0; v < 4 * NT; ++v) _mm512_storeu_ps(acc + 16 * v, a[v]);
}

// NB consecutive 8-column blocks of the column-tiled layout (block b at 8 * b * rows, stored
// [rows][8]) in one pass over the rows: one dependent chain per block, run side by side, where
// matvec_tile<1> walks the rows once per block (same products, same order, so the same sums)
template <int NB, typename W>
SURGERY_TARGET_512 inline void matvec512_narrow(const W* __restrict w, const float* __restrict h,
                                                const float* __restrict bias, float* __restrict acc,
                                                int64_t hidden, int64_t rows) {
  __m256 a[NB];
  for (int b = 0; b < NB; ++b) a[b] = _mm256_loadu_ps(bias + 8 * b);
  for (int64_t i = 0; i < hidden; ++i) {
    const __m256 hi = _mm256_set1_ps(h[i]);
    for (int b = 0; b < NB; ++b) a[b] = _mm256_fmadd_ps(hi, load8w(w + b * 8 * rows + i * 8), a[b]);
  }
  for (int b = 0; b < NB; ++b) _mm256_storeu_ps(acc + 8 * b, a[b]);
}

// the column-tiled mat-vec (same layout and result as matvec<W>, 16-wide)
template <typename W>
SURGERY_TARGET_512 inline void matvec512(const W* __restrict w, const float* __restrict h,
                                         const float* __restrict bias, float* __restrict acc,
                                         int64_t hidden, int64_t rows, int64_t GP) {
  int64_t r = 0;
  for (; r + 256 <= GP; r += 256) matvec512_tiles<4>(w + r * rows, h, bias + r, acc + r, hidden, rows);
  switch ((GP - r) / 64) {  // the remaining 64-column tiles in one pass
    case 3: matvec512_tiles<3>(w + r * rows, h, bias + r, acc + r, hidden, rows); r += 192; break;
    case 2: matvec512_tiles<2>(w + r * rows, h, bias + r, acc + r, hidden, rows); r += 128; break;
    case 1: matvec512_tiles<1>(w + r * rows, h, bias + r, acc + r, hidden, rows); r += 64; break;
    default: break;
  }
  switch ((GP - r) / 8) {  // the 8-column blocks after them, also in one pass
    case 7: matvec512_narrow<7>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 6: matvec512_narrow<6>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 5: matvec512_narrow<5>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 4: matvec512_narrow<4>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 3: matvec512_narrow<3>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 2: matvec512_narrow<2>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    case 1: matvec512_narrow<1>(w + r * rows, h, bias + r, acc + r, hidden, rows); break;
    default: break;
  }
}

// sigmoid8 / tanh8 16-wide (exp16 in vector_math.h; the same polynomials, so the same accuracy)
// 1 / d by rcp14 and one Newton step: relative error ~2^-23 (a division is 10-16 cycles per zmm)
SURGERY_TARGET_512 inline __m512 reciprocal16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

SURGERY_TARGET_512 inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return reciprocal16(_mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

SURGERY_TARGET_512 inline __m512 tanh16(__m512 x) {
  const __m512 sign_bit = _mm512_set1_ps(-0.f), one = _mm512_set1_ps(1.f);
  const __m512 ax = _mm512_andnot_ps(sign_bit, x);
  const __m512 big = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), reciprocal16(_mm512_add_ps(exp16(_mm512_add_ps(ax, ax)), one)), one);
  const __m512 z = _mm512_mul_ps(ax, ax);
  __m512 p = _mm512_set1_ps(-5.70498872745E-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954E-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531E-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036E-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422E-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), ax, ax);
  const __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big, small);
  return _mm512_or_ps(r, _mm512_and_ps(x, sign_bit));
}

// gates<> 16 wide (a masked last vector when P is an odd multiple of 8)
template <bool IS_LSTM>
SURGERY_TARGET_512 inline void gates512(const float* __restrict x, const float* __restrict a, float* __restrict hp,
                                        float* __restrict cp, float* __restrict o, int64_t P) {
  for (int64_t j = 0; j < P; j += 16) {
    const __mmask16 m = P - j >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF);
    auto at = [&](const float* base, int64_t g) SURGERY_TARGET_512 { return _mm512_maskz_loadu_ps(m, base + g * P + j); };
    __m512 hj;
    if (IS_LSTM) {
      const __m512 ig = sigmoid16(_mm512_add_ps(at(x, 0), at(a, 0)));
      const __m512 fg = sigmoid16(_mm512_add_ps(at(x, 1), at(a, 1)));
      const __m512 gg = tanh16(_mm512_add_ps(at(x, 2), at(a, 2)));
      const __m512 og = sigmoid16(_mm512_add_ps(at(x, 3), at(a, 3)));
      const __m512 cj = _mm512_fmadd_ps(fg, _mm512_maskz_loadu_ps(m, cp + j), _mm512_mul_ps(ig, gg));
      _mm512_mask_storeu_ps(cp + j, m, cj);
      hj = _mm512_mul_ps(og, tanh16(cj));
    } else {
      const __m512 rg = sigmoid16(_mm512_add_ps(at(x, 0), at(a, 0)));
      const __m512 zg = sigmoid16(_mm512_add_ps(at(x, 1), at(a, 1)));
      const __m512 ng = tanh16(_mm512_fmadd_ps(rg, at(a, 2), at(x, 2)));
      hj = _mm512_fmadd_ps(zg, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, hp + j), ng), ng);
    }
    _mm512_mask_storeu_ps(hp + j, m, hj);
    _mm512_mask_storeu_ps(o + j, m, hj);
  }
}

#endif

// x: input gates [G*P], a: recurrent gates (W_hh h + b_hh) [G*P]; updates h (hp) and c (cp) in
// place and writes h to o. GRU keeps b_hn inside r * (W_hn h + b_hn), as nn.GRU does.
template <bool IS_LSTM>
inline void gates(const float* __restrict x, const float* __restrict a, float* __restrict hp,
                  float* __restrict cp, float* __restrict o, int64_t P) {
#if SURGERY_AVX2
  for (int64_t j = 0; j < P; j += 8) {  // P is a multiple of 8
    auto at = [&](const float* base, int64_t g) { return _mm256_loadu_ps(base + g * P + j); };
    __m256 hj;
    if (IS_LSTM) {
      const __m256 ig = sigmoid8(_mm256_add_ps(at(x, 0), at(a, 0)));
      const __m256 fg = sigmoid8(_mm256_add_ps(at(x, 1), at(a, 1)));
      const __m256 gg = tanh8(_mm256_add_ps(at(x, 2), at(a, 2)));
      const __m256 og = sigmoid8(_mm256_add_ps(at(x, 3), at(a, 3)));
      const __m256 cj = _mm256_fmadd_ps(fg, _mm256_loadu_ps(cp + j), _mm256_mul_ps(ig, gg));
      _mm256_storeu_ps(cp + j, cj);
      hj = _mm256_mul_ps(og, tanh8(cj));
    } else {
      const __m256 rg = sigmoid8(_mm256_add_ps(at(x, 0), at(a, 0)));
      const __m256 zg = sigmoid8(_mm256_add_ps(at(x, 1), at(a, 1)));
      const __m256 ng = tanh8(_mm256_fmadd_ps(rg, at(a, 2), at(x, 2)));
      hj = _mm256_fmadd_ps(zg, _mm256_sub_ps(_mm256_loadu_ps(hp + j), ng), ng);  // n + z (h - n)
    }
    _mm256_storeu_ps(hp + j, hj);
    _mm256_storeu_ps(o + j, hj);
  }
  return;
#endif
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

// x + b into out (the input projection's bias, added per step here rather than broadcast over the
// whole [K, B, T, D, G*P] input by a baddbmm: 85 us of a DeiT-T block); x itself when b is null
inline const float* with_bias(const float* __restrict x, const float* __restrict b, float* __restrict out, int64_t n) {
  if (b == nullptr) return x;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] + b[j];
  return out;
}

// One unit (head, direction) for a group of samples advanced in lockstep: W_hh is walked tile by
// tile and each tile (64 gate columns x hidden rows, <= 16 KiB) serves every sample of the group
// from L1, instead of streaming the whole matrix from L2 once per sample and step. (Computing a
// tile's gates right after its mat-vec, gates interleaved in W_hh, measured 1.10x slower.)
template <bool IS_LSTM, typename W>
void run_group(const float* __restrict xg, const W* __restrict whh, const float* __restrict bhh,
               const float* __restrict bin, float* __restrict out, int64_t samples, const int64_t* lengths, bool reverse,
               int64_t hidden, int64_t P, int64_t x_step, int64_t o_step, int64_t x_sample,
               int64_t o_sample) {
  constexpr int64_t G = IS_LSTM ? 4 : 3;
  const int64_t GP = G * P;  // a multiple of 8: P is padded to a multiple of 8
  std::vector<float> acc(samples * GP), h(samples * P, 0.f), c(samples * P, 0.f), xb(bin ? GP : 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < samples; ++b) longest = std::max(longest, lengths[b]);
  for (int64_t s = 0; s < longest; ++s) {
    int64_t r = 0;
    for (; r + 64 <= GP; r += 64)
      for (int64_t b = 0; b < samples; ++b)
        if (s < lengths[b]) matvec_tile<8>(whh + r * P, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden);
    for (; r < GP; r += 8)
      for (int64_t b = 0; b < samples; ++b)
        if (s < lengths[b]) matvec_tile<1>(whh + r * P, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden);
    for (int64_t b = 0; b < samples; ++b) {
      if (s >= lengths[b]) continue;
      const int64_t t = reverse ? lengths[b] - 1 - s : s;
      gates<IS_LSTM>(with_bias(xg + b * x_sample + t * x_step, bin, xb.data(), GP), acc.data() + b * GP, h.data() + b * P,
                     c.data() + b * P, out + b * o_sample + t * o_step, P);
    }
  }
}


#if SURGERY_AVX512
// run_group with the AVX-512 mat-vec and gates (W_hh column-tiled as for run_group)
template <bool IS_LSTM, typename W>
SURGERY_TARGET_512 void run_group_512(const W* __restrict whh, const float* __restrict xg, const float* __restrict bhh,
                                      const float* __restrict bin, float* __restrict out, int64_t samples, const int64_t* lengths, bool reverse,
                                      int64_t hidden, int64_t P, int64_t x_step, int64_t o_step, int64_t x_sample,
                                      int64_t o_sample) {
  constexpr int64_t G = IS_LSTM ? 4 : 3;
  const int64_t GP = G * P;
  std::vector<float> acc(samples * GP), h(samples * P, 0.f), c(samples * P, 0.f), xb(bin ? GP : 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < samples; ++b) longest = std::max(longest, lengths[b]);
  for (int64_t s = 0; s < longest; ++s) {
    if (samples == 1) {
      matvec512(whh, h.data(), bhh, acc.data(), hidden, P, GP);
    } else {  // tile by tile over the group, as run_group: each 64-column tile serves every sample from L1
      int64_t r = 0;
      for (; r + 64 <= GP; r += 64)
        for (int64_t b = 0; b < samples; ++b)
          if (s < lengths[b]) matvec512_tiles<1>(whh + r * P, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden, P);
      for (; r < GP; r += 8)
        for (int64_t b = 0; b < samples; ++b)
          if (s < lengths[b]) matvec512_narrow<1>(whh + r * P, h.data() + b * P, bhh + r, acc.data() + b * GP + r, hidden, P);
    }
    for (int64_t b = 0; b < samples; ++b) {
      if (s >= lengths[b]) continue;
      const int64_t t = reverse ? lengths[b] - 1 - s : s;
      gates512<IS_LSTM>(with_bias(xg + b * x_sample + t * x_step, bin, xb.data(), GP), acc.data() + b * GP, h.data() + b * P,
                        c.data() + b * P, out + b * o_sample + t * o_step, P);
    }
  }
}
#endif

template <typename W>
void recurrence_impl(const float* xp, const W* wp, const float* bp, const float* bip, float* op, const int64_t* sizes,
                     const std::vector<int64_t>& len, int64_t K, int64_t B, int64_t T, int64_t D,
                     int64_t G, int64_t P, bool is_lstm) {
  const int64_t x_step = D * G * P, o_step = D * P;
  const bool wide = avx512_enabled();
  // one work item = one (head, direction) and a group of up to 4 samples: independent recurrences,
  // in one parallel region for the whole call (not one per step)
  constexpr int64_t GROUP = 4;
  const int64_t groups = (B + GROUP - 1) / GROUP;
  const int64_t x_sample = T * x_step, o_sample = T * o_step;
  at::parallel_for(0, K * D * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, unit = item / groups, k = unit / D, d = unit % D;
      const int64_t b0 = g * GROUP, samples = std::min(GROUP, B - b0);
      const float* x = xp + ((k * B + b0) * T * D + d) * G * P;
      float* o = op + ((k * B + b0) * T * D + d) * P;
      const W* w = wp + unit * P * G * P;
      const float* bb = bp + unit * G * P;
      const float* bi = bip ? bip + unit * G * P : nullptr;
#if SURGERY_AVX512
      if (wide) {
        if (is_lstm)
          run_group_512<true>(w, x, bb, bi, o, samples, len.data() + b0, d == 1, sizes[unit], P, x_step,
                              o_step, x_sample, o_sample);
        else
          run_group_512<false>(w, x, bb, bi, o, samples, len.data() + b0, d == 1, sizes[unit], P, x_step,
                               o_step, x_sample, o_sample);
        continue;
      }
#endif
      if (is_lstm)
        run_group<true>(x, w, bb, bi, o, samples, len.data() + b0, d == 1, sizes[unit], P, x_step,
                        o_step, x_sample, o_sample);
      else
        run_group<false>(x, w, bb, bi, o, samples, len.data() + b0, d == 1, sizes[unit], P, x_step,
                         o_step, x_sample, o_sample);
    }
  });
}

void check_weights(const torch::Tensor& w, int64_t units, int64_t rows, int64_t GP, const char* name) {
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == units && w.size(1) == rows * GP, name,
              " must be contiguous column-tiled [units, rows * G * P] (tile_columns in recurrence.py)");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || (SURGERY_AVX2 && w.scalar_type() == torch::kHalf), name,
              " must be float32", SURGERY_AVX2 ? " or float16" : " (float16 needs an AVX2/F16C build)");
}

}  // namespace

// xg [K, B, T, D, G*P] (input gates, without b_ih when bin is given); whh [U, P*G*P] column-tiled
// (float32 or float16); bhh [U, G*P]; bin [U, G*P] (b_ih, added per step) or empty;
// sizes [U] (real hidden size per unit); lengths [B] int64 (real tokens, right padded) or an
// empty tensor for "all T".
torch::Tensor recurrence(torch::Tensor xg, torch::Tensor whh, torch::Tensor bhh, torch::Tensor sizes,
                         torch::Tensor lengths, bool is_lstm, torch::Tensor bin) {
  TORCH_CHECK(xg.dim() == 5 && xg.is_contiguous() && xg.scalar_type() == torch::kFloat,
              "xg must be a contiguous float32 [K, B, T, D, G*P] tensor");
  const int64_t K = xg.size(0), B = xg.size(1), T = xg.size(2), D = xg.size(3);
  const int64_t G = is_lstm ? 4 : 3;
  const int64_t P = xg.size(4) / G;
  TORCH_CHECK(P % 8 == 0, "the padded hidden size must be a multiple of 8");
  check_weights(whh, K * D, P, G * P, "whh");
  const bool has_bin = bin.defined() && bin.numel() > 0;
  TORCH_CHECK(!has_bin || (bin.is_contiguous() && bin.scalar_type() == torch::kFloat && bin.numel() == K * D * G * P),
              "bin must be an empty tensor or contiguous float32 [U, G*P] (the input projection's bias per unit)");
  TORCH_CHECK(bhh.is_contiguous() && bhh.size(0) == K * D && bhh.size(1) == G * P, "bad bhh shape");
  TORCH_CHECK(sizes.numel() == K * D && sizes.scalar_type() == torch::kLong, "sizes must be int64 [units]");
  const bool has_lengths = lengths.numel() > 0;
  // without lengths every (token, unit) is written (padded units compute exact zeros)
  auto out = has_lengths ? torch::zeros({K, B, T, D, P}, xg.options()) : torch::empty({K, B, T, D, P}, xg.options());
  std::vector<int64_t> len(B, T);
  if (has_lengths) {
    auto l = lengths.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) len[b] = l[b];
  }
  const int64_t* sz = sizes.data_ptr<int64_t>();
  if (whh.scalar_type() == torch::kFloat)
    recurrence_impl(xg.data_ptr<float>(), whh.data_ptr<float>(), bhh.data_ptr<float>(),
                    has_bin ? bin.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                    sz, len, K, B, T, D, G, P, is_lstm);
#if SURGERY_AVX2
  else
    recurrence_impl(xg.data_ptr<float>(), whh.data_ptr<at::Half>(), bhh.data_ptr<float>(),
                    has_bin ? bin.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                    sz, len, K, B, T, D, G, P, is_lstm);
#endif
  return out;
}

namespace {
template <typename W>
void step_impl(const float* x, const float* win, const float* bin, const W* whh, const float* bhh,
               float* h, float* c, const int64_t* sizes, int64_t K, int64_t B, int64_t I, int64_t G,
               int64_t P, bool is_lstm) {
  const int64_t GP = G * P;
  // one item = (head, sample); run inline below ~256K multiply-adds (a fork costs more)
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / ((I + P) * GP));
  const bool wide = avx512_enabled();
  at::parallel_for(0, K * B, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * GP + P);
    float* ax = buf.data();
    float* ah = buf.data() + GP;
    float* scratch = buf.data() + 2 * GP;  // gates() also writes h to an output row
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / B, b = item % B;
      float* hp = h + (k * B + b) * P;
      float* cp = c + (k * B + b) * P;
#if SURGERY_AVX512
      if (wide) {
        matvec512(win + k * I * GP, x + (k * B + b) * I, bin + k * GP, ax, I, I, GP);
        matvec512(whh + k * P * GP, hp, bhh + k * GP, ah, sizes[k], P, GP);
        if (is_lstm)
          gates512<true>(ax, ah, hp, cp, scratch, P);
        else
          gates512<false>(ax, ah, hp, cp, scratch, P);
        continue;
      }
#endif
      matvec(win + k * I * GP, x + (k * B + b) * I, bin + k * GP, ax, I, I, GP);
      matvec(whh + k * P * GP, hp, bhh + k * GP, ah, sizes[k], P, GP);
      if (is_lstm)
        gates<true>(ax, ah, hp, cp, scratch, P);
      else
        gates<false>(ax, ah, hp, cp, scratch, P);
    }
  });
}
}  // namespace

// One decode step of every head of one forward-only layer: x [K, B, I] (inputs per head),
// win [K, I*G*P] and whh [K, P*G*P] column-tiled, bin/bhh [K, G*P], h/c [K, B, P] (c unused for
// GRU) -> new (h, c); the inputs are not modified.
std::vector<torch::Tensor> step(torch::Tensor x, torch::Tensor win, torch::Tensor bin, torch::Tensor whh,
                                torch::Tensor bhh, torch::Tensor h, torch::Tensor c, torch::Tensor sizes,
                                bool is_lstm) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x must be contiguous float32 [K, B, I]");
  const int64_t K = x.size(0), B = x.size(1), I = x.size(2);
  const int64_t G = is_lstm ? 4 : 3;
  TORCH_CHECK(h.dim() == 3 && h.size(0) == K && h.size(1) == B && h.scalar_type() == torch::kFloat, "h must be float32 [K, B, P]");
  const int64_t P = h.size(2);
  TORCH_CHECK(P % 8 == 0, "the padded hidden size must be a multiple of 8");
  check_weights(whh, K, P, G * P, "whh");
  TORCH_CHECK(win.is_contiguous() && win.scalar_type() == torch::kFloat && win.dim() == 2 && win.size(0) == K &&
              win.size(1) == I * G * P, "win must be contiguous float32 column-tiled [K, I * G * P]");
  TORCH_CHECK(bin.is_contiguous() && bin.numel() == K * G * P && bhh.is_contiguous() && bhh.numel() == K * G * P,
              "bin and bhh must be contiguous [K, G*P]");
  TORCH_CHECK(sizes.numel() == K && sizes.scalar_type() == torch::kLong, "sizes must be int64 [K]");
  auto h_new = h.contiguous().clone();
  auto c_new = is_lstm ? c.contiguous().clone() : torch::empty({0}, h.options());
  TORCH_CHECK(!is_lstm || c_new.sizes() == h_new.sizes(), "c must have h's shape");
  float* cp = is_lstm ? c_new.data_ptr<float>() : nullptr;
  if (whh.scalar_type() == torch::kFloat)
    step_impl(x.data_ptr<float>(), win.data_ptr<float>(), bin.data_ptr<float>(), whh.data_ptr<float>(),
              bhh.data_ptr<float>(), h_new.data_ptr<float>(), cp, sizes.data_ptr<int64_t>(), K, B, I, G, P, is_lstm);
#if SURGERY_AVX2
  else
    step_impl(x.data_ptr<float>(), win.data_ptr<float>(), bin.data_ptr<float>(), whh.data_ptr<at::Half>(),
              bhh.data_ptr<float>(), h_new.data_ptr<float>(), cp, sizes.data_ptr<int64_t>(), K, B, I, G, P, is_lstm);
#endif
  return {h_new, c_new};
}

bool recurrence_half_weights() { return SURGERY_AVX2; }
bool recurrence_avx512() { return cpu_has_avx512(); }
bool recurrence_use_avx512(bool on) {
  avx512_enabled() = on && cpu_has_avx512();
  return avx512_enabled();
}
