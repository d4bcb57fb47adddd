// conv's depthwise convolution over tokens, in the tokens-last layout, with the exact (erf) GELU and
// the residual fused into one pass:
//   out[b, t, c] = y[b, t, c] + gelu(bias[c] + sum_j weight[j, c] * y[b, t - left + j, c])
// (zero padding: taps outside [0, N) read nothing). At DeiT-T size (197 tokens, 192 channels,
// kernel 7, batch 1, 1 thread) oneDNN's depthwise convolution with its GELU post-op took ~60 us and
// the residual add another 4-8 us, for 0.26M multiply-adds; this pass reads y once per tap from L1.
//
// Layouts: y [B, N, C] contiguous float32; weight [k, C] (the [C, 1, k] kernel transposed); bias [C]
// or empty. The reference is conv's own reference form (tests/test_conv_fast.py).
#include "kernels.h"
#include "vector_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

inline float gelu(float x) { return 0.5f * x * std::erfc(-x * 0.70710678118654752f); }

#if SURGERY_AVX2
// 8-wide exact GELU: 0.5 x erfc(-x / sqrt 2), erfc from Numerical Recipes' Chebyshev fit
// erfc(z) = t exp(-z^2 - 1.26551223 + t P(t)), t = 1 / (1 + z / 2), fractional error < 1.2e-7
// for z >= 0, and erfc(-z) = 2 - erfc(z): no cancellation for negative inputs.
inline __m256 gelu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f), sign_bit = _mm256_set1_ps(-0.f);
  const __m256 u = _mm256_mul_ps(x, _mm256_set1_ps(-0.70710678118654752f));  // erfc's argument
  const __m256 z = _mm256_andnot_ps(sign_bit, u);
  // t = 1 / (1 + z / 2) by rcp and one Newton step (relative error ~2^-22, far under the fit's)
  const __m256 den = _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), one);
  __m256 t = _mm256_rcp_ps(den);
  t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, _mm256_set1_ps(2.f)));
  // the fit's polynomial in t by Estrin's scheme: 4 dependent steps instead of Horner's 9
  const __m256 t2 = _mm256_mul_ps(t, t), t4 = _mm256_mul_ps(t2, t2), t8 = _mm256_mul_ps(t4, t4);
  const __m256 q0 = _mm256_fmadd_ps(_mm256_set1_ps(1.00002368f), t, _mm256_set1_ps(-1.26551223f));
  const __m256 q1 = _mm256_fmadd_ps(_mm256_set1_ps(0.09678418f), t, _mm256_set1_ps(0.37409196f));
  const __m256 q2 = _mm256_fmadd_ps(_mm256_set1_ps(0.27886807f), t, _mm256_set1_ps(-0.18628806f));
  const __m256 q3 = _mm256_fmadd_ps(_mm256_set1_ps(1.48851587f), t, _mm256_set1_ps(-1.13520398f));
  const __m256 q4 = _mm256_fmadd_ps(_mm256_set1_ps(0.17087277f), t, _mm256_set1_ps(-0.82215223f));
  const __m256 p = _mm256_fmadd_ps(q4, t8, _mm256_fmadd_ps(_mm256_fmadd_ps(q3, t2, q2), t4, _mm256_fmadd_ps(q1, t2, q0)));
  const __m256 e = _mm256_mul_ps(t, exp8(_mm256_fnmadd_ps(z, z, p)));  // erfc(|u|)
  const __m256 erfc_u = _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.f), e),
                                         _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), erfc_u);
}
#endif

#if SURGERY_AVX512
// gelu8 16-wide (rcp14 and one Newton step for t)
SURGERY_TARGET_512 inline __m512 gelu16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f), sign_bit = _mm512_set1_ps(-0.f);
  const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(-0.70710678118654752f));
  const __m512 z = _mm512_andnot_ps(sign_bit, u);
  const __m512 den = _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), one);
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.f)));
  const __m512 t2 = _mm512_mul_ps(t, t), t4 = _mm512_mul_ps(t2, t2), t8 = _mm512_mul_ps(t4, t4);
  const __m512 q0 = _mm512_fmadd_ps(_mm512_set1_ps(1.00002368f), t, _mm512_set1_ps(-1.26551223f));
  const __m512 q1 = _mm512_fmadd_ps(_mm512_set1_ps(0.09678418f), t, _mm512_set1_ps(0.37409196f));
  const __m512 q2 = _mm512_fmadd_ps(_mm512_set1_ps(0.27886807f), t, _mm512_set1_ps(-0.18628806f));
  const __m512 q3 = _mm512_fmadd_ps(_mm512_set1_ps(1.48851587f), t, _mm512_set1_ps(-1.13520398f));
  const __m512 q4 = _mm512_fmadd_ps(_mm512_set1_ps(0.17087277f), t, _mm512_set1_ps(-0.82215223f));
  const __m512 p = _mm512_fmadd_ps(q4, t8, _mm512_fmadd_ps(_mm512_fmadd_ps(q3, t2, q2), t4, _mm512_fmadd_ps(q1, t2, q0)));
  const __m512 e = _mm512_mul_ps(t, exp16(_mm512_fnmadd_ps(z, z, p)));
  const __m512 erfc_u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ), e,
                                             _mm512_sub_ps(_mm512_set1_ps(2.f), e));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), erfc_u);
}

