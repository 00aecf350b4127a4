// The per-step CUDA kernels of the layer and cell ops, and their launchers (the
// persistent sweeps are sweep_fwd.cu and sweep_bwd.cu). Torch-free: compiled by nvcc for the GPU, and
// by g++ with csrc/emu/cuda_emu.h to run the same device code on the host in the tests.
// Every launch goes through BIRNN_LAUNCH for that reason.
//
// A step is one launch covering both directions: one thread per (direction,
// batch row, hidden unit), with each sequence's length masked in the kernel, so
// variable-length batches need no repacking. The gate math is csrc/lstm_cell.h, the
// same code the CPU path runs.
#include "kernel_common.cuh"

namespace birnn::cuda {
namespace {

template <typename T, bool Training>
__global__ void fwd_step_kernel(const FwdStep<T> p) {
  using A = math_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.D * p.B * p.H) return;
  const int64_t H = p.H, P = p.P, D = p.D, G = 4 * H;
  const int64_t j = idx % H, b = (idx / H) % p.B, d = idx / (H * p.B);
  const int64_t L = p.len ? p.len[b] : p.T_;
  const int64_t row = step_time(d, p.s, L) * p.B + b;
  const int64_t state = d * p.B + b;
  if (p.c_prev) p.c_prev[row * D * H + d * H + j] = p.c[state * H + j];
  if (p.h_prev && j < P) p.h_prev[(d * p.T_ * p.B + row) * P + j] = p.h[state * P + j];
  T* y = p.y + row * D * P + d * P;
  if (p.s >= L) {  // padding: zero output, state carried unchanged
    if (j < P) y[j] = from_math<T>(A(0));
    if (p.h_raw) p.h_raw[state * H + j] = from_math<T>(A(0));
    return;
  }
  const A* rec = p.rec + state * G;
  const A sums[4] = {rec[j], rec[H + j], rec[2 * H + j], rec[3 * H + j]};
  A bias[4] = {};
  if (p.bias)
    for (int k = 0; k < 4; ++k) bias[k] = to_math(p.bias[d * G + k * H + j]);
  const A h = cell_forward<T, Training>(p.xg + row * D * G + d * G, sums, bias, p.c[state * H + j], H, j);
  if (p.h_raw) {
    p.h_raw[state * H + j] = from_math<T>(h);
  } else {
    p.h[state * P + j] = from_math<T>(h);
    y[j] = from_math<T>(h);
  }
}

template <typename T>
__global__ void proj_out_kernel(const ProjOut<T> p) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.D * p.B * p.H) return;
  const int64_t H = p.H, P = p.P;
  const int64_t k = idx % H, b = (idx / H) % p.B, d = idx / (H * p.B);
  const int64_t L = p.len ? p.len[b] : p.T_;
  const int64_t row = step_time(d, p.s, L) * p.B + b;
  const int64_t state = d * p.B + b;
  if (p.h_raw_saved) p.h_raw_saved[(d * p.T_ * p.B + row) * H + k] = p.h_raw[state * H + k];
  if (p.s >= L || k >= P) return;
  p.h[state * P + k] = p.h_proj[state * P + k];
  p.y[row * p.D * P + d * P + k] = p.h_proj[state * P + k];
}

template <typename T>
__global__ void bwd_step_kernel(const BwdStep<T> p) {
  using A = math_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.D * p.B * p.H) return;
  const int64_t H = p.H, P = p.P, D = p.D, G = 4 * H;
  const int64_t j = idx % H, b = (idx / H) % p.B, d = idx / (H * p.B);
  const int64_t L = p.len ? p.len[b] : p.T_;
  const int64_t row = step_time(d, p.s, L) * p.B + b;
  const int64_t state = d * p.B + b;
  T* dg = p.dg + (d * p.T_ * p.B + row) * G;
  T* dg_step = p.dg_step + state * G;
  if (p.s >= L) {  // padding: the state's gradient passes through unchanged
    for (int k = 0; k < 4; ++k) dg[k * H + j] = dg_step[k * H + j] = from_math<T>(A(0));
    return;
  }
  const T* g = p.gates + row * D * G + d * G;
  const Gates<A> a{to_math(g[j]), to_math(g[H + j]), to_math(g[2 * H + j]), to_math(g[3 * H + j])};
  A dh;
  if (p.dh_raw) {
    dh = p.dh_raw[state * H + j];
  } else {
    dh = p.dh[state * P + j] + (p.dy ? to_math(p.dy[row * D * P + d * P + j]) : A(0));
    p.dh[state * P + j] = A(0);  // refilled with dg W_hh by the recurrent GEMM
  }
  const GateGrads<A> r = backward(a, p.c_prev[row * D * H + d * H + j], dh, p.dc[state * H + j]);
  const A grads[4] = {r.di, r.df, r.dg, r.do_};
  for (int k = 0; k < 4; ++k) dg[k * H + j] = dg_step[k * H + j] = from_math<T>(grads[k]);
  p.dc[state * H + j] = r.dc_prev;
}

