// GEMM for the CPU kernels, without a dispatcher round trip per call (at small batch
// that costs more than the step itself). Two engines, both inside libtorch_cpu:
//  - BLAS through the standard Fortran entry points (MKL on x86-64 wheels, OpenBLAS
//    elsewhere): about 3 us per call, the cheapest for tiny products.
//  - oneDNN matmul (at::native::mkldnn_matmul, exported but shipped without a header):
//    about 10 us per call, but JIT-generated for the CPU at hand: on AMD processors,
//    where MKL runs AVX2 kernels, faster than MKL's at large products
//    (dispatch_rules.h, kOnednnMinWork).
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
#include "dispatch_rules.h"
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

// A 2-D operand by pointer: element (r, c) at data[r * rs + c * cs]. The step products
// take these rather than tensors: every tensor view (a select, a narrow, a transpose)
// is a dispatcher round trip, about half a microsecond here, and a layer call at batch 1
// made some twenty of them (the op at batch 1, T 1, H 16 spent 8 of its 15 us there).
template <typename T>
struct Mat {
  T* data = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 1;

  Mat() = default;
  Mat(T* data, int64_t rows, int64_t cols, int64_t rs, int64_t cs = 1)
      : data(data), rows(rows), cols(cols), rs(rs), cs(cs) {}
  template <typename U, typename = std::enable_if_t<std::is_same_v<const U, T>>>
  Mat(const Mat<U>& m) : data(m.data), rows(m.rows), cols(m.cols), rs(m.rs), cs(m.cs) {}
  // Contiguous rows x cols at `data`.
  static Mat dense(T* data, int64_t rows, int64_t cols) { return {data, rows, cols, cols, 1}; }
  // A 2-D tensor of element type T, in its own layout.
  static Mat of(const at::Tensor& t) {
    return {static_cast<T*>(t.data_ptr()), t.size(0), t.size(1), t.stride(0), t.stride(1)};
  }
  // A tensor over the same memory, for the engines that take tensors (oneDNN).
  at::Tensor tensor(at::ScalarType dtype) const {
    return at::from_blob(const_cast<std::remove_const_t<T>*>(data), {rows, cols}, {rs, cs},
                         at::TensorOptions().dtype(dtype));
  }
};

// c[M,N] = a[M,K] b[K,N] + beta c through BLAS (float, double), each operand with a unit
// stride in one dimension, c's rows contiguous.
template <typename T>
void blas_matmul(Mat<const T> a, Mat<const T> b, Mat<T> c, T beta) {
  // Row-major layout of an operand: transposed or not, and its leading dimension.
  auto layout = [](const Mat<const T>& m, bool& trans, int64_t& ld) {
    if (m.cs == 1 && (m.rows == 1 || m.rs >= m.cols)) {
      trans = false, ld = std::max<int64_t>(m.rs, m.cols);
    } else {
      TORCH_INTERNAL_ASSERT(m.rs == 1, "birnn_ext: GEMM operand has no unit stride");
      trans = true, ld = std::max<int64_t>(m.cs, m.rows);
    }
  };
  const int64_t N = b.cols;
  bool ta, tb;
  int64_t lda, ldb;
  layout(a, ta, lda);
  layout(b, tb, ldb);
  TORCH_INTERNAL_ASSERT(c.cs == 1 || N == 1, "birnn_ext: GEMM output rows must be contiguous");
  gemm<T>(ta, tb, a.rows, N, a.cols, T(1), a.data, lda, b.data, ldb, beta, c.data, std::max<int64_t>(c.rs, N));
}

// c[M,N] = a[M,K] b[K,N] + beta c, on 2-D views with a unit stride in one dimension;
// c's rows are contiguous (c may be a block of columns of a wider matrix). Products
// large enough to amortise oneDNN's per-call cost go there.
// bfloat16 goes to oneDNN (bfloat16 storage, float32 accumulation; AVX-512 BF16 where
// the CPU has it) or, where those dot products run at half the float32 rate
// (bf16_large_products_in_float32, cpu_rules::bf16_dot_products_at_fma_rate) or there
// is no oneDNN, to the float32 GEMM over widened copies, rounded once into c.
inline bool bf16_matmul_on_onednn() { return onednn_matmul() && !bf16_large_products_in_float32(); }

