// See small_gemm.h: the bfloat16 step products. Two kinds of panels, each with its kernel,
// picked per layer call (bf16_rule() below, from dispatch_rules.h):
//  - AVX512_BF16: vdpbf16ps multiplies 16 pairs of bfloat16 and adds both products of
//    a pair to a float32 lane. B is packed in panels of 64 columns with the k values in
//    pairs (panel[kp][j] = B(2kp, j), B(2kp+1, j)), so that one 32-bit broadcast of A's
//    pair (A(r, 2kp), A(r, 2kp+1)) feeds four instructions; 4 rows x 64 columns are 16
//    accumulators, as in the float32 kernel, with twice its products per instruction.
//    For processors whose vdpbf16ps issues as often as an FMA, and batches of a row or
//    two on the others.
//  - widened: B packed as float32 panels for small_gemm (widened as packed), A's rows
//    widened into a float32 scratch, the float32 kernel (whichever of its builds the CPU
//    runs) rounding each output to bfloat16 as it stores it. For processors without
//    AVX512_BF16, and larger batches on those where it runs at half the float32 rate.
// BIRNN_EXT_BF16=widen or avx512bf16 forces one at every batch (the tests run both).
// Each output accumulates in float32 and is rounded to bfloat16 once, to nearest even.
#include "small_gemm.h"

#include "bf16_bits.h"
#include "dispatch_rules.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BIRNN_HAVE_BF16_BUILD 1
#endif

namespace birnn {
namespace {

// B's element as bfloat16 bits: a bfloat16 as it is, a float32 rounded as .to(torch.bfloat16)
// rounds it, so that packing float32 weights gives the very panels of packing their cast.
inline uint16_t bf16_bits_of(uint16_t v) { return v; }
inline uint16_t bf16_bits_of(float v) { return float_to_bf16(v); }

// ---------------------------------------------------------------- widened

int64_t widened_packed_size(int64_t K, int64_t N) { return small_gemm_packed_size(K, N) * int64_t(sizeof(float)); }

void widened_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, void* out) {
  small_gemm_pack(K, N, b, b_row, b_col, static_cast<float*>(out));
}
void widened_pack(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, void* out) {
  small_gemm_pack_rounded_to_bf16(K, N, b, b_row, b_col, static_cast<float*>(out));
}

void widened_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row, int64_t a_col,
                  const void* packed, float beta, uint16_t* c, int64_t ldc) {
  // A widened into scratch that lives with the thread (a sweep calls this every step),
  // C rounded in small_gemm's store: M x K conversions against M x N x K products.
  thread_local std::vector<float> a_wide;
  a_wide.resize(size_t(M * K));
  float* aw = a_wide.data();
  for (int64_t r = 0; r < M; ++r) {
    const uint16_t* ar = a + r * a_row;
    if (a_col == 1)
      bf16_to_float(ar, K, aw + r * K);
    else
      for (int64_t k = 0; k < K; ++k) aw[r * K + k] = bf16_to_float(ar[k * a_col]);
  }
  small_gemm(M, N, K, aw, K, 1, static_cast<const float*>(packed), beta, c, ldc);
}

// ---------------------------------------------------------------- AVX512_BF16

#ifdef BIRNN_HAVE_BF16_BUILD
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

constexpr int64_t kW = 64;  // columns per panel: four vectors of 16 float32 lanes

int64_t dp_packed_size(int64_t K, int64_t N) {
  return (N + kW - 1) / kW * ((K + 1) / 2) * kW * 2 * int64_t(sizeof(uint16_t));
}

// 32 consecutive k of one column of B as 16 pairs, one per 32-bit lane (k even in the low
// half), lanes past K zero; a float32 B rounded as float_to_bf16 rounds (to nearest even,
// NaN to 0x7FC0: vcvtne2ps2bf16 would flush denormals, which a cast does not).
inline __m512i pairs_of(const uint16_t* col, int64_t left) {
  const __mmask32 m = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
  return _mm512_maskz_loadu_epi16(m, col);
}
inline __m256i round_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline __m512i pairs_of(const float* col, int64_t left) {
  auto mask = [](int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); };
  const __m256i lo = round_to_bf16(_mm512_maskz_loadu_ps(mask(left), col));
  const __m256i hi = round_to_bf16(_mm512_maskz_loadu_ps(mask(left - 16), col + 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// r[i] = row i of a 16 x 16 matrix of 32-bit words in, column i out.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + e]: word e of each 128-bit lane, from rows 4g .. 4g + 3.
  __m512i u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), x1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// dp_pack where B's columns are contiguous in k (B the transpose of a weight as nn.LSTM
// stores it, b_row == 1): each column's pairs are one 32-bit word apart, and a panel's
// row of pairs is those words of 64 columns side by side. Blocks of 16 columns x 16
// pairs go through a transpose in registers; columns past N are zeros.
template <typename S>
void dp_pack_columns(int64_t K, int64_t N, const S* b, int64_t b_col, uint32_t* dst) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += kW) {
    uint32_t* panel = dst + (n0 / kW) * pairs * kW;
    for (int64_t j0 = 0; j0 < kW; j0 += 16)
      for (int64_t kp0 = 0; kp0 < pairs; kp0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t n = n0 + j0 + i;
          r[i] = n < N ? pairs_of(b + n * b_col + 2 * kp0, K - 2 * kp0) : _mm512_setzero_si512();
#if defined(BIRNN_BREAK_BF16_PAIR_ORDER)  // a deliberately broken kernel, for the tests
          r[i] = _mm512_rol_epi32(r[i], 16);
#endif
        }
        transpose16(r);
        const int64_t q_end = std::min<int64_t>(16, pairs - kp0);
        for (int64_t q = 0; q < q_end; ++q) _mm512_storeu_si512(panel + (kp0 + q) * kW + j0, r[q]);
      }
  }
}

