// bf16 <-> fp32 for tridlm's kernels. bf16 is the upper half of an fp32, so widening is exact; rounding
// back is to nearest even, as torch's conversions do.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

inline __m512 widen16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

inline __m512 load16(const uint16_t* p) { return widen16(_mm256_loadu_si256((const __m256i*)p)); }  // 16 values

inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }  // fp32 -> bf16 -> fp32

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) { return (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(f))); }

}  // namespace
