// GEMM for the CPU kernels, without a dispatcher round trip per call (at small batch
// that costs more than the step itself). Two engines, both inside libtorch_cpu:
//  - BLAS through the standard Fortran entry points (MKL on x86-64 wheels, OpenBLAS
//    elsewhere): about 3 us per call, the cheapest for tiny products.
//  - oneDNN matmul (at::native::mkldnn_matmul, exported but shipped without a header):
//    about 10 us per call, but JIT-generated for the CPU at hand. MKL runs generic
//    kernels on AMD processors; oneDNN's are over twice as fast there.
// matmul() picks per call; float64 always goes to BLAS (oneDNN has no f64 matmul).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "buffer_pool.h"
#include "small_gemm.h"

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace birnn {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta,
                      double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M,N] = alpha * op(A) op(B) + beta * C; op transposes when asked.
// A row-major matrix is its column-major transpose, so this is the column-major call
// with the operands swapped.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "birnn_ext: a GEMM dimension exceeds the 32-bit BLAS interface (M=", M, ", N=", N, ", K=", K, ")");
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  blas_gemm(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

using OnednnMatmul = void (*)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, float beta, float alpha);

// at::native::mkldnn_matmul(a, b, c, beta, alpha): c = beta c + alpha a b. Looked up at
// load time, so a libtorch without it (or BIRNN_EXT_ONEDNN=0) falls back to BLAS.
inline OnednnMatmul onednn_matmul() {
  static const OnednnMatmul fn = [] {
    const char* env = std::getenv("BIRNN_EXT_ONEDNN");
    if (env && env[0] == '0') return OnednnMatmul(nullptr);
    return reinterpret_cast<OnednnMatmul>(dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  }();
  return fn;
}

// Row-major layout of a 2-D operand: transposed or not, and its leading dimension.
inline void layout(const at::Tensor& t, bool& trans, int64_t& ld) {
  if (t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) >= t.size(1))) {
    trans = false;
    ld = std::max<int64_t>(t.stride(0), t.size(1));
  } else {
    TORCH_INTERNAL_ASSERT(t.stride(0) == 1, "birnn_ext: GEMM operand has no unit stride");
    trans = true;
    ld = std::max<int64_t>(t.stride(1), t.size(0));
  }
}

// M*N*K where oneDNN's per-call cost and BLAS's slower kernels break even.
constexpr int64_t kOnednnMinWork = 1 << 21;

// c[M,N] = a[M,K] b[K,N] + beta c, on 2-D views with a unit stride in one dimension;
// c's rows are contiguous (c may be a block of columns of a wider matrix). Products
// large enough to amortise oneDNN's per-call cost go there.
// bfloat16 always goes to oneDNN (bfloat16 storage, float32 accumulation; AVX-512 BF16
// where the CPU has it), or, without oneDNN, through float32 copies.
template <typename T>
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::opmath_type<T> beta) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (OnednnMatmul fn = onednn_matmul(); fn && K > 0) {
      fn(a, b, c, beta, 1.0f);
      return;
    }
    at::NoGradGuard no_grad;  // may run on an OpenMP worker, which carries no autograd state
    at::Tensor r = at::mm(a.to(at::kFloat), b.to(at::kFloat));
    if (beta != 0) r.add_(c.to(at::kFloat), beta);
    c.copy_(r);
    return;
  } else {
  if constexpr (std::is_same_v<T, float>) {
    if (K > 0 && M * N * K >= kOnednnMinWork && c.is_contiguous()) {
      if (OnednnMatmul fn = onednn_matmul()) {
        fn(a, b, c, beta, 1.0f);
        return;
      }
    }
  }
  bool ta, tb;
  int64_t lda, ldb;
  layout(a, ta, lda);
  layout(b, tb, ldb);
  TORCH_INTERNAL_ASSERT(c.stride(1) == 1 || N == 1, "birnn_ext: GEMM output rows must be contiguous");
  gemm<T>(ta, tb, M, N, K, T(1), a.data_ptr<T>(), lda, b.data_ptr<T>(), ldb, beta, c.data_ptr<T>(),
          std::max<int64_t>(c.stride(0), N));
  }
}