template <typename T>
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::opmath_type<T> beta) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (K > 0 && bf16_matmul_on_onednn()) {
      onednn_matmul()(a, b, c, beta, 1.0f);
      return;
    }
    at::NoGradGuard no_grad;  // may run on an OpenMP worker, which carries no autograd state
    // A float32 copy in pooled memory, in the operand's layout where it is a transpose
    // (a weight's, or the gate gradients' in dW = dg^T h), so that the copy reads rows.
    auto widened = [](const at::Tensor& t) {
      const bool transposed = t.stride(0) == 1 && t.stride(1) != 1;
      const at::Tensor rows = transposed ? t.t() : t;
      at::Tensor w = pooled_empty(rows.sizes(), rows.options().dtype(at::kFloat));
      w.copy_(rows);
      return transposed ? w.t() : w;
    };
    const at::Tensor c32 = beta != 0 ? widened(c) : pooled_empty({M, N}, c.options().dtype(at::kFloat));
    matmul<float>(widened(a), widened(b), c32, beta);
    c.copy_(c32);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (K > 0 && M * N * K >= cpu_rules::kOnednnMinWork && c.is_contiguous()) {
        if (OnednnMatmul fn = onednn_matmul()) {
          fn(a, b, c, beta, 1.0f);
          return;
        }
      }
    }
    blas_matmul<T>(Mat<const T>::of(a), Mat<const T>::of(b), Mat<T>::of(c), T(beta));
  }
}

// matmul on operands by pointer: BLAS directly where matmul would call it, through
// tensors over the same memory where it would go to oneDNN.
template <typename T>
void matmul(Mat<const T> a, Mat<const T> b, Mat<T> c, at::opmath_type<T> beta) {
  const int64_t M = a.rows, K = a.cols, N = b.cols;
  if (M == 0 || N == 0) return;
  const bool dense_c = c.cs == 1 && (M == 1 || c.rs == N);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    matmul<T>(a.tensor(at::kBFloat16), b.tensor(at::kBFloat16), c.tensor(at::kBFloat16), beta);
  } else {
    if (std::is_same_v<T, float> && K > 0 && M * N * K >= cpu_rules::kOnednnMinWork && dense_c && onednn_matmul()) {
      const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
      matmul<T>(a.tensor(dtype), b.tensor(dtype), c.tensor(dtype), beta);
      return;
    }
    blas_matmul<T>(a, b, c, T(beta));
  }
}

// A weight matrix B [K,N] made ready for a sweep's step products c = a B: packed for
// small_gemm (float32) when the sweep multiplies enough rows by it to repay the packing,
// read in place otherwise; always packed for small_gemm_bf16 (bfloat16), into the panels
// the batch calls for (small_gemm_bf16_panels), whose alternative, oneDNN, costs more per
// call than a step product at these sizes (benchmarks/bench_step_gemm.py --dtype bf16).
// Made once per call, used every step.
//
// The panels live in the call's Scratch (reserve(), then place() once it is allocated),
// beside the other scratch of the call: the same pooled block every call, each
// direction's panels at the same offset in it, so a direction's thread writes them into
// lines its own core already holds. With a pooled block of its own per direction, the
// pool handed each direction the block the other had used in the call before, and
// each packing fetched its 256 KB (batch 1, H 128) out of the other core's cache:
// FusedBiLSTM at B 1, T 28, I 28, H 128 took 121-127 us a call in inference, 116-118
// with the panels in the scratch (one process per figure, alternated, Zen 4).
struct StepWeight {
  const void* data = nullptr;  // B in place: element (k, n) at data[k * rs + n * cs], of `dtype`
  int64_t K = 0, N = 0, rs = 0, cs = 1;
  at::ScalarType dtype = at::kFloat;
  int64_t packed_bytes = 0;  // the panels' size where make() chose to pack; 0: products in place
  void* packed = nullptr;    // the panels (small_gemm's, or small_gemm_bf16's), once placed
  bool bf16 = false;         // products in bfloat16, by small_gemm_bf16 over
  Bf16Panels bf16_panels = Bf16Panels::widened;  // panels of this kind

  bool defined() const { return data != nullptr; }
  template <typename T>
  Mat<const T> in_place() const {
    return {static_cast<const T*>(data), K, N, rs, cs};
  }

