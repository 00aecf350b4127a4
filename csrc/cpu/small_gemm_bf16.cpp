// See small_gemm.h: the bfloat16 step products. Two builds, one picked at load time:
//  - AVX512_BF16: vdpbf16ps multiplies 16 pairs of bfloat16 and adds both products of
//    a pair to a float32 lane. B is packed in panels of 64 columns with the k values in
//    pairs (panel[kp][j] = B(2kp, j), B(2kp+1, j)), so that one 32-bit broadcast of A's
//    pair (A(r, 2kp), A(r, 2kp+1)) feeds four instructions; 4 rows x 64 columns are 16
//    accumulators, as in the float32 kernel, with twice its products per instruction.
//  - widened: B packed as float32 panels for small_gemm, A's rows widened into a float32
//    scratch row by row, the float32 kernel (whichever of its builds the CPU runs), and
//    the result rounded to bfloat16. For processors without AVX512_BF16.
// BIRNN_EXT_BF16=widen forces the second (the tests run both on one machine).
// Each output accumulates in float32 and is rounded to bfloat16 once, to nearest even.
#include "small_gemm.h"

#include "bf16_bits.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BIRNN_HAVE_BF16_BUILD 1
#endif

namespace birnn {
namespace {

// ---------------------------------------------------------------- widened

int64_t widened_packed_size(int64_t K, int64_t N) { return small_gemm_packed_size(K, N) * int64_t(sizeof(float)); }

void widened_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, void* out) {
  std::vector<float> wide(size_t(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) wide[k * N + n] = bf16_to_float(b[k * b_row + n * b_col]);
  small_gemm_pack(K, N, wide.data(), N, 1, static_cast<float*>(out));
}

void widened_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row, int64_t a_col,
                  const void* packed, float beta, uint16_t* c, int64_t ldc) {
  // Scratch that lives with the thread: a sweep calls this every step.
  thread_local std::vector<float> a_wide, c_wide;
  a_wide.resize(size_t(M * K));
  c_wide.resize(size_t(M * N));
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) a_wide[r * K + k] = bf16_to_float(a[r * a_row + k * a_col]);
  if (beta != 0.f)
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = 0; n < N; ++n) c_wide[r * N + n] = bf16_to_float(c[r * ldc + n]);
  small_gemm(M, N, K, a_wide.data(), K, 1, static_cast<const float*>(packed), beta, c_wide.data(), N);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) c[r * ldc + n] = float_to_bf16(c_wide[r * N + n]);
}

// ---------------------------------------------------------------- AVX512_BF16

#ifdef BIRNN_HAVE_BF16_BUILD
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

constexpr int64_t kW = 64;  // columns per panel: four vectors of 16 float32 lanes

int64_t dp_packed_size(int64_t K, int64_t N) {
  return (N + kW - 1) / kW * ((K + 1) / 2) * kW * 2 * int64_t(sizeof(uint16_t));
}

void dp_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, void* out) {
  uint16_t* dst = static_cast<uint16_t*>(out);
  const int64_t pairs = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += kW) {
    uint16_t* panel = dst + (n0 / kW) * pairs * kW * 2;
    const int64_t cols = std::min(kW, N - n0);
    for (int64_t kp = 0; kp < pairs; ++kp)
      for (int64_t j = 0; j < kW; ++j)
        for (int64_t h = 0; h < 2; ++h) {
#if defined(BIRNN_BREAK_BF16_PAIR_ORDER)  // a deliberately broken kernel, for the tests
          const int64_t k = 2 * kp + (1 - h);
#else
          const int64_t k = 2 * kp + h;
#endif
          panel[(kp * kW + j) * 2 + h] = (j < cols && k < K) ? b[k * b_row + (n0 + j) * b_col] : uint16_t(0);
        }
  }
}

// A's pair (A(r, k), A(r, k+1)) as one 32-bit lane; past K, a zero.
template <bool Contiguous>
__attribute__((always_inline)) inline int32_t pair_of(const uint16_t* a, int64_t a_col, int64_t k, int64_t K) {
  uint32_t lo, hi = 0;
  if (Contiguous && k + 1 < K) {
    uint32_t both;
    std::memcpy(&both, a + k, sizeof both);
    return int32_t(both);
  }
  lo = a[k * a_col];
  if (k + 1 < K) hi = a[(k + 1) * a_col];
  return int32_t(lo | (hi << 16));
}

