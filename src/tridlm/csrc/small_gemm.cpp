// tridlm's CPU products for narrow forwards (a few tokens: decoding steps, draft and verify blocks).
// y[M, N] = x[M, K] @ W[N, K]^T (or y += s * x @ W^T in place: gemm_bf16_add_) with bf16 activations
// and fp32 sums, W held as bf16 values or as int8 codes with one scale per row. torch's kernels reach a
// third to a half of the memory bandwidth on SmolLM2-sized shapes; these stream a packed layout at close
// to it.
//
// Packed layout, both formats: [N/32][K/2][32][2] -- for each tile of 32 output rows, the inputs in
// pairs, each pair of all 32 rows side by side. One AVX-512 BF16 dot product then adds one input pair
// of one row of x (broadcast) into 16 outputs at once: no horizontal sums, and one pass over a tile
// serves up to 8 rows of x. Every output is summed in the same order whatever M is, so a row's result
// does not depend on the rows beside it (a verify block gives AR's products bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>

#include "epilogue.h"

namespace {

constexpr int64_t kTile = 32, kPair = 2, kMaxRows = 8;

struct Bf16Weights {
  using T = uint16_t;
  static void load(const T* p, __m512bh& lo, __m512bh& hi) {
    lo = (__m512bh)_mm512_loadu_si512(p);
    hi = (__m512bh)_mm512_loadu_si512(p + 32);
  }
};

struct Int8Weights {  // codes -127..127, exact in bf16
  using T = int8_t;
  static __m512 floats(const T* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static void load(const T* p, __m512bh& lo, __m512bh& hi) {
    lo = _mm512_cvtne2ps_pbh(floats(p + 16), floats(p));
    hi = _mm512_cvtne2ps_pbh(floats(p + 48), floats(p + 32));
  }
};

// one tile of 32 outputs for MT rows of x: acc[i][0] outputs 0-15, acc[i][1] outputs 16-31
// add: out += add_scale * row_scale[i] * sums instead of out = sums (epilogue.h)
struct Add {
  bool on = false;
  float scale = 1.0f;
  const float* row_scale = nullptr;
};

template <class W, int MT>
inline void tile(const uint16_t* x, int64_t ldx, const typename W::T* w, int64_t pairs, const float* scale,
                 uint16_t* out, int64_t ldo, Add add) {
  __m512 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  constexpr int64_t pair_bytes = kTile * kPair * sizeof(typename W::T);
  for (int64_t p = 0; p < pairs; ++p) {
    const typename W::T* wp = w + p * kTile * kPair;
    const char* ahead = (const char*)wp + 16 * pair_bytes;  // the stream a few pairs on
    for (int64_t b = 0; b < pair_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    __m512bh lo, hi;
    W::load(wp, lo, hi);
    for (int i = 0; i < MT; ++i) {
      int32_t xpair;
      std::memcpy(&xpair, x + i * ldx + p * kPair, 4);
      __m512bh xb = (__m512bh)_mm512_set1_epi32(xpair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xb, lo);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xb, hi);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int h = 0; h < 2; ++h) {
      __m512 y = acc[i][h];
      if (add.on) {
        add_store16(y, add.row_scale ? add.scale * add.row_scale[i] : add.scale, out + i * ldo + 16 * h);
        continue;
      }
      if (scale) y = _mm512_mul_ps(y, _mm512_loadu_ps(scale + 16 * h));
      _mm256_storeu_si256((__m256i*)(out + i * ldo + 16 * h), (__m256i)_mm512_cvtneps_pbh(y));  // nearest even
    }
}

template <class W>
void rows(int mt, const uint16_t* x, int64_t ldx, const typename W::T* w, int64_t pairs, const float* scale,
          uint16_t* out, int64_t ldo, Add add) {
  switch (mt) {
    case 1: tile<W, 1>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 2: tile<W, 2>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 3: tile<W, 3>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 4: tile<W, 4>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 5: tile<W, 5>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 6: tile<W, 6>(x, ldx, w, pairs, scale, out, ldo, add); break;
    case 7: tile<W, 7>(x, ldx, w, pairs, scale, out, ldo, add); break;
    default: tile<W, 8>(x, ldx, w, pairs, scale, out, ldo, add); break;
  }
}

template <class W>
at::Tensor product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                   at::Tensor* addend = nullptr, Add add = {}) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "tridlm products take bf16 x [M, K]");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kTile && w.size(3) == kPair && w.is_contiguous(),
              "tridlm products take weights packed as [N/32, K/2, 32, 2]");
  const int64_t M = x.size(0), K = x.size(1), tiles = w.size(0), pairs = w.size(1), N = tiles * kTile;
  TORCH_CHECK(pairs * kPair == K, "x has ", K, " inputs, the packed weights ", pairs * kPair);
  // rows of x may be a slice of wider rows (a drafter's x @ A.T beside the base outputs): no copy then
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t ldx = xc.stride(0);
  at::Tensor out = addend ? *addend : at::empty({M, N}, x.options());
  if (addend) check_addend(out, M, N);
  const int64_t ldo = out.stride(0);
  const uint16_t* xp = (const uint16_t*)xc.data_ptr();
  const typename W::T* wp = (const typename W::T*)w.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  const float* sp = nullptr;
  at::Tensor sc;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == N,
                "gemm_int8 takes one fp32 scale per output row");
    sp = scale->data_ptr<float>();
  }
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {  // a tile stays in cache across groups of rows
        Add a = add;
        if (a.row_scale) a.row_scale += m0;
        rows<W>((int)std::min(kMaxRows, M - m0), xp + m0 * ldx, ldx, wp + t * pairs * kTile * kPair, pairs,
                sp ? sp + t * kTile : nullptr, op + m0 * ldo + t * kTile, ldo, a);
      }
  });
  return out;
}

at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "gemm_bf16 takes packed bf16 weights");
  return product<Bf16Weights>(x, w, c10::nullopt);
}

at::Tensor gemm_bf16_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& w,
                          const c10::optional<at::Tensor>& row_scale, double scale) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "gemm_bf16_add_ takes packed bf16 weights");
  return product<Bf16Weights>(x, w, c10::nullopt, &y, Add{true, (float)scale, row_scale_ptr(row_scale, x.size(0))});
}

at::Tensor gemm_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "gemm_int8 takes packed int8 codes");
  return product<Int8Weights>(x, w, scale);
}

}  // namespace

TORCH_LIBRARY(tridlm, m) {
  m.def("gemm_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("gemm_bf16_add_(Tensor(a!) y, Tensor x, Tensor w, Tensor? row_scale, float scale) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) {
  m.impl("gemm_bf16", gemm_bf16);
  m.impl("gemm_int8", gemm_int8);
  m.impl("gemm_bf16_add_", gemm_bf16_add_);
}
