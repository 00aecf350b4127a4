// See small_gemm.h. The kernels are compiled three times, for AVX-512, AVX2+FMA and
// baseline x86-64, each with a panel width that keeps the 4 x width accumulators in that
// ISA's registers (and a vector width for the dot products); the widest set the CPU runs
// is picked once, at load time. The packing follows the width picked.
#include "small_gemm.h"

#include "bf16_bits.h"
#include "dispatch_rules.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

namespace birnn {
namespace {

// Stores one accumulated output: C = acc, or acc + beta C; a bfloat16 C (its bits) is
// read widened and written rounded to nearest even, once.
__attribute__((always_inline)) inline void put(float* c, float acc, float beta) {
  *c = beta == 0.f ? acc : acc + beta * *c;
}
__attribute__((always_inline)) inline void put(uint16_t* c, float acc, float beta) {
  *c = float_to_bf16(beta == 0.f ? acc : acc + beta * bf16_to_float(*c));
}

// V floats in one vector register (GCC vector extensions: the same code for every
// instruction set the file is compiled for).
template <int V>
struct Vec {
  typedef float type __attribute__((vector_size(V * sizeof(float))));
  typedef uint32_t bits __attribute__((vector_size(V * sizeof(uint32_t))));  // the same lanes as integers
};

// Rows 0 .. R-1 of A against W columns of B whose rows lie ldb apart (a packed panel,
// ldb = W, or B in place): C columns 0 .. cols-1 (a last packed panel is padded with
// zero columns). C is float32, or bfloat16 bits (TC = uint16_t).
template <int R, int W, typename TC = float>
__attribute__((always_inline)) inline void tile(int64_t K, const float* __restrict a, int64_t a_row, int64_t a_col,
                                                const float* __restrict b, int64_t ldb, float beta,
                                                TC* __restrict c, int64_t ldc, int64_t cols) {
  if constexpr (W == 4 || W == 8 || W == 16) {
    // A narrow panel (in place, the columns past the widest panels) as one vector per
    // row: GCC leaves the loops below scalar at these widths (11 GFLOP/s at N = 28).
    using vf = typename Vec<W>::type;
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vf{};
    for (int64_t k = 0; k < K; ++k) {
      vf bk;
      __builtin_memcpy(&bk, b + k * ldb, sizeof bk);
      for (int r = 0; r < R; ++r) acc[r] += a[r * a_row + k * a_col] * bk;
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<TC, float>) {
        if (cols == W) {
          if (beta != 0.f) {
            vf cr;
            __builtin_memcpy(&cr, c + r * ldc, sizeof cr);
            acc[r] += beta * cr;
          }
          __builtin_memcpy(c + r * ldc, &acc[r], sizeof acc[r]);
          continue;
        }
      }
      float lanes[W];
      __builtin_memcpy(lanes, &acc[r], sizeof lanes);
      for (int64_t j = 0; j < cols; ++j) put(c + r * ldc + j, lanes[j], beta);
    }
    return;
  }
  float acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) acc[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    for (int r = 0; r < R; ++r) {
      const float ark = a[r * a_row + k * a_col];
      for (int j = 0; j < W; ++j) acc[r][j] += ark * bk[j];
    }
  }
  if (cols == W && beta == 0.f) {  // the step products' case, as loops the compiler vectorizes
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < W; ++j) put(c + r * ldc + j, acc[r][j], 0.f);
  } else if (cols == W) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < W; ++j) put(c + r * ldc + j, acc[r][j], beta);
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < cols; ++j) put(c + r * ldc + j, acc[r][j], beta);
  }
}

// Panels outside, row blocks inside: a panel is read from memory once, then from cache
// for every block of four rows.
template <int W, typename TC>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                                     int64_t a_col, const float* packed, float beta, TC* c,
                                                     int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    const float* panel = packed + (n0 / W) * K * W;
    const int64_t cols = std::min<int64_t>(W, N - n0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      tile<4, W, TC>(K, a + m * a_row, a_row, a_col, panel, W, beta, c + m * ldc + n0, ldc, cols);
    switch (M - m) {
      case 3: tile<3, W, TC>(K, a + m * a_row, a_row, a_col, panel, W, beta, c + m * ldc + n0, ldc, cols); break;
      case 2: tile<2, W, TC>(K, a + m * a_row, a_row, a_col, panel, W, beta, c + m * ldc + n0, ldc, cols); break;
      case 1: tile<1, W, TC>(K, a + m * a_row, a_row, a_col, panel, W, beta, c + m * ldc + n0, ldc, cols); break;
      default: break;
    }
  }
}