// Rows 0 .. R-1 of A against one packed panel: C columns 0 .. cols-1.
template <int R, bool Contiguous>
__attribute__((always_inline)) inline void dp_tile(int64_t K, const uint16_t* __restrict a, int64_t a_row,
                                                   int64_t a_col, const uint16_t* __restrict panel, float beta,
                                                   uint16_t* __restrict c, int64_t ldc, int64_t cols) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t pairs = (K + 1) / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint16_t* bk = panel + kp * kW * 2;
    __m512bh b[4];
    for (int v = 0; v < 4; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bk + v * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh ap = (__m512bh)_mm512_set1_epi32(pair_of<Contiguous>(a + r * a_row, a_col, 2 * kp, K));
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ap, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) {
      const int64_t j = v * 16;
      if (j >= cols) break;
      const __mmask16 m = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1u);
      uint16_t* cr = c + r * ldc + j;
      __m512 out = acc[r][v];
      if (beta != 0.f) {
        const __m512i old = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, cr)), 16);
        out = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_castsi512_ps(old), out);
      }
      _mm256_mask_storeu_epi16(cr, m, (__m256i)_mm512_cvtneps_pbh(out));
    }
}

template <bool Contiguous>
void dp_gemm_impl(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row, int64_t a_col,
                  const uint16_t* packed, float beta, uint16_t* c, int64_t ldc) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += kW) {
    const uint16_t* panel = packed + (n0 / kW) * pairs * kW * 2;
    const int64_t cols = std::min(kW, N - n0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      dp_tile<4, Contiguous>(K, a + m * a_row, a_row, a_col, panel, beta, c + m * ldc + n0, ldc, cols);
    const uint16_t* am = a + m * a_row;
    uint16_t* cm = c + m * ldc + n0;
    switch (M - m) {
      case 3: dp_tile<3, Contiguous>(K, am, a_row, a_col, panel, beta, cm, ldc, cols); break;
      case 2: dp_tile<2, Contiguous>(K, am, a_row, a_col, panel, beta, cm, ldc, cols); break;
      case 1: dp_tile<1, Contiguous>(K, am, a_row, a_col, panel, beta, cm, ldc, cols); break;
      default: break;
    }
  }
}

void dp_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row, int64_t a_col, const void* packed,
             float beta, uint16_t* c, int64_t ldc) {
  const uint16_t* p = static_cast<const uint16_t*>(packed);
  a_col == 1 ? dp_gemm_impl<true>(M, N, K, a, a_row, a_col, p, beta, c, ldc)
             : dp_gemm_impl<false>(M, N, K, a, a_row, a_col, p, beta, c, ldc);
}

#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- the build picked

struct Bf16Kernel {
  int64_t (*packed_size)(int64_t, int64_t);
  void (*pack)(int64_t, int64_t, const uint16_t*, int64_t, int64_t, void*);
  void (*gemm)(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const void*, float, uint16_t*, int64_t);
  const char* name;
};

const Bf16Kernel& bf16_kernel() {
  static const Bf16Kernel k = [] {
    const char* env = std::getenv("BIRNN_EXT_BF16");
    const std::string choice = env ? env : "";
    TORCH_CHECK(choice.empty() || choice == "widen" || choice == "avx512bf16",
                "BIRNN_EXT_BF16 must be 'widen' or 'avx512bf16', got '", choice, "'");
#ifdef BIRNN_HAVE_BF16_BUILD
    __builtin_cpu_init();
    if (choice != "widen" && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return Bf16Kernel{dp_packed_size, dp_pack, dp_gemm, "avx512bf16"};
#endif
    return Bf16Kernel{widened_packed_size, widened_pack, widened_gemm, "widen"};
  }();
  return k;
}

}  // namespace

int64_t small_gemm_bf16_packed_bytes(int64_t K, int64_t N) { return bf16_kernel().packed_size(K, N); }

void small_gemm_bf16_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, void* out) {
  bf16_kernel().pack(K, N, b, b_row, b_col, out);
}

void small_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row, int64_t a_col,
                     const void* packed, float beta, uint16_t* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  bf16_kernel().gemm(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

const char* small_gemm_bf16_build() { return bf16_kernel().name; }

}  // namespace birnn
