// Products and sums whose order of additions is fixed by the shapes alone, so that
// results are the same bits for any thread count: the weight gradients (per row block,
// then the blocks' partial sums added in block order), a cell step's products, and
// column sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// small_gemm_in_place's C[M,N] = A B split between threads, in pieces fixed by the shape
// alone: each output is one pass in k order, the same bits for any thread count.
//  - Up to cpu_rules::kCellInPlaceMaxRows rows (a cell step's products), in spans of 128
//    columns of B (and C), all rows in each: both cores share the batch, each reading its
//    part of B, in spans short enough to stay in cache. benchmarks/bench_cell.py (16
//    steps, Intel Xeon), inference / forward+backward ms: B 1, I 128, H 256 0.80-0.83 /
//    4.21-4.26 without spans, 0.53-0.54 / 3.46 with them; B 8, I 128, H 256 1.45-1.47 /
//    5.15-5.21 in quads of rows (below), 1.22 / 4.68-4.91 in spans; B 16 2.25-2.29 /
//    6.57-6.78 against 1.89-1.92 / 6.21-6.35.
//  - More rows (a weight gradient's 4H), in quads of rows, a thread's quads in one call:
//    the kernel reuses each part of B it loads over all of the call's rows. Quads, as the
//    kernel takes rows four at a time, then one at a time, and those two paths may round
//    differently: a split must not move a row between them.
// A split takes at least 64K multiply-adds, so a tiny product stays on the calling thread.
inline void in_place_rows_split(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                                const float* b, int64_t b_row, int64_t b_col, float* c) {
  if (M <= cpu_rules::kCellInPlaceMaxRows) {
    constexpr int64_t kSpan = 128;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, M * kSpan * K));
    at::parallel_for(0, (N + kSpan - 1) / kSpan, grain, [&](int64_t s0, int64_t s1) {
      const int64_t n0 = kSpan * s0, n1 = std::min(N, kSpan * s1);
      for (int64_t n = n0; n < n1; n += kSpan)
        small_gemm_in_place(M, std::min(kSpan, n1 - n), K, a, a_row, a_col, b + n * b_col, b_row, b_col, 0.f, c + n,
                            N);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, N * K));
  at::parallel_for(0, (M + 3) / 4, grain, [&](int64_t q0, int64_t q1) {
    const int64_t m0 = 4 * q0, m1 = std::min(M, 4 * q1);
    small_gemm_in_place(m1 - m0, N, K, a + m0 * a_row, a_row, a_col, b, b_row, b_col, 0.f, c + m0 * N, N);
  });
}