template <typename S>
void dp_pack(int64_t K, int64_t N, const S* b, int64_t b_row, int64_t b_col, void* out) {
  uint16_t* dst = static_cast<uint16_t*>(out);
  const int64_t pairs = (K + 1) / 2;
  if (b_row == 1 && K > 0) return dp_pack_columns(K, N, b, b_col, static_cast<uint32_t*>(out));
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
          panel[(kp * kW + j) * 2 + h] = (j < cols && k < K) ? bf16_bits_of(b[k * b_row + (n0 + j) * b_col])
                                                              : uint16_t(0);
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
#else  // no AVX512_BF16 build here: bf16_rule() never picks the dot panels, dot() asserts so
int64_t dp_packed_size(int64_t, int64_t) { return 0; }
template <typename S>
void dp_pack(int64_t, int64_t, const S*, int64_t, int64_t, void*) {}
void dp_gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const void*, float, uint16_t*, int64_t) {}
#endif

// ---------------------------------------------------------------- the panels picked

struct Bf16Rule {
  bool has_dot;            // the processor runs the dot-product kernels
  int64_t dot_max_batch;   // dot panels up to this batch, widened above (-1: never dot)
  bool large_in_float32;   // the large products: float32 copies for a float32 GEMM
  const char* name;
};

// Where the processor runs vdpbf16ps at least at its float32 rate, the dot products at
// every batch; where it runs them at half that rate, up to kBf16DotMaxBatch, and above it
// widened, with the large products as float32 GEMMs unless there is AMX (both rules:
// dispatch_rules.h). Without AVX512_BF16 everything is widened, the large products left to
// oneDNN as before, measured nowhere else.
const Bf16Rule& bf16_rule() {
  static const Bf16Rule r = [] {
    const char* env = std::getenv("BIRNN_EXT_BF16");
    const std::string choice = env ? env : "";
    TORCH_CHECK(choice.empty() || choice == "widen" || choice == "avx512bf16",
                "BIRNN_EXT_BF16 must be 'widen' or 'avx512bf16', got '", choice, "'");
    bool has_dot = false;
#ifdef BIRNN_HAVE_BF16_BUILD
    __builtin_cpu_init();
    has_dot = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl");
#endif
    constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
    if (choice == "widen" || !has_dot) return Bf16Rule{has_dot, -1, choice == "widen", "widen"};
    if (choice == "avx512bf16" || cpu_rules::bf16_dot_products_at_fma_rate())
      return Bf16Rule{true, kAll, false, "avx512bf16"};
    return Bf16Rule{true, cpu_rules::kBf16DotMaxBatch, !cpu_rules::has_amx_bf16(), "widen+avx512bf16"};
  }();
  return r;
}

bool dot(Bf16Panels panels) {
  TORCH_INTERNAL_ASSERT(panels == Bf16Panels::widened || bf16_rule().has_dot,
                        "small_gemm_bf16: dot-product panels on a processor without AVX512_BF16");
  return panels == Bf16Panels::dot;
}

}  // namespace

bool small_gemm_bf16_has_dot() { return bf16_rule().has_dot; }

Bf16Panels small_gemm_bf16_panels(int64_t batch) {
  return batch <= bf16_rule().dot_max_batch ? Bf16Panels::dot : Bf16Panels::widened;
}

const char* small_gemm_bf16_build() { return bf16_rule().name; }

bool bf16_large_products_in_float32() { return bf16_rule().large_in_float32; }

int64_t small_gemm_bf16_packed_bytes(Bf16Panels panels, int64_t K, int64_t N) {
  return dot(panels) ? dp_packed_size(K, N) : widened_packed_size(K, N);
}

void small_gemm_bf16_pack(Bf16Panels panels, int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col,
                          void* out) {
  dot(panels) ? dp_pack(K, N, b, b_row, b_col, out) : widened_pack(K, N, b, b_row, b_col, out);
}

void small_gemm_bf16_pack(Bf16Panels panels, int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col,
                          void* out) {
  dot(panels) ? dp_pack(K, N, b, b_row, b_col, out) : widened_pack(K, N, b, b_row, b_col, out);
}

// Every step calls this: the panels were checked against the processor when packed.
void small_gemm_bf16(Bf16Panels panels, int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row,
                     int64_t a_col, const void* packed, float beta, uint16_t* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  panels == Bf16Panels::dot ? dp_gemm(M, N, K, a, a_row, a_col, packed, beta, c, ldc)
                            : widened_gemm(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

}  // namespace birnn
