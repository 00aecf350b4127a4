// Torch-free interface of the per-step CUDA kernels (lstm_kernels.cu): parameter structs
// and launchers; the persistent sweeps' are sweep_kernels.h. The same declarations serve
// the torch glue (lstm_cuda.cpp, compiled by the host compiler against the CUDA runtime)
// and the host emulator (csrc/emu/), which compiles lstm_kernels.cu with g++ to run the
// device code on the CPU.
//
// Storage types T: float, double, __half, __nv_bfloat16. The math type A is double for
// double and float otherwise; the cell state and the recurrent carries are kept in A.
#pragma once

#include <cstdint>

// The half types first: they bring in the CUDA runtime's declarations, which must not
// see the emulator's threadIdx/blockIdx/... macros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(BIRNN_EMU)
#include "../emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

namespace birnn::cuda {

// The entries of a storage type of elem_bytes that one 16-byte load reads (Vec16).
__host__ __device__ constexpr int64_t vec_entries(int64_t elem_bytes) { return 16 / elem_bytes; }

template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename T>
using math_t = typename MathType<T>::type;

// One step s of a layer's forward sweep, every direction at once: one thread per
// (direction, batch row, hidden unit). P is the size of h (proj_size, or H).
template <typename T>
struct FwdStep {
  int64_t T_, B, H, P, D, s;
  const int64_t* len;  // [B] on the device, or nullptr: every sequence has T steps
  const math_t<T>* rec;  // [D,B,4H] h W_hh^T of this step
  const T* bias;       // [D,4H] (b_ih + b_hh), or nullptr
  T* xg;               // [T,B,D*4H] x W_ih^T; the activated gates are written back when training
  math_t<T>* c;        // [D,B,H] cell state: c0 on the first step, c_n after the last
  T* h;                // [D,B,P] hidden state, updated here when there is no projection
  T* h_raw;            // [D,B,H] with a projection: o * tanh(c) of this step; else nullptr
  T* y;                // [T,B,D*P] output; zero at padding, written here when no projection
  math_t<T>* c_prev;   // [T,B,D*H] saved when training, else nullptr
  T* h_prev;           // [D,T,B,P] saved when training, else nullptr
};

// With a projection, after h_proj = h_raw W_hr^T: the new h to the state and to y, and
// h_raw to its saved copy when training.
template <typename T>
struct ProjOut {
  int64_t T_, B, H, P, D, s;
  const int64_t* len;   // [B] or nullptr
  const T* h_proj;      // [D,B,P]
  const T* h_raw;       // [D,B,H]
  T* h;                 // [D,B,P]
  T* y;                 // [T,B,D*P]
  T* h_raw_saved;       // [D,T,B,H] when training, else nullptr
};

// One step s of the backward sweep, every direction at once.
template <typename T>
struct BwdStep {
  int64_t T_, B, H, P, D, s;
  const int64_t* len;       // [B] or nullptr
  const T* gates;           // [T,B,D*4H] activated
  const math_t<T>* c_prev;  // [T,B,D*H]
  const T* dy;              // [T,B,D*P] or nullptr; read here only without a projection
  const math_t<T>* dh_raw;  // [D,B,H] with a projection: the gradient of o * tanh(c); else nullptr
  math_t<T>* dh;            // [D,B,P] carry: zeroed for the rows that step (the recurrent GEMM refills it)
  math_t<T>* dc;            // [D,B,H] carry: gradient of c_t in, of c_{t-1} out
  T* dg;                    // [D,T,B,4H] out: gradients of the gate pre-activations, time-ordered
  T* dg_step;               // [D,B,4H] out: the same rows for this step, zero at padding
};

// With a projection, before the cell's backward: the total gradient of this step's h
// (carry + output), as T for the dh_proj W_hr GEMM and for dW_hr after the sweep.
template <typename T>
struct ProjBwd {
  int64_t T_, B, P, D, s;
  const int64_t* len;  // [B] or nullptr
  const T* dy;         // [T,B,D*P] or nullptr
  math_t<T>* dh;       // [D,B,P] carry; zeroed for the rows that step
  T* dh_proj;          // [D,B,P] out
  T* dh_proj_saved;    // [D,T,B,P] out
};

// out[c] = sum over rows r of m[r, c], in a fixed order (bitwise repeatable).
template <typename T>
struct ColumnSums {
  int64_t rows, cols;
  const T* m;  // [rows, cols]
  T* out;      // [cols]
};

// The operand tables of a batched product over the directions, for cuBLAS's
// pointer-array batched GEMM: table[i] = ptrs[i], i < n, written by one launch whose
// arguments carry the pointers. So the per-step products read each direction's weights
// where they lie (no stacked copy per call), with no host-to-device copy, and a CUDA
// graph captures the pointers by value as it does every kernel argument.
struct PointerTable {
  static constexpr int kMax = 12;  // 6 operands x 2 directions
  const void* ptrs[kMax];
  int n;
};

// Each returns the launch's error (cudaSuccess where it went).
template <typename T> cudaError_t launch_fwd_step(const FwdStep<T>& p, cudaStream_t stream);
// The cell op: one step with T_ = 1, D = 1, s = 0, no c_prev/h_prev; gates written when training.
template <typename T> cudaError_t launch_cell_fwd(const FwdStep<T>& p, bool training, cudaStream_t stream);
template <typename T> cudaError_t launch_proj_out(const ProjOut<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_bwd_step(const BwdStep<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_proj_bwd(const ProjBwd<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_column_sums(const ColumnSums<T>& p, cudaStream_t stream);
// table: n pointers' room on the device.
cudaError_t launch_pointer_table(const PointerTable& p, const void** table, cudaStream_t stream);

}  // namespace birnn::cuda