// Columns n0 .. n0+W-1 of C, every row of A, in blocks of four.
template <int W>
__attribute__((always_inline)) inline void rows_panel(int64_t M, int64_t K, const float* a, int64_t a_row,
                                                      int64_t a_col, const float* b, int64_t b_row, float beta,
                                                      float* c, int64_t ldc) {
  int64_t m = 0;
  if constexpr (W <= 16)  // one vector per row: eight rows keep enough FMAs in flight
    for (; m + 8 <= M; m += 8) tile<8, W>(K, a + m * a_row, a_row, a_col, b, b_row, beta, c + m * ldc, ldc, W);
  for (; m + 4 <= M; m += 4) tile<4, W>(K, a + m * a_row, a_row, a_col, b, b_row, beta, c + m * ldc, ldc, W);
  for (; m < M; ++m) tile<1, W>(K, a + m * a_row, a_row, a_col, b, b_row, beta, c + m * ldc, ldc, W);
}

// In place, B's rows contiguous: panels of W columns, then of 8, of 4, then one at a time.
template <int W>
__attribute__((always_inline)) inline void rows_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                                     int64_t a_col, const float* b, int64_t b_row, float beta,
                                                     float* c, int64_t ldc) {
  int64_t n = 0;
  if (M < 4)  // one row: twice the width, the same number of accumulators
    for (; n + 2 * W <= N; n += 2 * W) rows_panel<2 * W>(M, K, a, a_row, a_col, b + n, b_row, beta, c + n, ldc);
  for (; n + W <= N; n += W) rows_panel<W>(M, K, a, a_row, a_col, b + n, b_row, beta, c + n, ldc);
  for (; n + 8 <= N; n += 8) rows_panel<8>(M, K, a, a_row, a_col, b + n, b_row, beta, c + n, ldc);
  for (; n + 4 <= N; n += 4) rows_panel<4>(M, K, a, a_row, a_col, b + n, b_row, beta, c + n, ldc);
  for (; n < N; ++n) rows_panel<1>(M, K, a, a_row, a_col, b + n, b_row, beta, c + n, ldc);
}

template <int V>
__attribute__((always_inline)) inline typename Vec<V>::type load_vec(const float* p) {
  typename Vec<V>::type v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
// The sum of v's lanes, halves added until one lane is left: a fixed order.
template <int V>
__attribute__((always_inline)) inline float lane_sum(typename Vec<V>::type v) {
  if constexpr (V == 1) {
    return v[0];
  } else {
    typename Vec<V / 2>::type lo, hi;
    __builtin_memcpy(&lo, &v, sizeof lo);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return lane_sum<V / 2>(lo + hi);
  }
}

// The lane sums of R = V/2 vectors at once, into one vector of R sums. Each step adds
// two vectors' first and second halves of every lane group, so it halves the lanes per
// row and the number of vectors; row r's lanes are added in lane_sum's order.
//   pick(u, w): the first (Half = 0) or second half of each of u's G lane groups, then of
//   w's: 2G groups, V / (2G) lanes each, the rows of u before those of w.
constexpr int pick_lane(int lane, int V, int G, int half) {
  const int g = V / G, h = g / 2, q = lane / h, o = lane % h + half * h;
  return q < G ? q * g + o : V + (q - G) * g + o;
}
template <int V, int G, int Half, std::size_t... L>
__attribute__((always_inline)) inline typename Vec<V>::type pick(typename Vec<V>::type u, typename Vec<V>::type w,
                                                                 std::index_sequence<L...>) {
  return __builtin_shufflevector(u, w, pick_lane(int(L), V, G, Half)...);
}
template <int V, int G, int N>
__attribute__((always_inline)) inline void fold(typename Vec<V>::type* v) {
  if constexpr (N > 1) {
    constexpr auto lanes = std::make_index_sequence<V>();
    for (int i = 0; i < N / 2; ++i)
      v[i] = pick<V, G, 0>(v[2 * i], v[2 * i + 1], lanes) + pick<V, G, 1>(v[2 * i], v[2 * i + 1], lanes);
    fold<V, 2 * G, N / 2>(v);
  }
}
template <int V, std::size_t... L>
__attribute__((always_inline)) inline typename Vec<V / 2>::type pair_sums(typename Vec<V>::type v,
                                                                          std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, (2 * L)...) + __builtin_shufflevector(v, v, (2 * L + 1)...);
}

