// Products and sums whose order of additions is fixed by the shapes alone, so that
// results are the same bits for any thread count: the weight gradients (per row block,
// then the blocks' partial sums added in block order), a cell step's products, and
// column sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "buffer_pool.h"
#include "dispatch_rules.h"
#include "kernel_util.h"
#include "small_gemm.h"

namespace birnn {

// acc[k] += row[k]; a loop of its own so that it vectorizes.
template <typename T>
void add_row(int64_t n, const T* __restrict__ row, math_t<T>* __restrict__ acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += load(row[k]);
}

// out[e] = parts[0][e] + parts[1][e] + ... (count parts of n values each, n apart;
// zeros when there are none), summed in part order: the same bits however the range
// is split between threads. A span of outputs at a time, in a buffer that stays in L1,
// one part after the other: loops that vectorize (one output at a time over the parts
// did not, and took 5.0 ms of a 133 ms forward+backward at bench_lstm.py's large size,
// against 1.7 now).
template <typename T>
void sum_parts(const T* parts, int64_t count, int64_t n, T* out) {
  if (count == 0) {
    std::fill(out, out + n, T(0));
    return;
  }
  constexpr int64_t kSpan = 1024;
  at::parallel_for(0, n, 4 * kSpan, [&](int64_t e0, int64_t e1) {
    math_t<T> acc[kSpan];
    for (int64_t s0 = e0; s0 < e1; s0 += kSpan) {
      const int64_t len = std::min(kSpan, e1 - s0);
      for (int64_t e = 0; e < len; ++e) acc[e] = load(parts[s0 + e]);
      for (int64_t i = 1; i < count; ++i) add_row(len, parts + i * n + s0, acc);
      for (int64_t e = 0; e < len; ++e) out[s0 + e] = store<T>(acc[e]);
    }
  });
}

// One block's share of a weight gradient: c[M,N] = a[K,M]^T b[K,N], a and b rows of dg
// and of the layer's input or h (contiguous rows). A short block (a small batch over few
// steps) of a wide weight goes to small_gemm_in_place, which reads both where they lie;
// the others to matmul (dispatch_rules.h: kMaxRowsInPlace, kMinColsInPlace).
//
// By pointer (blas.h's Mat): a layer's backward calls it per row block on its workers,
// where tensor views would each cost a dispatcher round trip. a [K,M] and b [K,N] with
// contiguous rows; c [M,N] dense.
template <typename T>
void weight_grad(Mat<const T> a, Mat<const T> b, Mat<T> c) {
  const int64_t K = a.rows, M = a.cols, N = b.cols;
  if constexpr (std::is_same_v<T, float>) {
    if (K <= cpu_rules::kMaxRowsInPlace && N >= cpu_rules::kMinColsInPlace) {
      small_gemm_in_place(M, N, K, a.data, 1, a.rs, b.data, b.rs, 1, 0.f, c.data, N);
      return;
    }
  }
  matmul<T>(Mat<const T>(a.data, M, K, a.cs, a.rs), b, c, T(0));  // a^T: its columns as rows
}

// small_gemm_in_place's C[M,N] = A B with the rows of A (and C) split between threads:
// each output is one pass in k order, the same bits for any thread count. In quads of
// rows: the kernel takes rows four at a time, then one at a time, and those two paths
// may round differently, so a split must not move a row between them. A split takes at
// least 64K multiply-adds, so a tiny product stays on the calling thread.
inline void in_place_rows_split(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t b_row, int64_t b_col, float* c) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, N * K));
  at::parallel_for(0, (M + 3) / 4, grain, [&](int64_t q0, int64_t q1) {
    const int64_t m0 = 4 * q0, m1 = std::min(M, 4 * q1);
    small_gemm_in_place(m1 - m0, N, K, a + m0 * a_row, a_row, a_col, b, b_row, b_col, 0.f, c + m0 * N, N);
  });
}

