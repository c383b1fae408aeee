// Per-sample importance of a weight used at several positions per sample (a Linear over a
// sequence, a convolution on its unfolded input): out[g] += Σ_k |Σ_t δ_kgt x_kgtᵀ|.
//
// Each thread owns output tiles; a tile's per-sample product Σ_t δ_kt x_ktᵀ is formed in
// registers (MR rows × NR columns, a register-tiled micro-kernel), made absolute and added
// into the tile's accumulator before the next sample: the B per-sample products never reach
// memory. Operands are first packed into zero-padded panels (GEMM-style) so that the
// micro-kernel streams them; it is compiled for AVX-512, AVX2 and the baseline, picked at run
// time.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace mas_fast {
namespace cpu {
namespace {

struct Dims {
  int64_t G, B, T, O, I;
};

// Rows [o0, o0 + w) of every (k, t) of group g, packed contiguously and zero-padded to W:
// panel[(k·T + t)·W + r] = src[g, k, t, o0 + r]. The micro-kernel then reads its operands
// sequentially, whatever the row stride (powers of two alias in L1 otherwise).
template <typename A, int W>
inline void pack(const A* src, int64_t width, const Dims& s, int64_t g, int64_t o0, A* panel) {
  const int w = int(std::min<int64_t>(W, width - o0));
  const A* base = src + g * s.B * s.T * width + o0;
  for (int64_t n = 0; n < s.B * s.T; ++n)
    for (int r = 0; r < W; ++r) panel[n * W + r] = r < w ? base[n * width + r] : A(0);
}

// One MR × NR tile from packed panels, samples [k0, k1): per sample Σ_t in registers, |·|
// added into `acc`, and `acc` into the output tile.
template <typename A, int MR, int NR>
inline __attribute__((always_inline)) void tile(const A* dp, const A* xp, const Dims& s, A* out, int64_t g,
                                                int64_t o0, int64_t i0, int64_t k0, int64_t k1) {
  A acc[MR][NR] = {};
  for (int64_t k = k0; k < k1; ++k) {
    A c[MR][NR] = {};
    const A* d = dp + k * s.T * MR;
    const A* x = xp + k * s.T * NR;
    for (int64_t t = 0; t < s.T; ++t)
      for (int r = 0; r < MR; ++r) {
        const A dv = d[t * MR + r];
#pragma omp simd
        for (int j = 0; j < NR; ++j) c[r][j] += dv * x[t * NR + j];
      }
    for (int r = 0; r < MR; ++r)
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[r][j] += std::abs(c[r][j]);
  }
  const int mr = int(std::min<int64_t>(MR, s.O - o0)), nr = int(std::min<int64_t>(NR, s.I - i0));
  A* o = out + (g * s.O + o0) * s.I + i0;
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) o[r * s.I + j] += acc[r][j];
}

template <typename A>
using TileFn = void (*)(const A* dp, const A* xp, const Dims& s, A* out, int64_t g, int64_t o0, int64_t i0,
                        int64_t k0, int64_t k1);

// Samples per block: a block's packed columns of x (NR wide) stay in L2 (~128 KiB) while every
// row tile of the thread reads them.
constexpr int64_t kPanelBytes = 128 << 10;

// Packs the panels, then runs `tile_fn` (an MR × NR micro-kernel) on every tile. The OpenMP
// loops live here: their outlined bodies would not inherit a function's target("avx512f").
template <typename A, int MR, int NR>
void all_tiles(const A* delta, const A* x, A* out, const Dims& s, int threads, TileFn<A> tile_fn) {
  const int64_t row_tiles = (s.O + MR - 1) / MR, col_tiles = (s.I + NR - 1) / NR, rows = s.B * s.T;
  std::vector<A> dp(size_t(s.G * row_tiles * rows * MR)), xp(size_t(s.G * col_tiles * rows * NR));
  const int64_t packs = s.G * (row_tiles + col_tiles), tiles = s.G * col_tiles * row_tiles;
  const int64_t block = std::max<int64_t>(1, kPanelBytes / int64_t(s.T * NR * sizeof(A)));
#pragma omp parallel num_threads(threads) if (threads > 1 && tiles > 1)
  {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < packs; ++n) {
      const int64_t g = n / (row_tiles + col_tiles), p = n % (row_tiles + col_tiles);
      if (p < row_tiles)
        pack<A, MR>(delta, s.O, s, g, p * MR, dp.data() + (g * row_tiles + p) * rows * MR);
      else
        pack<A, NR>(x, s.I, s, g, (p - row_tiles) * NR, xp.data() + (g * col_tiles + p - row_tiles) * rows * NR);
    }
    // Row tiles vary fastest: consecutive tiles of a thread share the packed columns of x.
    for (int64_t k0 = 0; k0 < s.B; k0 += block) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < tiles; ++n) {
        const int64_t g = n / (col_tiles * row_tiles), rest = n % (col_tiles * row_tiles);
        const int64_t r = rest % row_tiles, c = rest / row_tiles;
        tile_fn(dp.data() + (g * row_tiles + r) * rows * MR, xp.data() + (g * col_tiles + c) * rows * NR, s, out, g,
                r * MR, c * NR, k0, std::min(s.B, k0 + block));
      }
    }
  }
}

