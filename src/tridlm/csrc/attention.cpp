// tridlm's CPU attention for narrow forwards over a KV cache: a few new tokens (a decoding step, a draft
// or verify block) attend to the first lengths[b] slots of their row's cache and to each other through a
// [T, T] mask, in one softmax. torch's fused CPU kernel costs ~0.1 ms a layer at one token whatever the
// context (it is built for long query blocks) and a static cache makes it read every slot; this reads
// only the valid ones. bf16 inputs, fp32 scores, sums and output accumulation, bf16 out.
//
// A query's bits depend only on its visible keys and their order (see attend_rows), never on which other
// rows share its work: the rows of one kv head (its grouped query heads x the new tokens) go through in
// fours that share each key and value load, scores are summed 16 keys at a time by the same tree as one
// key at a time, and the maximum and the sums of the softmax run per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16.h"
#include "rope.h"

namespace {

constexpr int64_t kChunk = 32;   // bf16 values in one 512-bit register
constexpr int kMaxChunks = 4;    // head sizes up to 128
constexpr int kRowsAtOnce = 4;   // query rows that share each key and value load


// e^x for x <= 0 (scores minus their maximum); -inf gives exactly 0. Cody-Waite reduction to
// r in [-ln2/2, ln2/2] and a degree-6 polynomial: within ~2 ulp of e^x
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(seen, _mm512_scalef_ps(p, n));
}

// a[i] summed across its lanes for 16 vectors at once, each by the tree of _mm512_reduce_add_ps (lanes i and
// i+8, then i and i+4, i and i+2, i and i+1), so every sum has the bits that call gives it. The sums come out
// transposed: lane 4l + e holds the sum of a[l + 4e] (callers put key 4l + e in a[l + 4e]).
inline __m512 reduce_add_16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // [a_2i lanes 0-7 + 8-15 | a_2i+1 likewise]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // four 4-lane partial sums per vector, one per 128-bit lane
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lanes i and i+2 inside each 128-bit lane
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));  // i and i+1
}

struct Keys {  // one head's keys or values: `n` rows of `stride` elements
  const uint16_t* p;
  int64_t stride, n;
};

