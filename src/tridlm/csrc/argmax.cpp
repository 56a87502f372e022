// Greedy picks in one pass per row: the index of each row's largest value, with one id (the mask token)
// left out, exactly as torch's argmax over a copy where that id is -inf: the first index of the maximum,
// a NaN counting as larger than any number (the first NaN wins). torch's CPU argmax does not vectorize
// over a 49k vocabulary (~0.1 ms a row on these machines); a greedy step calls it once per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "bf16.h"

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }  // beside bf16.h's, for fp32 rows

inline float value(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline float value(const float* p, int64_t i) { return p[i]; }

template <class T>
int64_t argmax_row(const T* x, int64_t V, int64_t banned) {
  const float inf = std::numeric_limits<float>::infinity();
  auto at = [&](int64_t i) { return i == banned ? -inf : value(x, i); };
  auto lanes = [&](int64_t i) {  // values i..i+15, the banned one at -inf
    const __m512 v = load16(x + i);
    return banned >= i && banned < i + 16 ? _mm512_mask_mov_ps(v, (__mmask16)(1u << (banned - i)), _mm512_set1_ps(-inf))
                                          : v;
  };
  // pass 1: the maximum over ordered values, and whether there is a NaN at all
  __m512 best = _mm512_set1_ps(-inf);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = lanes(i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float m = _mm512_reduce_max_ps(best);
  bool any_nan = nan != 0;
  for (; i < V; ++i) {
    const float v = at(i);
    if (std::isnan(v)) any_nan = true;
    else if (v > m) m = v;
  }
  // pass 2: the first index holding it (or the first NaN)
  const __m512 mv = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= V; i += 16) {
    const __m512 v = lanes(i);
    const __mmask16 hit = any_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, mv, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz((unsigned)hit);
  }
  for (; i < V; ++i) {
    const float v = at(i);
    if (any_nan ? std::isnan(v) : v == m) return i;
  }
  return 0;  // V == 0 is refused before
}

at::Tensor argmax_rows(const at::Tensor& x, int64_t banned) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "argmax_rows takes x [..., V] with V > 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "argmax_rows takes bf16 or fp32");
  const int64_t V = x.size(-1);
  at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / V;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* base = xc.data_ptr();
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      op[r] = bf16 ? argmax_row((const uint16_t*)base + r * V, V, banned)
                   : argmax_row((const float*)base + r * V, V, banned);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("argmax_rows(Tensor x, int banned) -> Tensor");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) { m.impl("argmax_rows", argmax_rows); }