// The micro-kernel per instruction set, tile sizes fitted to its vector registers.
#define MAS_FAST_TILE(name, target, A, MR, NR)                                                          \
  target void name(const A* dp, const A* xp, const Dims& s, A* out, int64_t g, int64_t o0, int64_t i0, \
                   int64_t k0, int64_t k1) {                                                            \
    tile<A, MR, NR>(dp, xp, s, out, g, o0, i0, k0, k1);                                                 \
  }
MAS_FAST_TILE(f32_avx512, __attribute__((target("avx512f,fma"))), float, 6, 32)
MAS_FAST_TILE(f32_avx2, __attribute__((target("avx2,fma"))), float, 4, 16)
MAS_FAST_TILE(f32_base, , float, 4, 8)
MAS_FAST_TILE(f64_avx512, __attribute__((target("avx512f,fma"))), double, 6, 16)
MAS_FAST_TILE(f64_avx2, __attribute__((target("avx2,fma"))), double, 4, 8)
MAS_FAST_TILE(f64_base, , double, 4, 4)
#undef MAS_FAST_TILE

}  // namespace

void per_sample_abs_matmul(DType dtype, int64_t G, int64_t B, int64_t T, int64_t O, int64_t I, const void* delta,
                           const void* x, void* out, int threads) {
  const Dims s{G, B, T, O, I};
  if (G == 0 || O == 0 || I == 0 || B == 0 || T == 0) return;
  const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2") &&
                                                              __builtin_cpu_supports("fma");
  if (dtype == DType::f64) {
    const auto* d = static_cast<const double*>(delta);
    const auto* xs = static_cast<const double*>(x);
    auto* o = static_cast<double*>(out);
    if (avx512) return all_tiles<double, 6, 16>(d, xs, o, s, threads, f64_avx512);
    if (avx2) return all_tiles<double, 4, 8>(d, xs, o, s, threads, f64_avx2);
    return all_tiles<double, 4, 4>(d, xs, o, s, threads, f64_base);
  }
  const auto* d = static_cast<const float*>(delta);
  const auto* xs = static_cast<const float*>(x);
  auto* o = static_cast<float*>(out);
  if (avx512) return all_tiles<float, 6, 32>(d, xs, o, s, threads, f32_avx512);
  if (avx2) return all_tiles<float, 4, 16>(d, xs, o, s, threads, f32_avx2);
  all_tiles<float, 4, 8>(d, xs, o, s, threads, f32_base);
}

}  // namespace cpu
}  // namespace mas_fast