// query rows [0, R) of one kv head: scores over the cache's keys, then the new tokens' keys
template <int R, int chunks>  // chunks: 32-value pieces of a head, fixed so the loops unroll into registers
void attend_rows(const uint16_t* const* q, Keys kc, Keys kn, Keys vc, Keys vn,
                 const bool* const* seen, float scale, float* scores, int64_t ld, uint16_t* const* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512bh qr[R][chunks];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < chunks; ++c) qr[r][c] = (__m512bh)_mm512_loadu_si512(q[r] + c * kChunk);
  const int64_t n = kc.n + kn.n;
  const __m512 scale16 = _mm512_set1_ps(scale);
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16) {  // 16 keys at a time, their sums reduced together
    const uint16_t* kp[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t j = j0 + 4 * (i % 4) + i / 4;  // key j0 + 4l + e in slot l + 4e: reduce_add_16's order
      kp[i] = j < kc.n ? kc.p + j * kc.stride : kn.p + (j - kc.n) * kn.stride;
    }
    for (int r = 0; r < R; ++r) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int c = 0; c < chunks; ++c)
        for (int i = 0; i < 16; ++i)
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(kp[i] + c * kChunk), qr[r][c]);
      __mmask16 visible = 0xFFFF;
      for (int64_t j = std::max(j0, kc.n); j < j0 + 16; ++j)
        if (!seen[r][j - kc.n]) visible &= (__mmask16)~(1u << (j - j0));
      _mm512_storeu_ps(scores + r * ld + j0,
                       _mm512_mask_mul_ps(_mm512_set1_ps(ninf), visible, reduce_add_16(acc), scale16));
    }
  }
  for (int64_t j = j0; j < n; ++j) {  // the last few keys one at a time
    const bool cached = j < kc.n;
    const uint16_t* k = cached ? kc.p + j * kc.stride : kn.p + (j - kc.n) * kn.stride;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + c * kChunk);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], kv, qr[r][c]);
    }
    for (int r = 0; r < R; ++r)
      scores[r * ld + j] = cached || seen[r][j - kc.n] ? _mm512_reduce_add_ps(acc[r]) * scale : ninf;
  }
  const __m512 ninf16 = _mm512_set1_ps(ninf);
  for (int r = 0; r < R; ++r) {  // softmax numerators in place
    float* s = scores + r * ld;
    __m512 top = ninf16;  // the maximum is exact in any order; max_ps(s, top) skips NaN scores as std::max did
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) top = _mm512_max_ps(_mm512_loadu_ps(s + j), top);
    const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
    if (j < n) top = _mm512_max_ps(_mm512_mask_loadu_ps(ninf16, tail, s + j), top);
    top = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (j = 0; j + 16 <= n; j += 16)
      _mm512_storeu_ps(s + j, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), top)));
    if (j < n)
      _mm512_mask_storeu_ps(s + j, tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), top)));
  }
  // their sums, each in key order, where hidden keys add an exact 0: the result depends only on the visible
  // keys and their order, not on where they sit among hidden slots (padding, other rows' drafts), so a query
  // gets the same bits in a decoding step, a verify block or any batch (TriModeLM.batch_invariant). The R
  // rows' chains run side by side.
  float total[R];
  for (int r = 0; r < R; ++r) total[r] = 0.0f;
  for (int64_t j = 0; j < n; ++j)
    for (int r = 0; r < R; ++r) total[r] += scores[r * ld + j];
  constexpr int wide = chunks * 2;  // fp32 registers per head
  __m512 o[R][wide];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < wide; ++c) o[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* v = j < kc.n ? vc.p + j * vc.stride : vn.p + (j - kc.n) * vn.stride;
    for (int c = 0; c < wide; ++c) {
      const __m512 vv = load16(v + 16 * c);
      for (int r = 0; r < R; ++r) o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * ld + j]), vv, o[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(total[r] > 0 ? 1.0f / total[r] : 0.0f);
    for (int c = 0; c < wide; ++c)
      _mm256_storeu_si256((__m256i*)(out[r] + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], inv)));
  }
}