// Lanes V - n .. V - 1 set: the last n of V, as an integer mask of whole lanes.
template <int V, std::size_t... L>
__attribute__((always_inline)) inline typename Vec<V>::bits last_lanes(int64_t n, std::index_sequence<L...>) {
  const typename Vec<V>::bits lane = {uint32_t(L)...};
  return lane >= uint32_t(V - n);  // -1 (all bits) where true
}

// In place, B's columns contiguous (B(k, n) = b[k + n * b_col], B the transpose of a
// row-major weight matrix): each output is a dot product of a row of A with a column of
// B. R columns at a time, each summed in V lanes over k (a row of A must be contiguous),
// the lanes added at the end: a load of A feeds R FMAs, no horizontal sum in the loop.
// A ragged end of K (K >= V) is one more vector, the last V values, with the products
// of the lanes already summed masked to +0 (a product, not an operand, so that an Inf
// or NaN there is not counted twice): the scalar loop it replaces made the products of
// short rows (K 28) slower than BLAS's.
template <int R, int V>
__attribute__((always_inline)) inline void dot_tile(int64_t K, const float* __restrict a, const float* __restrict b,
                                                    int64_t b_col, float beta, float* __restrict c) {
  static_assert(R == 1 || R == V / 2, "dot_tile sums one column, or V/2 at once");
  using vf = typename Vec<V>::type;
  using vb = typename Vec<V>::bits;
  vf acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vf{};
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    const vf ak = load_vec<V>(a + k);
    for (int r = 0; r < R; ++r) acc[r] += ak * load_vec<V>(b + r * b_col + k);
  }
  if (k < K && K >= V) {
    const vb keep = last_lanes<V>(K - k, std::make_index_sequence<V>());
    const vf ak = load_vec<V>(a + K - V);
    for (int r = 0; r < R; ++r)
      acc[r] += reinterpret_cast<vf>(reinterpret_cast<vb>(ak * load_vec<V>(b + r * b_col + K - V)) & keep);
    k = K;
  }
  float sum[R];
  if constexpr (R == 1) {
    sum[0] = lane_sum<V>(acc[0]);
  } else {
    fold<V, 1, R>(acc);
    const typename Vec<R>::type s = pair_sums<V>(acc[0], std::make_index_sequence<R>());
    __builtin_memcpy(sum, &s, sizeof sum);
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t t = k; t < K; ++t) sum[r] += a[t] * b[r * b_col + t];
    put(c + r, sum[r], beta);
  }
}

template <int V>
__attribute__((always_inline)) inline void dot_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                                    const float* b, int64_t b_col, float beta, float* c,
                                                    int64_t ldc) {
  constexpr int R = V / 2;
  int64_t n = 0;
  // Columns outside, rows of A inside: a block of B is read from memory once.
  for (; n + R <= N; n += R)
    for (int64_t m = 0; m < M; ++m) dot_tile<R, V>(K, a + m * a_row, b + n * b_col, b_col, beta, c + m * ldc + n);
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) dot_tile<1, V>(K, a + m * a_row, b + n * b_col, b_col, beta, c + m * ldc + n);
}

