// The index of a row's largest value with one id (the mask token) left out, exactly as torch's argmax over
// a copy where that id is -inf: the first index of the maximum, a NaN counting as larger than any number
// (the first NaN wins). Shared by argmax.cpp's greedy picks and confidence.cpp's picks with probabilities.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "bf16.h"

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }  // beside bf16.h's, for fp32 rows

inline float value(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline float value(const float* p, int64_t i) { return p[i]; }

// x[i], or values i..i+15, with the banned id at -inf
template <class T>
inline float banned_value(const T* x, int64_t i, int64_t banned) {
  return i == banned ? -std::numeric_limits<float>::infinity() : value(x, i);
}
template <class T>
inline __m512 banned_lanes(const T* x, int64_t i, int64_t banned) {
  const __m512 v = load16(x + i);
  if (banned < i || banned >= i + 16) return v;
  return _mm512_mask_mov_ps(v, (__mmask16)(1u << (banned - i)), _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
}

// the first index of x (the banned id at -inf) holding m, or the first NaN where there is one
template <class T>
int64_t first_index(const T* x, int64_t V, int64_t banned, float m, bool any_nan) {
  const __m512 mv = _mm512_set1_ps(m);
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = banned_lanes(x, i, banned);
    const __mmask16 hit = any_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, mv, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz((unsigned)hit);
  }
  for (; i < V; ++i) {
    const float v = banned_value(x, i, banned);
    if (any_nan ? std::isnan(v) : v == m) return i;
  }
  return 0;  // V == 0 is refused before
}

template <class T>
int64_t argmax_row(const T* x, int64_t V, int64_t banned) {
  // pass 1: the maximum over ordered values, and whether there is a NaN at all
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = banned_lanes(x, i, banned);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float m = _mm512_reduce_max_ps(best);
  bool any_nan = nan != 0;
  for (; i < V; ++i) {
    const float v = banned_value(x, i, banned);
    if (std::isnan(v)) any_nan = true;
    else if (v > m) m = v;
  }
  return first_index(x, V, banned, m, any_nan);  // pass 2
}

}  // namespace
