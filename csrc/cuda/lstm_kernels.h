// Torch-free interface of the CUDA kernels: parameter structs and launchers. The
// same declarations serve the torch glue (lstm_cuda.cpp, compiled by the host
// compiler against the CUDA runtime) and the host emulator (csrc/emu/), which
// compiles lstm_kernels.cu with g++ to run the device code on the CPU.
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

// The forward sweep of a layer without a projection in one launch: no per-step GEMM or
// launch. Block (d, k) of D * ceil(H / units) blocks owns the hidden units
// [k units, (k + 1) units) of direction d: it keeps their 4 * units rows of W_hh in
// shared memory for the whole sweep and, at each step, computes their gates from the
// whole h of the step before (read from global memory, where every block of d wrote
// its units), then writes its units of the new h. The steps [s_begin, s_end) run in
// one launch with a grid-wide barrier between them, which needs every block resident
// at once (a cooperative launch); one step per launch needs none, and is how the host
// emulator runs it.
template <typename T>
struct SweepFwd {
  int64_t T_, B, H, D, s_begin, s_end;
  int64_t units, batch_tile, lanes;  // from SweepPlan
  int64_t h_offset, part_offset;     // shared-memory layout, from SweepPlan
  const int64_t* len;  // [B] or nullptr
  const T* w_hh;       // [D,4H,H]
  const T* bias;       // [D,4H] (b_ih + b_hh), or nullptr
  T* xg;               // [T,B,D*4H] x W_ih^T; the activated gates are written back when training
  math_t<T>* c;        // [D,B,H] cell state, c0 in, c_n out
  T* h;                // [2,D,B,H]: step s reads h[s % 2] and writes h[(s + 1) % 2]
  T* y;                // [T,B,D*H]
  math_t<T>* c_prev;   // [T,B,D*H] saved when training, else nullptr
  T* h_prev;           // [D,T,B,H] saved when training, else nullptr
};

constexpr int64_t kSweepThreads = 256;

// How a sweep is cut: `units` hidden units per block, batch rows in tiles of
// `batch_tile` (each tile's h is staged in shared memory), `lanes` threads summing
// each dot product (a power of two up to 32, so that small batches still keep the
// block's threads busy). Shared memory: the weight rows, then the h tile, then the
// lanes' partial sums; rows are padded by one element against bank conflicts.
struct SweepPlan {
  int64_t units = 0, batch_tile = 0, lanes = 0, blocks = 0;
  int64_t h_offset = 0, part_offset = 0, shared_bytes = 0;
};

inline int64_t sweep_align(int64_t bytes) { return (bytes + 15) / 16 * 16; }

inline SweepPlan sweep_plan(int64_t H, int64_t B, int64_t D, int64_t units, int64_t batch_tile, int64_t elem_bytes,
                            int64_t math_bytes) {
  SweepPlan pl;
  pl.units = units;
  pl.batch_tile = batch_tile < B ? batch_tile : B;
  const int64_t rows = 4 * units, quads = (pl.batch_tile + 3) / 4;
  // A thread's work item: 4 batch rows x 2 weight rows, in one lane of the dot products.
  const int64_t items = quads * (rows / 2);
  pl.lanes = 1;
  while (pl.lanes < 32 && items * pl.lanes * 2 <= kSweepThreads) pl.lanes *= 2;
  pl.blocks = D * ((H + units - 1) / units);
  pl.h_offset = sweep_align(rows * (H + 1) * elem_bytes);
  pl.part_offset = pl.h_offset + sweep_align(4 * quads * (H + 1) * elem_bytes);
  pl.shared_bytes = pl.part_offset + sweep_align(pl.batch_tile * rows * pl.lanes * math_bytes);
  return pl;
}

// The plan for a GPU that keeps at most `max_blocks` blocks resident with at most
// `max_shared` bytes each: the fewest units per block that fit the blocks (spreading
// the work over as many as there are), then the largest batch tile that fits the
// shared memory. Returns false where nothing fits (W_hh's rows too long).
inline bool choose_sweep_plan(int64_t H, int64_t B, int64_t D, int64_t elem_bytes, int64_t math_bytes,
                              int64_t max_blocks, int64_t max_shared, SweepPlan* out) {
  if (H <= 0 || B <= 0 || D <= 0 || max_blocks < D) return false;
  int64_t units = (D * H + max_blocks - 1) / max_blocks;
  while (D * ((H + units - 1) / units) > max_blocks) ++units;
  for (int64_t tile = B; tile >= 1; tile = tile > 64 ? tile * 3 / 4 : tile - 1) {
    const SweepPlan pl = sweep_plan(H, B, D, units, tile, elem_bytes, math_bytes);
    if (pl.shared_bytes <= max_shared) {
      *out = pl;
      return true;
    }
  }
  return false;
}

// out[c] = sum over rows r of m[r, c], in a fixed order (bitwise repeatable).
template <typename T>
struct ColumnSums {
  int64_t rows, cols;
  const T* m;  // [rows, cols]
  T* out;      // [cols]
};

// Each returns the launch's error (cudaSuccess where it went).
template <typename T> cudaError_t launch_fwd_step(const FwdStep<T>& p, cudaStream_t stream);
// The cell op: one step with T_ = 1, D = 1, s = 0, no c_prev/h_prev; gates written when training.
template <typename T> cudaError_t launch_cell_fwd(const FwdStep<T>& p, bool training, cudaStream_t stream);
template <typename T> cudaError_t launch_proj_out(const ProjOut<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_bwd_step(const BwdStep<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_proj_bwd(const ProjBwd<T>& p, cudaStream_t stream);
template <typename T> cudaError_t launch_column_sums(const ColumnSums<T>& p, cudaStream_t stream);
// The sweep: `shared_bytes` from the plan; `cooperative` launches all the steps of p at
// once (GPU only); otherwise p must hold one step.
template <typename T>
cudaError_t launch_sweep_fwd(const SweepFwd<T>& p, int64_t shared_bytes, bool cooperative, cudaStream_t stream);
#if !defined(BIRNN_EMU)
// Whether the device keeps all of the plan's blocks resident at once (what a cooperative
// launch needs); sets the kernel's shared-memory limit to the plan's on the way.
template <typename T>
bool sweep_fwd_fits(const SweepPlan& plan, bool training, int multiprocessors);
#endif

}  // namespace birnn::cuda