// conv_rows 16 channels at a time (a masked last vector), the same sums in the same order
SURGERY_TARGET_512 void conv_rows_512(const float* __restrict y, const float* __restrict w,
                                      const float* __restrict bias, float* __restrict out, int64_t t0,
                                      int64_t t1, int64_t N, int64_t C, int64_t k, int64_t left) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = std::max<int64_t>(0, left - t), j1 = std::min<int64_t>(k, N + left - t);
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = C - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (C - c)) - 1);
      __m512 acc = bias ? _mm512_maskz_loadu_ps(m, bias + c) : _mm512_setzero_ps();
      for (int64_t j = j0; j < j1; ++j)
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j * C + c),
                              _mm512_maskz_loadu_ps(m, y + (t - left + j) * C + c), acc);
      _mm512_mask_storeu_ps(out + t * C + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + t * C + c), gelu16(acc)));
    }
  }
}
#endif

void conv_rows(const float* __restrict y, const float* __restrict w, const float* __restrict bias,
               float* __restrict out, int64_t t0, int64_t t1, int64_t N, int64_t C, int64_t k,
               int64_t left) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = std::max<int64_t>(0, left - t), j1 = std::min<int64_t>(k, N + left - t);
    const float* __restrict yt = y + t * C;
    float* __restrict ot = out + t * C;
    int64_t c = 0;
#if SURGERY_AVX2
    for (; c + 8 <= C; c += 8) {
      __m256 acc = bias ? _mm256_loadu_ps(bias + c) : _mm256_setzero_ps();
      for (int64_t j = j0; j < j1; ++j)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + j * C + c), _mm256_loadu_ps(y + (t - left + j) * C + c), acc);
      _mm256_storeu_ps(ot + c, _mm256_add_ps(_mm256_loadu_ps(yt + c), gelu8(acc)));
    }
#endif
    for (; c < C; ++c) {
      float acc = bias ? bias[c] : 0.f;
      for (int64_t j = j0; j < j1; ++j) acc += w[j * C + c] * y[(t - left + j) * C + c];
      ot[c] = yt[c] + gelu(acc);
    }
  }
}

}  // namespace

torch::Tensor token_conv_gelu(torch::Tensor y, torch::Tensor weight, torch::Tensor bias, int64_t left) {
  TORCH_CHECK(y.dim() == 3 && y.is_contiguous() && y.scalar_type() == torch::kFloat,
              "y must be a contiguous float32 [B, N, C] tensor");
  const int64_t B = y.size(0), N = y.size(1), C = y.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == C &&
              weight.scalar_type() == torch::kFloat, "weight must be a contiguous float32 [k, C] tensor");
  const int64_t k = weight.size(0);
  TORCH_CHECK(left >= 0 && left < k, "left padding must be in [0, k)");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.is_contiguous() && bias.numel() == C && bias.scalar_type() == torch::kFloat),
              "bias must be a contiguous float32 [C] tensor or empty");
  auto out = torch::empty_like(y);
  const float* yp = y.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // rows of tokens over torch's threads; below ~64K multiply-adds a fork costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, C * k));
  const bool wide = avx512_enabled();
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / N, t0 = begin % N, t1 = std::min(N, t0 + (end - begin));
#if SURGERY_AVX512
      if (wide)
        conv_rows_512(yp + b * N * C, wp, bp, op + b * N * C, t0, t1, N, C, k, left);
      else
#endif
        conv_rows(yp + b * N * C, wp, bp, op + b * N * C, t0, t1, N, C, k, left);
      begin += t1 - t0;
    }
  });
  return out;
}