template <typename T>
__global__ void proj_bwd_kernel(const ProjBwd<T> p) {
  using A = math_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.D * p.B * p.P) return;
  const int64_t P = p.P;
  const int64_t k = idx % P, b = (idx / P) % p.B, d = idx / (P * p.B);
  const int64_t L = p.len ? p.len[b] : p.T_;
  const int64_t row = step_time(d, p.s, L) * p.B + b;
  const int64_t state = d * p.B + b;
  A v = A(0);
  if (p.s < L) {
    v = p.dh[state * P + k] + (p.dy ? to_math(p.dy[row * p.D * P + d * P + k]) : A(0));
    p.dh[state * P + k] = A(0);  // refilled with dg W_hh by the recurrent GEMM
  }
  p.dh_proj[state * P + k] = from_math<T>(v);
  p.dh_proj_saved[(d * p.T_ * p.B + row) * P + k] = from_math<T>(v);
}

// Block (32, 8): each column of the tile is summed by 8 threads over interleaved rows,
// then their partial sums are reduced in shared memory in a fixed tree order.
template <typename T>
__global__ void column_sums_kernel(const ColumnSums<T> p) {
  using A = math_t<T>;
  BIRNN_DYNAMIC_SHARED(A, partial);  // [blockDim.y][blockDim.x]
  const unsigned tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int64_t c = int64_t(blockIdx.x) * bx + tx;
  A acc = A(0);
  if (c < p.cols)
    for (int64_t r = ty; r < p.rows; r += blockDim.y) acc += to_math(p.m[r * p.cols + c]);
  partial[ty * bx + tx] = acc;
#if !defined(BIRNN_BREAK_MISSING_BARRIER)
  __syncthreads();
#endif
  for (unsigned stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (ty < stride) partial[ty * bx + tx] += partial[(ty + stride) * bx + tx];
    __syncthreads();
  }
  if (ty == 0 && c < p.cols) p.out[c] = from_math<T>(partial[tx]);
}

}  // namespace

// One thread per element of an n-element grid, in blocks of kThreads.
template <typename P>
cudaError_t launch_elementwise(void (*kernel)(P), int64_t n, const P& p, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  BIRNN_LAUNCH(kernel, grid_for(n), dim3(kThreads), 0, stream, p);
  return BIRNN_LAUNCH_ERROR();
}

// The activated gates are written back when `training`; c_prev and h_prev are saved
// where their pointers are set (the layer sweep in training; never for the cell op,
// whose inputs are the saved state).
template <typename T>
cudaError_t launch_cell_fwd(const FwdStep<T>& p, bool training, cudaStream_t stream) {
  return launch_elementwise(training ? fwd_step_kernel<T, true> : fwd_step_kernel<T, false>, p.D * p.B * p.H, p,
                            stream);
}

template <typename T>
cudaError_t launch_fwd_step(const FwdStep<T>& p, cudaStream_t stream) {
  return launch_cell_fwd(p, p.c_prev != nullptr || p.h_prev != nullptr, stream);
}

template <typename T>
cudaError_t launch_proj_out(const ProjOut<T>& p, cudaStream_t stream) {
  return launch_elementwise(proj_out_kernel<T>, p.D * p.B * p.H, p, stream);
}

template <typename T>
cudaError_t launch_bwd_step(const BwdStep<T>& p, cudaStream_t stream) {
  return launch_elementwise(bwd_step_kernel<T>, p.D * p.B * p.H, p, stream);
}

template <typename T>
cudaError_t launch_proj_bwd(const ProjBwd<T>& p, cudaStream_t stream) {
  return launch_elementwise(proj_bwd_kernel<T>, p.D * p.B * p.P, p, stream);
}

template <typename T>
cudaError_t launch_column_sums(const ColumnSums<T>& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((p.cols + block.x - 1) / block.x));
  auto kernel = column_sums_kernel<T>;
  BIRNN_LAUNCH(kernel, grid, block, block.x * block.y * sizeof(math_t<T>), stream, p);
  return BIRNN_LAUNCH_ERROR();
}

namespace {
__global__ void pointer_table_kernel(const PointerTable p, const void** table) {
  const int i = int(threadIdx.x);
  if (i < p.n) table[i] = p.ptrs[i];
}
}  // namespace

cudaError_t launch_pointer_table(const PointerTable& p, const void** table, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  if (p.n > PointerTable::kMax) return cudaErrorInvalidValue;
  BIRNN_LAUNCH(pointer_table_kernel, dim3(1), dim3(unsigned(PointerTable::kMax)), 0, stream, p, table);
  return BIRNN_LAUNCH_ERROR();
}

#define BIRNN_INSTANTIATE(T)                                                          \
  template cudaError_t launch_fwd_step<T>(const FwdStep<T>&, cudaStream_t);         \
  template cudaError_t launch_cell_fwd<T>(const FwdStep<T>&, bool, cudaStream_t);   \
  template cudaError_t launch_proj_out<T>(const ProjOut<T>&, cudaStream_t);         \
  template cudaError_t launch_bwd_step<T>(const BwdStep<T>&, cudaStream_t);         \
  template cudaError_t launch_proj_bwd<T>(const ProjBwd<T>&, cudaStream_t);         \
  template cudaError_t launch_column_sums<T>(const ColumnSums<T>&, cudaStream_t);
BIRNN_INSTANTIATE(float)
BIRNN_INSTANTIATE(double)
BIRNN_INSTANTIATE(__half)
BIRNN_INSTANTIATE(__nv_bfloat16)
#undef BIRNN_INSTANTIATE

}  // namespace birnn::cuda
