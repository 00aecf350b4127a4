// Direct BLAS GEMM for the CPU kernels. ATen's own cpublas::gemm is not exported by
// libtorch, and at::mm costs a dispatcher round trip per call, which at small batch
// is more than the step itself. The standard Fortran entry points are exported by the
// BLAS that libtorch_cpu links (MKL on x86-64 wheels, OpenBLAS elsewhere).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

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

}  // namespace birnn