// attend_rows for `rows` (1..kRowsAtOnce) rows of `chunks` (1..kMaxChunks) 32-value pieces
template <int R>
void attend_chunks(int chunks, const uint16_t* const* q, Keys kc, Keys kn, Keys vc, Keys vn, const bool* const* seen,
                   float scale, float* scores, int64_t ld, uint16_t* const* out) {
  switch (chunks) {
    case 1: return attend_rows<R, 1>(q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    case 2: return attend_rows<R, 2>(q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    case 3: return attend_rows<R, 3>(q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    default: return attend_rows<R, 4>(q, kc, kn, vc, vn, seen, scale, scores, ld, out);
  }
}

void attend(int rows, int chunks, const uint16_t* const* q, Keys kc, Keys kn, Keys vc, Keys vn, const bool* const* seen,
            float scale, float* scores, int64_t ld, uint16_t* const* out) {
  switch (rows) {
    case 1: return attend_chunks<1>(chunks, q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    case 2: return attend_chunks<2>(chunks, q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    case 3: return attend_chunks<3>(chunks, q, kc, kn, vc, vn, seen, scale, scores, ld, out);
    default: return attend_chunks<4>(chunks, q, kc, kn, vc, vn, seen, scale, scores, ld, out);
  }
}

// Where head h of token t of row b lies in a [B, heads, T, D] layout: p + b s0 + h s1 + (t + offset[b]) s2,
// offset (optional) per row: a cache's new entries start after each row's own
struct HeadRows {
  const uint16_t* p;
  int64_t s0, s1, s2;
  const int64_t* offset = nullptr;
  const uint16_t* at(int64_t b, int64_t h, int64_t t) const {
    return p + b * s0 + h * s1 + (t + (offset ? offset[b] : 0)) * s2;
  }
};

HeadRows head_rows(const at::Tensor& t) {  // a [B, heads, n, D] tensor
  return {(const uint16_t*)t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// out(b, h, t) = softmax over cache slots [0, lengths[b]) and new tokens j with mask[b, t, j]: B x Hkv kv heads,
// G = H / Hkv query heads each, T new tokens, head size D, S cache slots
void attend_heads(int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t S, const int64_t* lengths,
                  HeadRows q, HeadRows kc, HeadRows vc, HeadRows kn, HeadRows vn, const bool* mask, HeadRows out,
                  float scale) {
  const int64_t G = H / Hkv, chunks = D / kChunk;
  // a unit of work: up to kRowsAtOnce query rows of one kv head, drawn from its G query heads x T tokens
  // (token fastest), so that the rows of grouped-query heads share every key and value load
  const int64_t rows_per_kv = G * T, groups = (rows_per_kv + kRowsAtOnce - 1) / kRowsAtOnce;
  at::parallel_for(0, B * Hkv * groups, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (Hkv * groups), kv = u / groups % Hkv, r0 = u % groups * kRowsAtOnce;
      const int64_t n_cached = std::min<int64_t>(std::max<int64_t>(lengths[b], 0), S);
      const Keys kcb{kc.at(b, kv, 0), kc.s2, n_cached}, vcb{vc.at(b, kv, 0), vc.s2, n_cached};
      const Keys knb{kn.at(b, kv, 0), kn.s2, T}, vnb{vn.at(b, kv, 0), vn.s2, T};
      const int64_t ld = n_cached + T;
      scores.resize(kRowsAtOnce * ld);
      const int rows = (int)std::min<int64_t>(kRowsAtOnce, rows_per_kv - r0);
      const uint16_t* qp[kRowsAtOnce];
      const bool* seen[kRowsAtOnce];
      uint16_t* op[kRowsAtOnce];
      for (int r = 0; r < rows; ++r) {
        const int64_t h = kv * G + (r0 + r) / T, t = (r0 + r) % T;
        qp[r] = q.at(b, h, t);
        seen[r] = mask + (b * T + t) * T;
        op[r] = const_cast<uint16_t*>(out.at(b, h, t));
      }
      attend(rows, (int)chunks, qp, kcb, knb, vcb, vnb, seen, scale, scores.data(), ld, op);
    }
  });
}

void check_heads(const at::Tensor& t, const char* name, int64_t B, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(3) == D && t.stride(3) == 1 &&
                  t.scalar_type() == at::kBFloat16,
              "attend_bf16: ", name, " must be bf16 [B, heads, n, ", D, "] with contiguous rows");
}

void check_shapes(int64_t D, int64_t H, int64_t Hkv, const at::Tensor& mask, int64_t B, int64_t T,
                  const at::Tensor& lengths, const char* op) {
  TORCH_CHECK(D % kChunk == 0 && D / kChunk <= kMaxChunks, op, " takes head sizes 32, 64, 96 or 128, got ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": query heads must be a multiple of the key/value heads");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(0) == B && mask.size(1) == T &&
                  mask.size(2) == T,
              op, " takes the new tokens' mask as bool [B, T, T]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == B, op, " takes int64 lengths [B]");
}

// out[b, t, h] = softmax over cache slots [0, lengths[b]) and new tokens j with mask[b, t, j]
at::Tensor attend_bf16(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& lengths, const at::Tensor& k_new, const at::Tensor& v_new,
                       const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "attend_bf16 takes q as [B, heads, T, D]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  const int64_t S = k_cache.size(2);
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_new, "k_new"},
                         {&v_new, "v_new"}})
    check_heads(*t, name, B, D);
  check_shapes(D, H, Hkv, mask, B, T, lengths, "attend_bf16");
  TORCH_CHECK(k_new.size(1) == Hkv && v_cache.size(1) == Hkv && v_new.size(1) == Hkv,
              "attend_bf16: k_cache, v_cache, k_new and v_new must have the same heads");
  TORCH_CHECK(k_new.size(2) == T && v_new.size(2) == T && v_cache.size(2) == S, "attend_bf16: mismatched lengths");
  const at::Tensor m = mask.contiguous(), len = lengths.contiguous();
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  const HeadRows o{(const uint16_t*)out.data_ptr(), T * H * D, D, H * D};
  attend_heads(B, H, Hkv, T, D, S, len.data_ptr<int64_t>(), head_rows(q), head_rows(k_cache), head_rows(v_cache),
               head_rows(k_new), head_rows(v_new), m.data_ptr<bool>(), o, (float)scale);
  return out;
}

// One part of a forward's attention in one call, from its projections to its output: rotary embedding of q
// and k (cos and sin [B, 1, T, D]), with `write` the new keys and values stored after each row's cache entries
// (kv_write's slots), and attention over the cache and the new tokens (attend_bf16's) into out. q [B T, H D],
// k and v [B T, Hkv D] (the fused projection's columns: rows may be strided), out [B T, H D] (rows may be
// strided: a part's span of a joint forward's output). The bits of rope_bf16, kv_write and attend_bf16 in turn.
void attend_part_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                      const at::Tensor& lengths, const at::Tensor& mask, double scale, bool write) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "attend_part_bf16 takes bf16 caches [B, Hkv, S, D] of one shape with contiguous rows");
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}})
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->scalar_type() == at::kBFloat16,
                "attend_part_bf16: ", name, " must be bf16 [B T, heads D] with contiguous rows");
  const int64_t N = q.size(0), H = q.size(1) / D, T = B ? N / B : 0;
  TORCH_CHECK(B > 0 && T * B == N && q.size(1) == H * D && out.size(0) == N && out.size(1) == H * D &&
                  k.size(0) == N && v.size(0) == N && k.size(1) == Hkv * D && v.size(1) == Hkv * D,
              "attend_part_bf16: q and out must be [B T, H D], k and v [B T, Hkv D] for the cache's B, Hkv and D");
  check_shapes(D, H, Hkv, mask, B, T, lengths, "attend_part_bf16");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&cos, "cos"}, {&sin, "sin"}})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == 1 && t->size(2) == T && t->size(3) == D &&
                    t->stride(3) == 1 && t->scalar_type() == at::kBFloat16,
                "attend_part_bf16: ", name, " must be bf16 [B, 1, T, D] with contiguous rows");
  const at::Tensor m = mask.contiguous(), len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  if (write)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(lp[b] >= 0 && lp[b] + T <= S, "attend_part_bf16: row ", b, " holds ", lp[b], " entries; ", T,
                  " more do not fit in ", S, " slots");
  at::Tensor qr = at::empty({N, H * D}, q.options());  // rotated queries, [B, T, H, D]
  at::Tensor kr = write ? at::Tensor() : at::empty({N, Hkv * D}, k.options());  // rotated keys, when not stored
  const auto *qp = (const uint16_t*)q.data_ptr(), *kp = (const uint16_t*)k.data_ptr(), *vp = (const uint16_t*)v.data_ptr();
  const auto *cp = (const uint16_t*)cos.data_ptr(), *sp = (const uint16_t*)sin.data_ptr();
  auto* qrp = (uint16_t*)qr.data_ptr();
  const HeadRows cache_k{(const uint16_t*)k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), lp};
  const HeadRows cache_v{(const uint16_t*)v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), lp};
  const HeadRows new_k = write ? cache_k : HeadRows{(const uint16_t*)kr.data_ptr(), T * Hkv * D, D, Hkv * D};
  const HeadRows new_v = write ? cache_v : HeadRows{vp, T * v.stride(0), D, v.stride(0)};
  const int64_t heads = H + Hkv;
  at::parallel_for(0, N * heads, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bt = u / heads, h = u % heads, b = bt / T, t = bt % T;
      const uint16_t* c = cp + b * cos.stride(0) + t * cos.stride(2);
      const uint16_t* s = sp + b * sin.stride(0) + t * sin.stride(2);
      if (h < H) {
        rotate_head(qp + bt * q.stride(0) + h * D, c, s, qrp + (bt * H + h) * D, D / 2);
        continue;
      }
      const int64_t kv = h - H;
      rotate_head(kp + bt * k.stride(0) + kv * D, c, s, const_cast<uint16_t*>(new_k.at(b, kv, t)), D / 2);
      if (write) std::memcpy(const_cast<uint16_t*>(new_v.at(b, kv, t)), vp + bt * v.stride(0) + kv * D, D * 2);
    }
  });
  const HeadRows qh{qrp, T * H * D, D, H * D};
  const HeadRows oh{(const uint16_t*)out.data_ptr(), T * out.stride(0), D, out.stride(0)};
  const HeadRows cached_k{cache_k.p, cache_k.s0, cache_k.s1, cache_k.s2}, cached_v{cache_v.p, cache_v.s0, cache_v.s1, cache_v.s2};
  attend_heads(B, H, Hkv, T, D, S, lp, qh, cached_k, cached_v, new_k, new_v, m.data_ptr<bool>(), oh, (float)scale);
}

