// linear's hedgehog feature map in one pass: for every (token, head) row z [f] of the packed
// projection's output, [softmax(z), softmax(-z)] written straight into the [B, H, N, 2f] layout the
// attention products read. In PyTorch this was a negation, a stack, a softmax over 64-wide rows and
// a transposing copy: ~110 us per map at DeiT-T size (197 tokens, 3 heads, f = 64, 1 thread).
//
// Layouts: z [B*N rows][H*f] with a row stride (a column slice of the packed output), out
// [B, H, N, 2f] contiguous. AVX-512 only (exp16 from vector_math.h); linear.py runs the PyTorch
// map where the kernel or AVX-512 is missing. The reference is linear's sequence form (tests).
#include "kernels.h"
#include "vector_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

#if SURGERY_AVX512
// out[0:f] = softmax(sign * z[0:f]) for one row (sign = +1 or -1), masked last vector
SURGERY_TARGET_512 inline void softmax_row(const float* __restrict z, float* __restrict out, int64_t f,
                                           float sign) {
  const __m512 s = _mm512_set1_ps(sign);
  __m512 peak = _mm512_set1_ps(-3.4e38f);  // (-ffast-math: no infinities)
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = f - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (f - j)) - 1);
    peak = _mm512_mask_max_ps(peak, m, peak, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, z + j)));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = f - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (f - j)) - 1);
    const __m512 e = exp16(_mm512_fmsub_ps(s, _mm512_maskz_loadu_ps(m, z + j), top));
    total = _mm512_mask_add_ps(total, m, total, e);
    _mm512_mask_storeu_ps(out + j, m, e);
  }
  const __m512 scale = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < f; j += 16) {
    const __mmask16 m = f - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (f - j)) - 1);
    _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, out + j), scale));
  }
}
#endif

}  // namespace

bool hedgehog_available() { return SURGERY_AVX512 && cpu_has_avx512(); }

torch::Tensor hedgehog(torch::Tensor z, int64_t batch, int64_t heads, int64_t f) {
  TORCH_CHECK(hedgehog_available(), "the native hedgehog feature map needs an AVX-512 CPU");
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == torch::kFloat && z.stride(1) == 1 && z.size(1) == heads * f &&
              batch > 0 && z.size(0) % batch == 0, "z must be float32 [B*N, H*f] with unit column stride");
  const int64_t rows = z.size(0), N = rows / batch, stride = z.stride(0);
  auto out = torch::empty({batch, heads, N, 2 * f}, z.options());
#if SURGERY_AVX512
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * heads, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / heads, h = item % heads, b = row / N, t = row % N;
      const float* zr = zp + row * stride + h * f;
      float* o = op + ((b * heads + h) * N + t) * 2 * f;
      softmax_row(zr, o, f, 1.f);
      softmax_row(zr, o + f, f, -1.f);
    }
  });
#endif
  return out;
}
