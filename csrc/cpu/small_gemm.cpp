// See small_gemm.h. The kernel is compiled three times, for AVX-512, AVX2+FMA and baseline
// x86-64, each with a panel width that keeps the 4 x width accumulators in that ISA's
// registers; the widest one the CPU runs is picked once, at load time. The packing
// follows the width picked.
#include "small_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace birnn {
namespace {

// Rows 0 .. R-1 of A against one panel (K x W, contiguous): C columns 0 .. cols-1.
template <int R, int W>
__attribute__((always_inline)) inline void tile(int64_t K, const float* __restrict a, int64_t a_row, int64_t a_col,
                                                const float* __restrict panel, float beta, float* __restrict c,
                                                int64_t ldc, int64_t cols) {
  float acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) acc[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = panel + k * W;
    for (int r = 0; r < R; ++r) {
      const float ark = a[r * a_row + k * a_col];
      for (int j = 0; j < W; ++j) acc[r][j] += ark * bk[j];
    }
  }
  if (cols == W) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < W; ++j) c[r * ldc + j] = beta == 0.f ? acc[r][j] : acc[r][j] + beta * c[r * ldc + j];
  } else {  // the last panel, padded with zero columns
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = beta == 0.f ? acc[r][j] : acc[r][j] + beta * c[r * ldc + j];
  }
}

// Panels outside, row blocks inside: a panel is read from memory once, then from cache
// for every block of four rows.
template <int W>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                                     int64_t a_col, const float* packed, float beta, float* c,
                                                     int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    const float* panel = packed + (n0 / W) * K * W;
    const int64_t cols = std::min<int64_t>(W, N - n0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<4, W>(K, a + m * a_row, a_row, a_col, panel, beta, c + m * ldc + n0, ldc, cols);
    switch (M - m) {
      case 3: tile<3, W>(K, a + m * a_row, a_row, a_col, panel, beta, c + m * ldc + n0, ldc, cols); break;
      case 2: tile<2, W>(K, a + m * a_row, a_row, a_col, panel, beta, c + m * ldc + n0, ldc, cols); break;
      case 1: tile<1, W>(K, a + m * a_row, a_row, a_col, panel, beta, c + m * ldc + n0, ldc, cols); break;
      default: break;
    }
  }
}

using GemmFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float, float*,
                        int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v4"))) void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* a,
                                                           int64_t a_row, int64_t a_col, const float* packed,
                                                           float beta, float* c, int64_t ldc) {
  gemm_impl<64>(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}
__attribute__((target("arch=x86-64-v3"))) void gemm_avx2(int64_t M, int64_t N, int64_t K, const float* a,
                                                         int64_t a_row, int64_t a_col, const float* packed, float beta,
                                                         float* c, int64_t ldc) {
  gemm_impl<24>(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}
#endif
void gemm_baseline(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                   float beta, float* c, int64_t ldc) {
  gemm_impl<12>(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

struct Kernel {
  GemmFn fn;
  int64_t width;
};

// BIRNN_EXT_SMALL_GEMM=avx2 or baseline picks a narrower build than the CPU could run
// (the tests check all three on one machine); a build the CPU cannot run is not taken.
const Kernel& kernel() {
  static const Kernel k = [] {
    const char* env = std::getenv("BIRNN_EXT_SMALL_GEMM");
    const std::string cap = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4") && cap.empty()) return Kernel{gemm_avx512, 64};
    if (__builtin_cpu_supports("x86-64-v3") && cap != "baseline") return Kernel{gemm_avx2, 24};
#endif
    return Kernel{gemm_baseline, 12};
  }();
  return k;
}

}  // namespace

int64_t small_gemm_packed_size(int64_t K, int64_t N) {
  const int64_t W = kernel().width;
  return (N + W - 1) / W * W * K;
}

void small_gemm_pack(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {
  const int64_t W = kernel().width;
  // A B whose rows are strided (W^T, read from W) goes in 16 x 16 tiles, so that each
  // cache line read is used 16 times while in L1.
  constexpr int64_t kTile = 16;
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    float* panel = out + (n0 / W) * K * W;
    const int64_t cols = std::min(W, N - n0);
    if (b_col == 1) {  // rows of B contiguous: row by row
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < cols; ++j) panel[k * W + j] = b[k * b_row + n0 + j];
        for (int64_t j = cols; j < W; ++j) panel[k * W + j] = 0.f;
      }
      continue;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kTile)
      for (int64_t j0 = 0; j0 < W; j0 += kTile)
        for (int64_t k = k0; k < std::min(K, k0 + kTile); ++k)
          for (int64_t j = j0; j < std::min(W, j0 + kTile); ++j)
            panel[k * W + j] = j < cols ? b[k * b_row + (n0 + j) * b_col] : 0.f;
  }
}

void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                float beta, float* c, int64_t ldc) {
  kernel().fn(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

}  // namespace birnn