  // B = w^T for a contiguous weight w [N,K] as nn.LSTM stores it (x W_ih^T, h W_hh^T).
  static StepWeight transposed(const at::Tensor& w, int64_t steps, int64_t batch, at::ScalarType products) {
    return make(w.data_ptr(), w.size(1), w.size(0), 1, w.size(1), w.scalar_type(), steps, batch, products);
  }
  // B = w for a contiguous weight w [K,N] (dg W_hh, dh W_hr).
  static StepWeight as_is(const at::Tensor& w, int64_t steps, int64_t batch) {
    return make(w.data_ptr(), w.size(0), w.size(1), w.size(1), 1, w.scalar_type(), steps, batch, w.scalar_type());
  }
  // Made on the calling thread; the packing itself (pack()) runs on the thread of the
  // direction that uses it, so the directions pack at the same time. `products`: the
  // dtype of the products, b's own, or bfloat16 for a float32 b (rounded as packed).
  // The sweep multiplies steps x batch rows by B.
  static StepWeight make(const void* data, int64_t K, int64_t N, int64_t rs, int64_t cs, at::ScalarType dtype,
                         int64_t steps, int64_t batch, at::ScalarType products) {
    TORCH_INTERNAL_ASSERT(products == dtype || (products == at::kBFloat16 && dtype == at::kFloat));
    StepWeight w;
    w.data = data, w.K = K, w.N = N, w.rs = rs, w.cs = cs, w.dtype = dtype;
    w.bf16 = products == at::kBFloat16;
    const bool transposed = rs == 1 && cs != 1;
    const int64_t rows = steps * batch;
    if (w.bf16) {
      w.bf16_panels = small_gemm_bf16_panels(batch);
      w.packed_bytes = small_gemm_bf16_packed_bytes(w.bf16_panels, K, N);
    } else if (dtype == at::kFloat &&
             rows >= (transposed ? cpu_rules::kMinRowsToPackTransposed : cpu_rules::kMinRowsToPack)) {
      w.packed_bytes = small_gemm_packed_size(K, N) * int64_t(sizeof(float));
    }
    return w;
  }
  // Room for the panels in the call's scratch, and their place once it is allocated.
  void reserve(Scratch& scratch) { at_ = scratch.reserve<char>(packed_bytes); }
  void place(const Scratch& scratch) { packed = packed_bytes ? scratch.get<char>(at_) : nullptr; }

  // Packs B where make() chose to. With check_finite, true when it packed for
  // small_gemm and found every value of B finite on the way; false otherwise, and
  // wherever it did not look.
  bool pack(bool check_finite = false) const {
    if (!packed) return false;
    if (bf16 && dtype == at::kFloat) {
      small_gemm_bf16_pack(bf16_panels, K, N, static_cast<const float*>(data), rs, cs, packed);
      return false;
    }
    if (bf16) {
      small_gemm_bf16_pack(bf16_panels, K, N, static_cast<const uint16_t*>(data), rs, cs, packed);
      return false;
    }
    const float* b = static_cast<const float*>(data);
    if (check_finite) return small_gemm_pack_checked(K, N, b, rs, cs, static_cast<float*>(packed));
    small_gemm_pack(K, N, b, rs, cs, static_cast<float*>(packed));
    return false;
  }

 private:
  size_t at_ = 0;  // the panels' offset in the scratch
};

// c[M,N] = a[M,K] B + beta c: one step's product (c's rows contiguous).
// Unpacked float32 products below matmul's oneDNN threshold (a few rows: batch 1, or
// a short sweep) go to small_gemm_in_place, which reads the weights where they lie and
// beats the BLAS call on the step shapes benchmarks/bench_step_gemm.py times (batch 1
// to 16). It is not matmul's engine in general: with many rows and a few columns (a
// weight gradient, 512 x 28 x 28) its narrow tiles are slower than BLAS.
template <typename T>
void step_product(Mat<const T> a, const StepWeight& w, Mat<T> c, at::opmath_type<T> beta) {
  TORCH_INTERNAL_ASSERT(c.cs == 1 || w.N == 1, "birnn_ext: step product rows must be contiguous");
  const int64_t M = a.rows, ldc = std::max<int64_t>(c.rs, w.N);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (w.packed) {
      small_gemm_bf16(w.bf16_panels, M, w.N, w.K, reinterpret_cast<const uint16_t*>(a.data), a.rs, a.cs, w.packed,
                      beta, reinterpret_cast<uint16_t*>(c.data), ldc);
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (w.packed) {
      small_gemm(M, w.N, w.K, a.data, a.rs, a.cs, static_cast<const float*>(w.packed), beta, c.data, ldc);
      return;
    }
    if (M * w.N * w.K < cpu_rules::kOnednnMinWork && small_gemm_in_place_fits(M, w.K, a.cs, w.rs, w.cs)) {
      small_gemm_in_place(M, w.N, w.K, a.data, a.rs, a.cs, static_cast<const float*>(w.data), w.rs, w.cs, beta, c.data,
                          ldc);
      return;
    }
  }
  matmul<T>(a, w.in_place<T>(), c, beta);
}

}  // namespace birnn
