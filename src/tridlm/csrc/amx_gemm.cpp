// tridlm's bf16 product for wide forwards on CPUs with AMX (Intel Sapphire Rapids and later):
// y[M, N] = x[M, K] @ W[N, K]^T (or y += s * x @ W^T in place: gemm_bf16_amx_add_), bf16 in and out,
// fp32 sums, W in small_gemm.cpp's packed layout [N/32][K/2][32][2]. That layout is already what an AMX
// B tile wants (16 input pairs x 16 outputs x 2, a row every 128 bytes), so the same packed copy serves
// both kernels.
//
// Each output is summed over K in one order, 32 inputs per tile step, whatever M is: a row's result does
// not depend on the rows beside it, at any width (torch's bf16 GEMM changes kernel with the row count).
// The order is not the AVX-512 kernel's (their roundings differ in a few outputs in 10^4), so a weight
// takes one of the two at every width when rows must keep their solo bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "epilogue.h"

namespace {

constexpr int64_t kTile = 32, kPair = 2, kStep = 32, kTileRows = 16, kTilesPerConfig = 4;
// Cache lines of the next weight tile asked into L2 per tile step (4 tile products). Without them a tile's
// first row block waits on memory and its later blocks leave memory idle; ahead, the next tile streams in
// while this one's blocks run. The default model's 30 layers at 8-120 rows, 2 Xeon cores: 3-7 % faster
// (no change at 1 row); 16 lines a step were slower than none at 88-96 rows (they crowd out the tile loads).
constexpr int kPrefetchLines = 8;
constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile state

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {  // the kernel lets a process use the tile registers only once it asked
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

// Tiles: 0-3 sums (rows 0-15 / 16-31 x outputs 0-15 / 16-31), 4-5 x (rows 0-15 / 16-31), 6-7 W.
// `rows` is how many rows of x this block holds (1..32); the second row group exists when rows > 16.
void configure(int64_t rows) {
  TileConfig c;
  const uint8_t first = (uint8_t)std::min(rows, kTileRows), second = (uint8_t)std::max<int64_t>(rows - kTileRows, 0);
  for (int t : {0, 1}) { c.rows[t] = first; c.colsb[t] = 64; }
  for (int t : {2, 3}) { c.rows[t] = second; c.colsb[t] = second ? 64 : 0; }
  c.rows[4] = first; c.colsb[4] = 64;
  c.rows[5] = second; c.colsb[5] = second ? 64 : 0;
  for (int t : {6, 7}) { c.rows[t] = kTileRows; c.colsb[t] = 64; }
  asm volatile("" : : "r"(&c) : "memory");  // gcc 12 drops these stores: it does not see ldtilecfg read them
  _tile_loadconfig(&c);
}

// The next weight tile's bytes not yet asked for: [next, end)
struct Ahead {
  const char* next;
  const char* end;
  inline void step() {
    for (int i = 0; i < kPrefetchLines && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// one block of up to 32 rows of x against one packed tile of 32 outputs; sums land in c [rows][32]
template <bool kTwoGroups>
inline void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* c, Ahead& ahead) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoGroups) { _tile_zero(2); _tile_zero(3); }
  constexpr int64_t w_stride = kTile * kPair * 2;  // bytes from one input pair to the next
  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    ahead.step();
    const uint16_t* wk = w + (k0 / kPair) * kTile * kPair;
    _tile_loadd(6, wk, w_stride);
    _tile_loadd(7, wk + kTileRows * kPair, w_stride);
    _tile_loadd(4, x + k0, ldx * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoGroups) {
      _tile_loadd(5, x + kTileRows * ldx + k0, ldx * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, kTile * 4);
  _tile_stored(1, c + kTileRows, kTile * 4);
  if (kTwoGroups) {
    _tile_stored(2, c + kTileRows * kTile, kTile * 4);
    _tile_stored(3, c + kTileRows * kTile + kTileRows, kTile * 4);
  }
}

inline void store_rows(const float* c, int64_t rows, uint16_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < 2; ++h)  // round to nearest even, as the AVX-512 kernel does
      _mm256_storeu_si256((__m256i*)(out + r * ldo + kTileRows * h),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * kTile + kTileRows * h)));
}