// The products of a cell step with its weights (FusedLSTMCell: x W_ih^T and h W_hh^T
// forward; dg W_ih, dg W_hh, dW_ih = dg^T x and dW_hh = dg^T h backward), the same bits
// for any thread count. Float32 over a few rows runs in place at once
// (in_place_rows_split; at batch 1 a GEMM engine's call costs more than the product).
// The others are cut into tiles fixed by the shapes alone, each tile one product over
// the whole K on one thread (BlasOnThisThread: a threaded product sums in another
// order), so there are no partial sums to write and add back; run() runs the tiles of
// all of a step's products in one parallel region, each thread taking the next tile,
// the largest first, as it finishes one (cpu_rules: kCellTileMaxCols,
// kCellGradTileMaxRows).
template <typename T>
class CellProducts {
 public:
  // c[M,N] = a[M,K] b[K,N] for a weight b: float32 over up to kCellInPlaceMaxRows rows in
  // place, else in tiles of c's columns, each reading its columns of b; bfloat16 on oneDNN
  // with b's rows contiguous in tiles of c's rows (kCellBf16TileMaxRows). a and b each
  // with a unit stride in one dimension, c contiguous.
  void product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    if constexpr (std::is_same_v<T, float>) {
      if (M <= cpu_rules::kCellInPlaceMaxRows && a.is_contiguous() && c.is_contiguous() &&
          small_gemm_in_place_fits(M, K, 1, b.stride(0), b.stride(1))) {
        in_place_rows_split(M, N, K, a.data_ptr<float>(), K, 1, b.data_ptr<float>(), b.stride(0), b.stride(1),
                            c.data_ptr<float>());
        return;
      }
    }
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      // A weight with contiguous rows (W in dg W) in tiles of a's and c's rows, each reading
      // all of b: oneDNN would copy a tile of its columns. A transposed one (W^T in x W^T)
      // stays in column tiles, which oneDNN reads where they lie.
      if (bf16_matmul_on_onednn() && b.stride(0) != 1) {
        const int64_t rows = tile_size(M, cpu_rules::kCellBf16TileMaxRows);
        for (int64_t m0 = 0; m0 < M; m0 += rows) {
          const int64_t k = std::min(rows, M - m0);
          tiles_.push_back({a.narrow(0, m0, k), b, c.narrow(0, m0, k), k * N * K});
        }
        return;
      }
    }
    const int64_t cols = tile_size(N, cpu_rules::kCellTileMaxCols);
    for (int64_t n0 = 0; n0 < N; n0 += cols) {
      const int64_t k = std::min(cols, N - n0);
      tiles_.push_back({a, b.narrow(1, n0, k), c.narrow(1, n0, k), M * k * K});
    }
  }

  // A weight gradient summed over the batch's K rows, c[M,N] = a[K,M]^T b[K,N] (a, b, c
  // contiguous): float32 over up to kMaxRowsInPlace rows in place, else in tiles of c's
  // rows, each a contiguous block of the gradient, reading all of b (and, for bfloat16 on
  // oneDNN, its rows of a^T copied out once for both weight gradients).
  void weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
    if constexpr (std::is_same_v<T, float>) {
      if (K <= cpu_rules::kMaxRowsInPlace && small_gemm_in_place_fits(M, K, M, N, 1)) {  // A(r, k) = a[k*M + r]
        in_place_rows_split(M, N, K, a.data_ptr<float>(), 1, M, b.data_ptr<float>(), N, 1, c.data_ptr<float>());
        return;
      }
    }
    at::Tensor a_t = a.t();
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (bf16_matmul_on_onednn()) a_t = transposed(a);  // kCellBf16TileMaxRows says why
    }
    const int64_t rows = tile_size(M, cpu_rules::kCellGradTileMaxRows);
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t k = std::min(rows, M - m0);
      tiles_.push_back({a_t.narrow(0, m0, k), b, c.narrow(0, m0, k), k * N * K});
    }
  }

  // Runs the tiles of the products above that did not run at once.
  void run() {
    std::stable_sort(tiles_.begin(), tiles_.end(), [](const Tile& x, const Tile& y) { return x.macs > y.macs; });
    const int64_t n = int64_t(tiles_.size());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      const BlasOnThisThread blas;
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        const Tile& t = tiles_[i];
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          matmul<T>(t.a, t.b, t.c, T(0));  // oneDNN's bfloat16 products, or float32 ones over widened copies
        } else {
          blas_matmul<T>(Mat<const T>::of(t.a), Mat<const T>::of(t.b), Mat<T>::of(t.c), T(0));
        }
      }
    });
    tiles_.clear();
  }

 private:
  struct Tile {
    at::Tensor a, b, c;  // c = a b; views made on the calling thread, not on the workers
    int64_t macs;
  };
  // Tiles of at most `most` of n, in multiples of 16, at least two, so that two threads
  // share a product.
  static int64_t tile_size(int64_t n, int64_t most) {
    const int64_t tiles = std::max<int64_t>(2, (n + most - 1) / most);
    return std::max<int64_t>(1, ((n + tiles - 1) / tiles + 15) / 16 * 16);
  }
  // a^T in contiguous rows, made once for the products that share a.
  const at::Tensor& transposed(const at::Tensor& a) {
    if (!transposed_of_.is_same(a)) transposed_ = a.t().contiguous(), transposed_of_ = a;
    return transposed_;
  }
  std::vector<Tile> tiles_;
  at::Tensor transposed_, transposed_of_;
};

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
