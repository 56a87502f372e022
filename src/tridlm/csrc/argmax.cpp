// Greedy picks in one pass per row: the index of each row's largest value, with one id (the mask token)
// left out, exactly as torch's argmax over a copy where that id is -inf: the first index of the maximum,
// a NaN counting as larger than any number (the first NaN wins). torch's CPU argmax does not vectorize
// over a 49k vocabulary (~0.1 ms a row on these machines); a greedy step calls it once per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <vector>

#include "argmax.h"

namespace {

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