// out += scale * row_scale[r] * sums, rounded once (gemm_bf16_add_'s epilogue, small_gemm.cpp)
inline void add_rows(const float* c, int64_t rows, uint16_t* out, int64_t ldo, float scale, const float* row_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = row_scale ? scale * row_scale[r] : scale;
    for (int h = 0; h < 2; ++h)
      add_store16(_mm512_loadu_ps(c + r * kTile + kTileRows * h), s, out + r * ldo + kTileRows * h);
  }
}

// Where output tiles from `first` on go instead of the product's own output (the drafter's A rows: see
// gemm_bf16_amx_drafted): rows of ld elements from out
struct TilesApart {
  int64_t first;
  uint16_t* out;
  int64_t ld;
};

// out = x @ W^T, or with `add` out (the caller's y, in place) += scale * row_scale * (x @ W^T); with `apart`
// the output tiles from apart->first on land in apart->out
at::Tensor amx_product(const at::Tensor& x, const at::Tensor& w, at::Tensor* add, float scale, const float* row_scale,
                       const TilesApart* apart = nullptr) {
  TORCH_CHECK(amx_ready(), "gemm_bf16_amx needs AMX, which this CPU or kernel does not grant");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "gemm_bf16_amx takes bf16 x [M, K]");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kTile && w.size(3) == kPair && w.is_contiguous() &&
                  w.scalar_type() == at::kBFloat16,
              "gemm_bf16_amx takes bf16 weights packed as [N/32, K/2, 32, 2]");
  const int64_t M = x.size(0), K = x.size(1), tiles = w.size(0), pairs = w.size(1), N = tiles * kTile;
  TORCH_CHECK(pairs * kPair == K, "x has ", K, " inputs, the packed weights ", pairs * kPair);
  TORCH_CHECK(K % kStep == 0, "gemm_bf16_amx takes a multiple of ", kStep, " inputs, not ", K);
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t ldx = xc.stride(0);
  const int64_t own_tiles = apart ? apart->first : tiles;
  at::Tensor out = add ? *add : at::empty({M, own_tiles * kTile}, x.options());
  if (add) check_addend(out, M, N);
  const int64_t ldo = out.stride(0);
  if (M == 0) return out;
  const uint16_t* xp = (const uint16_t*)xc.data_ptr();
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  auto put = [&](const float* c, int64_t rows, int64_t m0, int64_t t) {
    if (add) add_rows(c, rows, op + m0 * ldo + t * kTile, ldo, scale, row_scale ? row_scale + m0 : nullptr);
    else if (t >= own_tiles) store_rows(c, rows, apart->out + m0 * apart->ld + (t - own_tiles) * kTile, apart->ld);
    else store_rows(c, rows, op + m0 * ldo + t * kTile, ldo);
  };
  const int64_t full = M / kTile * kTile, rest = M - full;  // blocks of 32 rows, then what is left
  // The rest takes a tile configuration of its own row count, loaded after the full blocks of every
  // kTilesPerConfig tiles and back after their rests (loaded twice a tile, configurations took 2 % of a
  // 24 AR + 8 diffusion step's CPU time; twice per four tiles, 0.5 %): cheaper than copying the rest into
  // a zeroed 32-row block on every call (torch's zeros and copy_: 2 ms a step of 88 rows over the default
  // model's 30 layers, 2 Xeon cores) and summing its padding. Each row's sums are the same either way.
  const uint16_t* rp = xp + full * ldx;
  const int64_t tile_bytes = pairs * kTile * kPair * 2;
  auto next_tile = [&](int64_t t) { return (const char*)wp + (t + 1) * tile_bytes; };
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float c[kTile * kTile];
    int64_t configured = -1;  // the row count the tile registers are set up for
    Ahead ahead{next_tile(t0), next_tile(t0)};
    auto look_past = [&](int64_t t) {  // from tile t's first block on, tile t + 1 may stream in
      if (t + 1 < t1) ahead = {std::max(ahead.next, next_tile(t)), next_tile(t + 1)};
    };
    for (int64_t g0 = t0; g0 < t1; g0 += kTilesPerConfig) {  // a few tiles' full blocks, then their rests
      const int64_t g1 = std::min(t1, g0 + kTilesPerConfig);
      if (full && configured != kTile) configure(configured = kTile);
      for (int64_t t = g0; t < g1; ++t) {
        look_past(t);
        for (int64_t m0 = 0; m0 < full; m0 += kTile) {
          block<true>(xp + m0 * ldx, ldx, wp + t * pairs * kTile * kPair, K, c, ahead);
          put(c, kTile, m0, t);
        }
      }
      if (!rest) continue;
      if (configured != rest) configure(configured = rest);
      for (int64_t t = g0; t < g1; ++t) {  // these tiles' weights are still in L2
        if (!full) look_past(t);
        if (rest > kTileRows) block<true>(rp, ldx, wp + t * pairs * kTile * kPair, K, c, ahead);
        else block<false>(rp, ldx, wp + t * pairs * kTile * kPair, K, c, ahead);
        put(c, rest, full, t);
      }
    }
    _tile_release();
  });
  return out;
}