// A V x V block transposed in registers: log2(V) stages, stage b swapping bit b of the
// row index with bit b of the lane index (row i's lanes with that bit set trade places
// with row i+b's lanes without it).
constexpr int swap_lane(int lane, int V, int b, int upper) {
  return upper ? ((lane & b) ? V + lane : lane + b) : ((lane & b) ? V + lane - b : lane);
}
template <int V, int B, int Upper, std::size_t... L>
__attribute__((always_inline)) inline typename Vec<V>::type swap_half(typename Vec<V>::type u,
                                                                      typename Vec<V>::type w,
                                                                      std::index_sequence<L...>) {
  return __builtin_shufflevector(u, w, swap_lane(int(L), V, B, Upper)...);
}
template <int V, int B = 1>
__attribute__((always_inline)) inline void transpose_block(typename Vec<V>::type* r) {
  if constexpr (B < V) {
    constexpr auto lanes = std::make_index_sequence<V>();
    for (int i = 0; i < V; ++i) {
      if (i & B) continue;
      const typename Vec<V>::type lo = swap_half<V, B, 0>(r[i], r[i + B], lanes);
      const typename Vec<V>::type hi = swap_half<V, B, 1>(r[i], r[i + B], lanes);
      r[i] = lo, r[i + B] = hi;
    }
    transpose_block<V, 2 * B>(r);
  }
}

// B's values as the panels hold them: float32 as it is; bfloat16 (its bits) widened,
// exactly; with Round, a float32 rounded to bfloat16 first, as float_to_bf16 rounds (the
// panels of packing B.to(torch.bfloat16), without that copy).
template <typename S, bool Round>
__attribute__((always_inline)) inline float widened(S v) {
  if constexpr (std::is_same_v<S, uint16_t>) {
    return bf16_to_float(v);
  } else if constexpr (Round) {
    return bf16_to_float(float_to_bf16(v));
  } else {
    return v;
  }
}
template <int V, typename S, bool Round>
__attribute__((always_inline)) inline typename Vec<V>::type load_widened(const S* p) {
  using vf = typename Vec<V>::type;
  using vu = typename Vec<V>::bits;
  if constexpr (std::is_same_v<S, uint16_t>) {
    typedef uint16_t half __attribute__((vector_size(V * sizeof(uint16_t))));
    half h;
    __builtin_memcpy(&h, p, sizeof h);
    return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
  } else {
    const vf v = load_vec<V>(p);
    if constexpr (!Round) return v;
    const vu u = reinterpret_cast<const vu&>(v);
    const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    const vu nan = reinterpret_cast<vu>(v != v);  // every bit set in a NaN's lane
    return reinterpret_cast<vf>((rounded & ~nan) | (0x7FC00000u & nan));
  }
}