// k_cache[b, :, lengths[b] + t] = k_new[b, :, t] (and v): a forward's new keys and values stored after each
// row's entries, rows at different lengths in one call (torch's advanced indexing takes several ops and
// index tensors a layer). The lengths are not advanced here: the caller does that once per forward.
void kv_write(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& lengths, const at::Tensor& k_new,
              const at::Tensor& v_new) {
  TORCH_CHECK(k_cache.dim() == 4 && k_new.dim() == 4, "kv_write takes [B, heads, slots, D] caches and new entries");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3), T = k_new.size(2);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&k_new, "k_new"}, {&v_new, "v_new"}}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(3) == D && t->stride(3) == 1 &&
                    t->scalar_type() == k_cache.scalar_type(),
                "kv_write: ", name, " must be [", B, ", ", H, ", n, ", D, "] of the cache's dtype, rows contiguous");
  }
  TORCH_CHECK(v_cache.size(2) == S && v_new.size(2) == T, "kv_write: mismatched lengths");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == B, "kv_write takes int64 lengths [B]");
  const at::Tensor len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] + T <= S, "kv_write: row ", b, " holds ", lp[b], " entries; ", T,
                " more do not fit in ", S, " slots");
  const int64_t bytes = D * k_cache.element_size();
  at::parallel_for(0, B * H, 16, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / H, h = u % H;
      for (auto [cache, fresh] : {std::pair{&k_cache, &k_new}, {&v_cache, &v_new}}) {
        char* dst = (char*)cache->data_ptr() + (b * cache->stride(0) + h * cache->stride(1) + lp[b] * cache->stride(2)) *
                                                   cache->element_size();
        const char* src = (const char*)fresh->data_ptr() + (b * fresh->stride(0) + h * fresh->stride(1)) *
                                                               fresh->element_size();
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(dst + t * cache->stride(2) * cache->element_size(),
                      src + t * fresh->stride(2) * fresh->element_size(), bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("attend_bf16(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor k_new, Tensor v_new, "
        "Tensor mask, float scale) -> Tensor");
  m.def("kv_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, Tensor k_new, Tensor v_new) -> ()");
  m.def("attend_part_bf16(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor lengths, Tensor mask, float scale, bool write) -> ()");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) {
  m.impl("attend_bf16", attend_bf16);
  m.impl("kv_write", kv_write);
  m.impl("attend_part_bf16", attend_part_bf16);
}