at::Tensor gemm_bf16_amx(const at::Tensor& x, const at::Tensor& w) { return amx_product(x, w, nullptr, 1.0f, nullptr); }

at::Tensor gemm_bf16_amx_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& row_scale, double scale) {
  return amx_product(x, w, &y, (float)scale, row_scale_ptr(row_scale, x.size(0)));
}

// The fused projection of a model with a LoRA drafter: w packs the base rows (n_base, a whole number of tiles)
// and then the drafter's A rows (k of them, a multiple of 32); b packs the B blocks [n_base, k]. Returns the
// base outputs [M, n_base] with the delta added on rows [start, stop), scaled by scale * row_scale[r - start]
// (row_scale [stop - start] or none): the bits of gemm_bf16_amx over w, then gemm_bf16_amx_add_ of the A
// outputs through b on those rows. Two passes, each over every thread: one product over base and A rows
// (the A outputs kept apart, in bf16), then the delta's products (one input step each) added onto the span.
// (Adding each block's delta in the first pass's epilogue left its short product's latency bare at every
// output tile: hot in L2, 576 x 576 at 88 rows, 1.9x the plain product's time against 1.5x now.)
at::Tensor gemm_bf16_amx_drafted(const at::Tensor& x, const at::Tensor& w, int64_t n_base, const at::Tensor& b,
                                 const c10::optional<at::Tensor>& row_scale, int64_t start, int64_t stop, double scale) {
  TORCH_CHECK(w.dim() == 4 && n_base % kTile == 0 && n_base > 0 && n_base < w.size(0) * kTile,
              "gemm_bf16_amx_drafted: the packed weights must hold whole tiles of base rows, then the A rows");
  const int64_t M = x.size(0), base_tiles = n_base / kTile, k = (w.size(0) - base_tiles) * kTile;
  TORCH_CHECK(b.dim() == 4 && b.size(0) == base_tiles && b.size(1) * kPair == k && b.is_contiguous() &&
                  b.scalar_type() == at::kBFloat16,
              "gemm_bf16_amx_drafted: b must pack the B blocks [n_base, k] for the A rows' k = ", k);
  TORCH_CHECK(0 <= start && start <= stop && stop <= M, "gemm_bf16_amx_drafted: rows [", start, ", ", stop,
              ") are not within the ", M, " rows of x");
  const int64_t span = stop - start;
  at::Tensor scales;
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->numel() == span,
                "gemm_bf16_amx_drafted: row_scale needs one fp32 value per row in [start, stop)");
    scales = row_scale->reshape({span}).contiguous();
  }
  if (!span) return amx_product(x, w.narrow(0, 0, base_tiles), nullptr, 1.0f, nullptr);
  at::Tensor xa = at::empty({M, k}, x.options());
  const TilesApart a_rows{base_tiles, (uint16_t*)xa.data_ptr(), k};
  at::Tensor y = amx_product(x, w, nullptr, 1.0f, nullptr, &a_rows);
  at::Tensor drafts = y.narrow(0, start, span);
  amx_product(xa.narrow(0, start, span), b, &drafts, (float)scale, scales.defined() ? scales.data_ptr<float>() : nullptr);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tridlm, m) {
  m.def("gemm_bf16_amx(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_bf16_amx_add_(Tensor(a!) y, Tensor x, Tensor w, Tensor? row_scale, float scale) -> Tensor(a!)");
  m.def("gemm_bf16_amx_drafted(Tensor x, Tensor w, int n_base, Tensor b, Tensor? row_scale, int start, int stop, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tridlm, CPU, m) {
  m.impl("gemm_bf16_amx", gemm_bf16_amx);
  m.impl("gemm_bf16_amx_add_", gemm_bf16_amx_add_);
  m.impl("gemm_bf16_amx_drafted", gemm_bf16_amx_drafted);
}