// Packs B [K,N] into panels of W columns (small_gemm's layout: panel p holds
// B(k, p*W + j) at k*W + j, zero past N). B's rows contiguous (b_col == 1): row by row.
// B the transpose of a row-major matrix (b_row == 1, a weight as nn.LSTM stores it):
// V x V blocks transposed in registers, the ragged edges one value at a time.
// With Check, also returns whether every value of B is finite, from the values' bits
// on the way (integer max and and, no chain of floating-point adds): about 0.8 us on
// the 512 x 128 W_hh of the batch-1 case (bench_step_gemm.py's pack column), against
// the 2.4-2.7 us of the step product it lets a sweep leave out (layer_forward.cpp).
// S and Round: B's element type and how it is widened (widened() above).
template <int W, int V, bool Check, typename S = float, bool Round = false>
__attribute__((always_inline)) inline bool pack_impl(int64_t K, int64_t N, const S* b, int64_t b_row,
                                                     int64_t b_col, float* out) {
  static_assert(!Check || std::is_same_v<S, float>, "the finite check reads float32 weights");
  using vf = typename Vec<V>::type;
  using vu = typename Vec<V>::bits;
  constexpr uint32_t kExp = 0x7f800000u, kAbs = 0x7fffffffu;  // an exponent of all ones: Inf or NaN
  vu top{};  // the largest magnitude's bits: Inf or NaN from kExp up
  uint32_t bad = 0;
  auto take = [&](S value) {
    const float v = widened<S, Round>(value);
    if constexpr (Check) {
      uint32_t u;
      __builtin_memcpy(&u, &v, sizeof u);
      bad |= (u & kExp) == kExp;
    }
    return v;
  };
  for (int64_t n0 = 0; n0 < N; n0 += W) {
    float* panel = out + (n0 / W) * K * W;
    const int64_t cols = std::min<int64_t>(W, N - n0);
    if (b_col == 1) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < cols; ++j) panel[k * W + j] = take(b[k * b_row + n0 + j]);
        for (int64_t j = cols; j < W; ++j) panel[k * W + j] = 0.f;
      }
      continue;
    }
    if (b_row != 1) {  // neither layout: any strides, one value at a time
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < W; ++j) panel[k * W + j] = j < cols ? take(b[k * b_row + (n0 + j) * b_col]) : 0.f;
      continue;
    }
    const int64_t k_blocks = K / V * V, j_blocks = cols / V * V;
    for (int64_t j0 = 0; j0 < j_blocks; j0 += V) {
      const S* src = b + (n0 + j0) * b_col;  // V rows of the matrix: V columns of B
      for (int64_t k0 = 0; k0 < k_blocks; k0 += V) {
        vf r[V];
        for (int i = 0; i < V; ++i) {
          r[i] = load_widened<V, S, Round>(src + i * b_col + k0);
          if constexpr (Check) {
            const vu a = reinterpret_cast<const vu&>(r[i]) & kAbs;
            top = top > a ? top : a;
          }
        }
        transpose_block<V>(r);
        for (int i = 0; i < V; ++i) __builtin_memcpy(panel + (k0 + i) * W + j0, &r[i], sizeof(vf));
      }
      for (int64_t k = k_blocks; k < K; ++k)
        for (int64_t j = j0; j < j0 + V; ++j) panel[k * W + j] = take(b[k + (n0 + j) * b_col]);
    }
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = j_blocks; j < W; ++j) panel[k * W + j] = j < cols ? take(b[k + (n0 + j) * b_col]) : 0.f;
  }
  for (int i = 0; i < V; ++i) bad |= top[i] >= kExp;
  return !bad;
}

using PackFn = void (*)(int64_t, int64_t, const float*, int64_t, int64_t, float*);
using PackCheckedFn = bool (*)(int64_t, int64_t, const float*, int64_t, int64_t, float*);
using PackBf16Fn = void (*)(int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*);
using GemmFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float, float*,
                        int64_t);
using GemmBf16Fn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float,
                            uint16_t*, int64_t);
using RowsFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float,
                        float*, int64_t);
using DotFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, float*,
                       int64_t);

// One set of kernels per instruction set: the packed GEMM at panel width W, the in-place
// kernels at the same width and at V lanes.
#define BIRNN_SMALL_GEMM_KERNELS(suffix, W, V)                                                                       \
  void gemm_##suffix(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,                \
                     const float* packed, float beta, float* c, int64_t ldc) {                                     \
    gemm_impl<W>(M, N, K, a, a_row, a_col, packed, beta, c, ldc);                                                  \
  }                                                                                                                \
  void gemm_bf16_##suffix(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,           \
                          const float* packed, float beta, uint16_t* c, int64_t ldc) {                             \
    gemm_impl<W>(M, N, K, a, a_row, a_col, packed, beta, c, ldc);                                                  \
  }                                                                                                                \
  void rows_##suffix(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* b, \
                     int64_t b_row, float beta, float* c, int64_t ldc) {                                           \
    rows_impl<W>(M, N, K, a, a_row, a_col, b, b_row, beta, c, ldc);                                                \
  }                                                                                                                \
  void dot_##suffix(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, const float* b, int64_t b_col, \
                    float beta, float* c, int64_t ldc) {                                                           \
    dot_impl<V>(M, N, K, a, a_row, b, b_col, beta, c, ldc);                                                        \
  }                                                                                                                \
  void pack_##suffix(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {             \
    pack_impl<W, V, false>(K, N, b, b_row, b_col, out);                                                            \
  }                                                                                                                \
  bool pack_checked_##suffix(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {     \
    return pack_impl<W, V, true>(K, N, b, b_row, b_col, out);                                                      \
  }                                                                                                                \
  void pack_bf16_##suffix(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, float* out) {     \
    pack_impl<W, V, false, uint16_t>(K, N, b, b_row, b_col, out);                                                  \
  }                                                                                                                \
  void pack_rounded_##suffix(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {     \
    pack_impl<W, V, false, float, true>(K, N, b, b_row, b_col, out);                                               \
  }

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
BIRNN_SMALL_GEMM_KERNELS(avx512, 64, 16)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
BIRNN_SMALL_GEMM_KERNELS(avx2, 24, 8)
#pragma GCC pop_options
#endif
BIRNN_SMALL_GEMM_KERNELS(baseline, 12, 4)