// A weight matrix B [K,N] made ready for a sweep's step products c = a B: packed for
// small_gemm (float32) when the sweep multiplies enough rows by it to repay the packing,
// kept as a view for matmul otherwise; always packed for small_gemm_bf16 (bfloat16),
// whose alternative, oneDNN, costs more per call than a step product at these sizes
// (benchmarks/bench_step_gemm.py --dtype bf16). Made once per call, used every step.
struct StepWeight {
  // Rows (steps x batch) from which packing repays its copy. B the transpose of a
  // weight as nn.LSTM stores it (h W_hh^T, x W_ih^T): in place, every output is a dot
  // product with its lanes summed at the end, 2.0 us at batch 1 (128 x 512) against
  // the packed kernel's 1.4, 4.7 against 2.1 at batch 4; the transposing copy (V x V
  // blocks in registers) costs about as much as 16 rows save. B's rows contiguous
  // (dg W_hh): in place, W's rows scale into accumulators as the packed kernel's do,
  // within a few percent of it; a copy pays only over long sweeps.
  static constexpr int64_t kMinRowsToPackTransposed = 16;
  static constexpr int64_t kMinRowsToPack = 256;
  at::Tensor view;    // [K,N], for matmul
  at::Tensor packed;  // small_gemm's panels, or undefined
  int64_t K = 0, N = 0;
  bool bf16 = false;  // products in bfloat16: packed for small_gemm_bf16

  // Made on the calling thread; the packing itself (pack()) runs on the thread of the
  // direction that uses it, so the directions pack at the same time. `products`: the
  // dtype of the products, b's own, or bfloat16 for a float32 b (rounded as packed).
  static StepWeight of(const at::Tensor& b, int64_t rows) { return of(b, rows, b.scalar_type()); }
  static StepWeight of(const at::Tensor& b, int64_t rows, at::ScalarType products) {
    TORCH_INTERNAL_ASSERT(products == b.scalar_type() || (products == at::kBFloat16 && b.scalar_type() == at::kFloat));
    StepWeight w;
    w.view = b;
    w.K = b.size(0), w.N = b.size(1);
    w.bf16 = products == at::kBFloat16;
    const bool transposed = b.stride(0) == 1 && b.stride(1) != 1;
    if (w.bf16)
      w.packed = pooled_empty({small_gemm_bf16_packed_bytes(w.K, w.N)}, b.options().dtype(at::kByte));
    else if (b.scalar_type() == at::kFloat && rows >= (transposed ? kMinRowsToPackTransposed : kMinRowsToPack))
      w.packed = pooled_empty({small_gemm_packed_size(w.K, w.N)}, b.options());
    return w;
  }
  void pack() const {
    if (!packed.defined()) return;
    if (bf16 && view.scalar_type() == at::kFloat) {
      small_gemm_bf16_pack(K, N, view.data_ptr<float>(), view.stride(0), view.stride(1), packed.data_ptr());
      return;
    }
    if (bf16) {
      small_gemm_bf16_pack(K, N, bits(view), view.stride(0), view.stride(1), packed.data_ptr());
      return;
    }
    small_gemm_pack(K, N, view.data_ptr<float>(), view.stride(0), view.stride(1), packed.data_ptr<float>());
  }
  static const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
};

// c[M,N] = a[M,K] B + beta c: one step's product (c's rows contiguous).
// Unpacked float32 products below matmul's oneDNN threshold (a few rows: batch 1, or
// a short sweep) go to small_gemm_in_place, which reads the weights where they lie and
// beats the BLAS call on the step shapes benchmarks/bench_step_gemm.py times (batch 1
// to 16). It is not matmul's engine in general: with many rows and a few columns (a
// weight gradient, 512 x 28 x 28) its narrow tiles are slower than BLAS.
template <typename T>
void step_product(const at::Tensor& a, const StepWeight& w, const at::Tensor& c, at::opmath_type<T> beta) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (w.packed.defined()) {
      TORCH_INTERNAL_ASSERT(c.stride(1) == 1 || w.N == 1, "birnn_ext: step product rows must be contiguous");
      small_gemm_bf16(a.size(0), w.N, w.K, StepWeight::bits(a), a.stride(0), a.stride(1), w.packed.data_ptr(), beta,
                      reinterpret_cast<uint16_t*>(c.data_ptr()), std::max<int64_t>(c.stride(0), w.N));
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    const int64_t M = a.size(0), ldc = std::max<int64_t>(c.stride(0), w.N);
    TORCH_INTERNAL_ASSERT(c.stride(1) == 1 || w.N == 1, "birnn_ext: step product rows must be contiguous");
    if (w.packed.defined()) {
      small_gemm(M, w.N, w.K, a.data_ptr<float>(), a.stride(0), a.stride(1), w.packed.data_ptr<float>(), beta,
                 c.data_ptr<float>(), ldc);
      return;
    }
    const int64_t b_row = w.view.stride(0), b_col = w.view.stride(1);
    if (M * w.N * w.K < kOnednnMinWork && small_gemm_in_place_fits(w.K, a.stride(1), b_row, b_col)) {
      small_gemm_in_place(M, w.N, w.K, a.data_ptr<float>(), a.stride(0), a.stride(1), w.view.data_ptr<float>(), b_row,
                          b_col, beta, c.data_ptr<float>(), ldc);
      return;
    }
  }
  matmul<T>(a, w.view, c, beta);
}

}  // namespace birnn