// c[M,N] = a[K,M]^T b[K,N] (a, b contiguous), summed over the K rows in blocks fixed by K
// alone: each block is one product computed on one thread, and the blocks' partial
// sums are added in block order. A multi-threaded GEMM may split a long K differently
// for different thread counts; this gives the same bits for any thread count. There are
// always at least two blocks, so that the products run inside a parallel region, where
// the GEMM engines stay single-threaded, and an even number, so two threads share them.
//
// A float32 product over a few rows (a cell's batch) goes to in_place_rows_split
// instead: no partial sums (at batch 1, a [2, 4H, H] buffer zeroed and summed per call).
template <typename T>
void matmul_tn_fixed_order(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  constexpr int64_t kMaxRows = 1024;
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (K <= cpu_rules::kMaxRowsInPlace && small_gemm_in_place_fits(M, K, M, N, 1)) {  // A(r, k) = a[k*M + r]
      in_place_rows_split(M, N, K, a.data_ptr<float>(), 1, M, b.data_ptr<float>(), N, 1, c.data_ptr<float>());
      return;
    }
  }
  int64_t blocks = std::max<int64_t>(2, (K + kMaxRows - 1) / kMaxRows);
  blocks += blocks % 2;
  const int64_t rows = (K + blocks - 1) / blocks;
  at::Tensor partial = pooled_zeros({blocks, M, N}, c.options());
  std::vector<std::array<at::Tensor, 3>> operands;  // views made here, not on the workers
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t k0 = i * rows, k = std::min(rows, K - k0);
    if (k > 0) operands.push_back({a.narrow(0, k0, k).t(), b.narrow(0, k0, k), partial[i]});
  }
  at::parallel_for(0, int64_t(operands.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) matmul<T>(operands[i][0], operands[i][1], operands[i][2], T(0));
  });
  sum_parts(partial.data_ptr<T>(), blocks, M * N, c.data_ptr<T>());
}

// c[M,N] = a[M,K] b[K,N] (a contiguous), a's rows in blocks fixed by M alone, each
// block's product on one thread inside a parallel region, where the GEMM engines stay
// single-threaded: the same bits for any thread count (a BLAS call of its own threads
// may compute the same product differently for different thread counts). At least two
// tasks, so that even one block runs inside the region.
template <typename T>
void matmul_rows_fixed_order(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  constexpr int64_t kRows = 64;
  const int64_t M = a.size(0);
  const int64_t blocks = std::max<int64_t>(1, (M + kRows - 1) / kRows), rows = (M + blocks - 1) / blocks;
  std::vector<std::array<at::Tensor, 3>> operands;  // views made here, not on the workers
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t m0 = i * rows, k = std::min(rows, M - m0);
    if (k > 0) operands.push_back({a.narrow(0, m0, k), b, c.narrow(0, m0, k)});
  }
  const int64_t n = int64_t(operands.size());
  at::parallel_for(0, std::max<int64_t>(2, n), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, n); ++i) matmul<T>(operands[i][0], operands[i][1], operands[i][2], T(0));
  });
}

// c[M,N] = a[M,K] b[K,N] for a cell step, the same bits for any thread count: float32
// products that small_gemm_in_place takes through in_place_rows_split, the rest through
// matmul_rows_fixed_order.
template <typename T>
void cell_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (a.is_contiguous() && c.is_contiguous() && small_gemm_in_place_fits(M, K, 1, b.stride(0), b.stride(1))) {
      in_place_rows_split(M, N, K, a.data_ptr<float>(), K, 1, b.data_ptr<float>(), b.stride(0), b.stride(1),
                          c.data_ptr<float>());
      return;
    }
  }
  matmul_rows_fixed_order<T>(a, b, c);
}

// Column sums of a [rows, cols] matrix in row order: the same bits for any thread count.
template <typename T>
void column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    std::vector<math_t<T>> acc(c1 - c0, 0);
    for (int64_t r = 0; r < rows; ++r) add_row(c1 - c0, m + r * cols + c0, acc.data());
    for (int64_t c = c0; c < c1; ++c) out[c] = T(acc[c - c0]);
  });
}

}  // namespace birnn
