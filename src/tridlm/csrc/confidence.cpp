// A greedy diffusion pass's picks and their confidence in one call per block: for each row of logits, the
// argmax with the mask token left out (argmax_rows' pick) and its probability under the softmax of that
// row, bit for bit what torch computes for `ban(x).softmax(-1).gather(x0)` (tridlm.decoding.sampling):
// this file is built with ATen's AVX-512 vector code, and the row goes through the same steps as torch's
// fp32 softmax kernel on such a CPU -- the maximum by reduce_all, exp, the sum by reduce_all, times the
// sum's reciprocal. Only the picked entry is kept, and the fp32 row lives in a per-thread buffer that is
// reused: torch's path allocates two fresh [m, V] fp32 tensors a row (freshly mapped pages at 7 masked
// positions, ~0.9 ms a block on 2 Xeon cores). tridlm.decoding.sampling takes this path only where
// torch's CPU kernels run at AVX-512 too.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "argmax.h"

namespace {

using Vec = at::vec::Vectorized<float>;

template <class T>
std::pair<int64_t, float> pick(const T* x, int64_t V, int64_t banned, std::vector<float>& s) {
  s.resize(V);
  for (int64_t i = 0; i < V; ++i) s[i] = value(x, i);  // ban(): an exact fp32 copy, the mask id at -inf
  if (banned >= 0 && banned < V) s[banned] = -std::numeric_limits<float>::infinity();
  const float top = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s.data(), V);
  const int64_t id = first_index(s.data(), V, -1, top, std::isnan(top));  // argmax_row's pick (maximum keeps NaN)
  at::vec::map([top](Vec v) { return (v - Vec(top)).exp(); }, s.data(), s.data(), V);
  float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, s.data(), V);
  sum = 1 / sum;
  return {id, s[id] * sum};
}

std::tuple<at::Tensor, at::Tensor> greedy_confidence(const at::Tensor& x, int64_t banned) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "greedy_confidence takes x [..., V] with V > 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "greedy_confidence takes bf16 or fp32 logits");
  const int64_t V = x.size(-1);
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / V;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor ids = at::empty(sizes, x.options().dtype(at::kLong));
  at::Tensor conf = at::empty(sizes, x.options().dtype(at::kFloat));
  int64_t* ip = ids.data_ptr<int64_t>();
  float* cp = conf.data_ptr<float>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* base = xc.data_ptr();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> s;  // one row's fp32 values, kept between calls
    for (int64_t r = r0; r < r1; ++r) {
      auto [id, p] = bf16 ? pick((const uint16_t*)base + r * V, V, banned, s) : pick((const float*)base + r * V, V, banned, s);
      ip[r] = id;
      cp[r] = p;
    }
  });
  return {ids, conf};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("greedy_confidence(Tensor x, int banned) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) { m.impl("greedy_confidence", greedy_confidence); }
