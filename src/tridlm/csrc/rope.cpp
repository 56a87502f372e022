// Rotary embedding of bf16 queries and keys in one call: x * cos + rotate_half(x) * sin with the roundings
// of the model's torch formula in eager mode (each product rounded to bf16, then their sum), so its bits
// are that formula's. Fourteen small ops a layer (two products, a negation, a concatenation and a sum
// each for q and k, and their views) become one call: most of the rotation's cost at a few tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <tuple>

#include "rope.h"

namespace {

void check(const at::Tensor& t, const char* name, int64_t B, int64_t T, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(2) == T && t.size(3) == D && t.stride(3) == 1 &&
                  t.scalar_type() == at::kBFloat16,
              "rope_bf16: ", name, " must be bf16 [", B, ", heads, ", T, ", ", D, "] with contiguous rows, got ",
              t.sizes());
}

// q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B, 1, T, D] -> rotated q and k, [B, heads, T, D] views of
// [B, T, heads, D] tensors (the layout the projections had)
std::tuple<at::Tensor, at::Tensor> rope_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4, "rope_bf16 takes q as [B, heads, T, D]");
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3), Hq = q.size(1), Hk = k.size(1);
  TORCH_CHECK(D % 32 == 0, "rope_bf16 takes head sizes that are a multiple of 32, got ", D);
  check(q, "q", B, T, D);
  check(k, "k", B, T, D);
  check(cos, "cos", B, T, D);
  check(sin, "sin", B, T, D);
  TORCH_CHECK(cos.size(1) == 1 && sin.size(1) == 1, "rope_bf16 takes one cos/sin table per token, [B, 1, T, D]");
  at::Tensor qo = at::empty({B, T, Hq, D}, q.options()), ko = at::empty({B, T, Hk, D}, k.options());
  const auto* qp = (const uint16_t*)q.data_ptr();
  const auto* kp = (const uint16_t*)k.data_ptr();
  const auto* cp = (const uint16_t*)cos.data_ptr();
  const auto* sp = (const uint16_t*)sin.data_ptr();
  auto* qop = (uint16_t*)qo.data_ptr();
  auto* kop = (uint16_t*)ko.data_ptr();
  const int64_t H = Hq + Hk;
  at::parallel_for(0, B * T * H, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bt = u / H, h = u % H, b = bt / T, t = bt % T;
      const uint16_t* c = cp + b * cos.stride(0) + t * cos.stride(2);
      const uint16_t* s = sp + b * sin.stride(0) + t * sin.stride(2);
      if (h < Hq)
        rotate_head(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2), c, s, qop + (bt * Hq + h) * D, D / 2);
      else
        rotate_head(kp + b * k.stride(0) + (h - Hq) * k.stride(1) + t * k.stride(2), c, s,
                    kop + (bt * Hk + h - Hq) * D, D / 2);
    }
  });
  return {qo.transpose(1, 2), ko.transpose(1, 2)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("rope_bf16(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) { m.impl("rope_bf16", rope_bf16); }
