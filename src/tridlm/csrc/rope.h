// Rotary embedding of one bf16 head with the roundings of the model's torch formula in eager mode (each
// product rounded to bf16, then their sum): shared by rope.cpp's op and attention.cpp's fused one.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "bf16.h"

namespace {

// one head's D values: out[j] = x[j] c[j] - x[j + D/2] s[j], out[j + D/2] = x[j + D/2] c[j + D/2] + x[j] s[j + D/2]
inline void rotate_head(const uint16_t* x, const uint16_t* c, const uint16_t* s, uint16_t* out, int64_t half) {
  for (int64_t j = 0; j < half; j += 16) {
    const __m512 x1 = load16(x + j), x2 = load16(x + half + j);
    const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, load16(c + j))),
                                    round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + j))));
    const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load16(c + half + j))),
                                    round_bf16(_mm512_mul_ps(x1, load16(s + half + j))));
    _mm256_storeu_si256((__m256i*)(out + j), (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_storeu_si256((__m256i*)(out + half + j), (__m256i)_mm512_cvtneps_pbh(hi));
  }
}

}  // namespace
