// RMSNorm of bf16 rows in one pass: y = w * bf16(x * rsqrt(mean(x^2) + eps)), the sums in fp32. The same
// roundings as the model's torch formula (x in fp32, the normalized row rounded to bf16, then the weight's
// bf16 product); only the order of the sum of squares is this kernel's, one order per row whatever the
// other rows are. Eight torch ops a norm become one call, which is most of a norm's cost on small rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>

#include "bf16.h"

namespace {

void norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t H, float eps) {
  __m512 acc = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + 16 <= H; h += 16) {
    __m512 v = load16(x + h);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; h < H; ++h) sum += bf16_to_float(x[h]) * bf16_to_float(x[h]);
  const float r = 1.0f / std::sqrt(sum / (float)H + eps);
  const __m512 rv = _mm512_set1_ps(r);
  h = 0;
  for (; h + 16 <= H; h += 16) {
    __m512 y = round_bf16(_mm512_mul_ps(load16(x + h), rv));  // x * r, rounded
    _mm256_storeu_si256((__m256i*)(out + h), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load16(w + h), y)));
  }
  for (; h < H; ++h)
    out[h] = float_to_bf16(bf16_to_float(w[h]) * bf16_to_float(float_to_bf16(bf16_to_float(x[h]) * r)));
}

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm_bf16 takes bf16");
  const int64_t H = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "rms_norm_bf16: weight of ", H, " values expected");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = H ? xc.numel() / H : 0;
  const uint16_t* xp = (const uint16_t*)xc.data_ptr();
  const uint16_t* wp = (const uint16_t*)wc.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * H, wp, op + r * H, H, (float)eps);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) { m.impl("rms_norm_bf16", rms_norm_bf16); }