struct Kernel {
  GemmFn fn;
  GemmBf16Fn fn_bf16;
  RowsFn rows;
  DotFn dot;
  PackFn pack;
  PackCheckedFn pack_checked;
  PackBf16Fn pack_bf16;
  PackFn pack_rounded;
  int64_t width;
  const char* name;
};

// One build's set, under its name and panel width.
#define BIRNN_SMALL_GEMM_SET(suffix, W)                                                                       \
  Kernel {                                                                                                    \
    gemm_##suffix, gemm_bf16_##suffix, rows_##suffix, dot_##suffix, pack_##suffix, pack_checked_##suffix,     \
        pack_bf16_##suffix, pack_rounded_##suffix, W, #suffix                                                 \
  }

// BIRNN_EXT_SMALL_GEMM=avx2 or baseline picks a narrower build than the CPU could run
// (the tests check all three on one machine); a build the CPU cannot run is not taken.
const Kernel& kernel() {
  static const Kernel k = [] {
    const char* env = std::getenv("BIRNN_EXT_SMALL_GEMM");
    const std::string cap = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4") && cap.empty()) return BIRNN_SMALL_GEMM_SET(avx512, 64);
    if (__builtin_cpu_supports("x86-64-v3") && cap != "baseline") return BIRNN_SMALL_GEMM_SET(avx2, 24);
#endif
    return BIRNN_SMALL_GEMM_SET(baseline, 12);
  }();
  return k;
}

}  // namespace

const char* small_gemm_build() { return kernel().name; }

int64_t small_gemm_packed_size(int64_t K, int64_t N) {
  const int64_t W = kernel().width;
  return (N + W - 1) / W * W * K;
}

void small_gemm_pack(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {
  kernel().pack(K, N, b, b_row, b_col, out);
}

void small_gemm_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, float* out) {
  kernel().pack_bf16(K, N, b, b_row, b_col, out);
}

void small_gemm_pack_rounded_to_bf16(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col,
                                     float* out) {
  kernel().pack_rounded(K, N, b, b_row, b_col, out);
}

bool small_gemm_pack_checked(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out) {
  return kernel().pack_checked(K, N, b, b_row, b_col, out);
}

void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                float beta, float* c, int64_t ldc) {
  kernel().fn(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                float beta, uint16_t* c, int64_t ldc) {
  kernel().fn_bf16(M, N, K, a, a_row, a_col, packed, beta, c, ldc);
}

bool small_gemm_in_place_fits(int64_t M, int64_t K, int64_t a_col, int64_t b_row, int64_t b_col) {
  // B's rows contiguous: always. Its transpose (dot products): dispatch_rules.h.
  return b_col == 1 || (b_row == 1 && a_col == 1 &&
                        (K >= cpu_rules::kDotMinK ||
                         (K >= cpu_rules::kShortDotMinK && M <= cpu_rules::kShortDotMaxRows)));
}

void small_gemm_in_place(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t b_row, int64_t b_col, float beta, float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(small_gemm_in_place_fits(M, K, a_col, b_row, b_col), "small_gemm_in_place: unsupported layout");
  if (M == 0 || N == 0) return;
  if (b_col == 1) {
    kernel().rows(M, N, K, a, a_row, a_col, b, b_row, beta, c, ldc);
  } else {
    kernel().dot(M, N, K, a, a_row, b, b_col, beta, c, ldc);
  }
}

}  // namespace birnn
