// What the products' add variants (gemm_bf16_add_, gemm_bf16_amx_add_) do with a tile's fp32 sums: y +=
// s * sums in one rounding -- a LoRA drafter's delta onto the base outputs, its scaling and per-row draft
// gate folded into s. Where s * sums is zero (a row whose gate is 0) y keeps its bits exactly, so tokens
// that are not drafts get the base model's outputs whatever the rows beside them are.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

#include "bf16.h"

namespace {

inline void add_store16(__m512 sums, float s, uint16_t* y) {
  const __m512 d = _mm512_mul_ps(sums, _mm512_set1_ps(s));
  const __m256i yb = _mm256_loadu_si256((const __m256i*)y);
  const __m512 yf = widen16(yb);
  const __m256i r = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(yf, d));  // nearest even
  const __mmask16 zero = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_EQ_OQ);
  _mm256_storeu_si256((__m256i*)y, _mm256_mask_blend_epi16(zero, r, yb));
}

inline void check_addend(const at::Tensor& y, int64_t M, int64_t N) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kBFloat16 && y.stride(1) == 1 && y.size(0) == M &&
                  y.size(1) == N,
              "the add products take bf16 y [M, N] (rows contiguous) of the product's shape, got ", y.sizes());
}

inline const float* row_scale_ptr(const c10::optional<at::Tensor>& row_scale, int64_t M) {
  if (!row_scale.has_value()) return nullptr;
  TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous() && row_scale->numel() == M,
              "row_scale: one fp32 value per row of x expected");
  return row_scale->data_ptr<float>();
}

}  // namespace
