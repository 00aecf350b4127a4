// CUDA kernels of the layer and cell ops, and their launchers. Torch-free: compiled by
// nvcc for the GPU, and by g++ with csrc/emu/cuda_emu.h to run the same device code on
// the host in the tests. Every launch goes through BIRNN_LAUNCH for that reason.
//
// A sweep step is one launch covering both directions: one thread per (direction,
// batch row, hidden unit), with each sequence's length masked in the kernel, so
// variable-length batches need no repacking. The gate math is csrc/lstm_cell.h, the
// same code the CPU path runs.
#include "lstm_kernels.h"

#include "../lstm_cell.h"

#if !defined(BIRNN_EMU)
#define BIRNN_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define BIRNN_DYNAMIC_SHARED(type, name)          \
  extern __shared__ unsigned char birnn_smem_[]; \
  type* name = reinterpret_cast<type*>(birnn_smem_)
#define BIRNN_LAUNCH_ERROR() cudaGetLastError()
#include <cooperative_groups.h>
#define BIRNN_GRID_SYNC() cooperative_groups::this_grid().sync()
#else
#define BIRNN_GRID_SYNC() ::birnn_emu::fail("grid sync: the emulator runs the sweep one step per launch")
#endif

namespace birnn::cuda {
namespace {

__host__ __device__ __forceinline__ float to_math(float v) { return v; }
__host__ __device__ __forceinline__ double to_math(double v) { return v; }
__host__ __device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_math(math_t<T> v) {
  return static_cast<T>(v);
}
template <>
__host__ __device__ __forceinline__ __half from_math<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int kThreads = 256;

inline dim3 grid_for(int64_t n) { return dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads)); }

// The time step that direction d of sequence b handles at sweep step s.
__host__ __device__ __forceinline__ int64_t step_time(int64_t d, int64_t s, int64_t len) {
#if defined(BIRNN_BREAK_OFF_BY_ONE)
  // Deliberately wrong, for the test that the emulated run catches a broken kernel.
  if (d == 1 && s < len) return len - s;
#endif
  return time_index(int(d), s, len);
}

// One element's forward step: the gates from its x W_ih^T (xg: this row and direction),
// recurrent sums and bias (this direction's, or nullptr); the cell state c updated in
// place; the activated gates written back over xg when training. Returns the new h.
template <typename T, bool Training>
__host__ __device__ __forceinline__ math_t<T> cell_forward(T* xg, const math_t<T> (&rec)[4], const T* bias,
                                                           math_t<T>& c, int64_t H, int64_t j) {
  using A = math_t<T>;
  A pre[4];
  for (int k = 0; k < 4; ++k) pre[k] = to_math(xg[k * H + j]) + rec[k] + (bias ? to_math(bias[k * H + j]) : A(0));
  const Gates<A> a = activate(pre[0], pre[1], pre[2], pre[3]);
  c = cell_state(a, c);
  if (Training) {
    xg[j] = from_math<T>(a.i);
    xg[H + j] = from_math<T>(a.f);
    xg[2 * H + j] = from_math<T>(a.g);
    xg[3 * H + j] = from_math<T>(a.o);
  }
  return hidden_state(a, c);
}

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
  const A h = cell_forward<T, Training>(p.xg + row * D * G + d * G, sums, p.bias ? p.bias + d * G : nullptr,
                                        p.c[state * H + j], H, j);
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

// A load of what other blocks wrote before the last grid barrier: through L2, never
// from this SM's L1, which is not coherent with the other SMs' writes.
template <typename T>
__device__ __forceinline__ T load_coherent(const T* p) {
#if defined(BIRNN_EMU)
  return *p;
#else
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    return __ldcg(p);
  }
#endif
}

template <typename T, bool Training>
__global__ void sweep_fwd_kernel(const SweepFwd<T> p) {
  using A = math_t<T>;
  // Shared-memory indices fit in int; global offsets stay int64_t.
  const int H = int(p.H), U = int(p.units), R = 4 * U, half = R / 2, L = int(p.lanes), stride = H + 1;
  const int64_t G = 4 * p.H, B = p.B, D = p.D;
  const int per_dir = (H + U - 1) / U;
  const int64_t d = blockIdx.x / per_dir;
  const int j0 = (blockIdx.x % per_dir) * U;
  const int nu = H - j0 < U ? H - j0 : U;  // this block's units: fewer in a direction's last block
  const int tid = threadIdx.x, nt = blockDim.x;
  BIRNN_DYNAMIC_SHARED(unsigned char, smem);
  T* w_s = reinterpret_cast<T*>(smem);                   // [R][stride]: row g*U + u is W_hh row g*H + j0 + u
  T* h_s = reinterpret_cast<T*>(smem + p.h_offset);     // [4 * quads][stride]: h of the tile's rows, zero past them
  A* part = reinterpret_cast<A*>(smem + p.part_offset);  // [batch_tile * R][L] partial dot products
  for (int i = tid; i < R * H; i += nt) {
    const int r = i / H, k = i % H, g = r / U, u = r % U;
    w_s[r * stride + k] = u < nu ? p.w_hh[(d * G + g * H + j0 + u) * H + k] : from_math<T>(A(0));
  }
  for (int64_t s = p.s_begin; s < p.s_end; ++s) {
    const T* h_cur = p.h + ((s & 1) * D + d) * B * H;
    T* h_next = p.h + (((s + 1) & 1) * D + d) * B * H;
    for (int64_t b0 = 0; b0 < B; b0 += p.batch_tile) {
      const int nb = int(B - b0 < p.batch_tile ? B - b0 : p.batch_tile), quads = (nb + 3) / 4;
      // Eight loads in flight per thread before their stores: one at a time, each waits
      // out a trip to L2.
      const int n_h = 4 * quads * H;
      for (int i0 = tid; i0 < n_h; i0 += 8 * nt) {
        T v[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int i = i0 + q * nt, bb = i / H;
          v[q] = i < n_h && bb < nb ? load_coherent(h_cur + b0 * H + i) : from_math<T>(A(0));
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int i = i0 + q * nt;
          if (i < n_h) h_s[(i / H) * stride + i % H] = v[q];
        }
      }
      __syncthreads();
      // Dot products, each thread a 4 x 2 tile of them: tile rows 4 bq .. 4 bq + 3 against
      // weight rows rp and rp + R/2, over k = l, l + L, ... (item order: rp fastest).
      for (int t = tid; t < half * L * quads; t += nt) {
        const int rp = t % half, l = (t / half) % L, bq = t / (half * L);
        const T* w0 = w_s + rp * stride;
        const T* w1 = w0 + half * stride;
        const T* hq = h_s + 4 * bq * stride;
        A acc[4][2] = {};
#pragma unroll 2
        for (int k = l; k < H; k += L) {
          const A a0 = to_math(w0[k]), a1 = to_math(w1[k]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const A hv = to_math(hq[q * stride + k]);
            acc[q][0] += a0 * hv;
            acc[q][1] += a1 * hv;
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int bb = 4 * bq + q;
          if (bb < nb) {
            part[(bb * R + rp) * L + l] = acc[q][0];
            part[(bb * R + rp + half) * L + l] = acc[q][1];
          }
        }
      }
#if !defined(BIRNN_BREAK_SWEEP_BARRIER)
      __syncthreads();
#endif
      for (int t = tid; t < nb * nu; t += nt) {
        const int bb = t / nu, u = t % nu, j = j0 + u;
        const int64_t b = b0 + bb;
        const int64_t len = p.len ? p.len[b] : p.T_;
        const int64_t row = step_time(d, s, len) * B + b;
        const int64_t state = d * B + b;
        const T h_old = h_s[bb * stride + j];
        if (p.c_prev) p.c_prev[row * D * H + d * H + j] = p.c[state * H + j];
        if (p.h_prev) p.h_prev[(d * p.T_ * B + row) * H + j] = h_old;
        T* y = p.y + row * D * H + d * H;
        if (s >= len) {  // padding: zero output, state carried unchanged
          y[j] = from_math<T>(A(0));
          h_next[b * H + j] = h_old;
          continue;
        }
        A sums[4];
        for (int g = 0; g < 4; ++g) {
          const A* lanes = part + (bb * R + g * U + u) * L;
          sums[g] = A(0);
          for (int l = 0; l < L; ++l) sums[g] += lanes[l];
        }
        const A h = cell_forward<T, Training>(p.xg + row * D * G + d * G, sums, p.bias ? p.bias + d * G : nullptr,
                                              p.c[state * H + j], H, j);
        h_next[b * H + j] = from_math<T>(h);
        y[j] = from_math<T>(h);
      }
      __syncthreads();  // the next tile overwrites h_s and part
    }
    if (s + 1 < p.s_end) BIRNN_GRID_SYNC();
  }
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

template <typename T>
cudaError_t launch_sweep_fwd(const SweepFwd<T>& p, int64_t shared_bytes, bool cooperative, cudaStream_t stream) {
  if (p.B == 0 || p.s_begin >= p.s_end) return cudaSuccess;
  auto kernel = p.c_prev ? sweep_fwd_kernel<T, true> : sweep_fwd_kernel<T, false>;
  const int64_t blocks = p.D * ((p.H + p.units - 1) / p.units);
#if !defined(BIRNN_EMU)
  if (cooperative) {
    void* args[] = {const_cast<SweepFwd<T>*>(&p)};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(blocks)),
                                       dim3(unsigned(kSweepThreads)), args, size_t(shared_bytes), stream);
  }
#else
  if (cooperative || p.s_end - p.s_begin != 1) return cudaErrorNotSupported;
#endif
  BIRNN_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(unsigned(kSweepThreads)), size_t(shared_bytes), stream, p);
  return BIRNN_LAUNCH_ERROR();
}

#if !defined(BIRNN_EMU)
template <typename T>
bool sweep_fwd_fits(const SweepPlan& plan, bool training, int multiprocessors) {
  auto kernel = training ? sweep_fwd_kernel<T, true> : sweep_fwd_kernel<T, false>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // a size over the device's limit: no sweep, and no error left behind
    return false;
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, int(kSweepThreads), size_t(plan.shared_bytes)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return int64_t(per_sm) * multiprocessors >= plan.blocks;
}
#define BIRNN_INSTANTIATE_FITS(T) template bool sweep_fwd_fits<T>(const SweepPlan&, bool, int);
#else
#define BIRNN_INSTANTIATE_FITS(T)
#endif

#define BIRNN_INSTANTIATE(T)                                                          \
  template cudaError_t launch_fwd_step<T>(const FwdStep<T>&, cudaStream_t);         \
  template cudaError_t launch_cell_fwd<T>(const FwdStep<T>&, bool, cudaStream_t);   \
  template cudaError_t launch_proj_out<T>(const ProjOut<T>&, cudaStream_t);         \
  template cudaError_t launch_bwd_step<T>(const BwdStep<T>&, cudaStream_t);         \
  template cudaError_t launch_proj_bwd<T>(const ProjBwd<T>&, cudaStream_t);         \
  template cudaError_t launch_column_sums<T>(const ColumnSums<T>&, cudaStream_t);       \
  template cudaError_t launch_sweep_fwd<T>(const SweepFwd<T>&, int64_t, bool, cudaStream_t); \
  BIRNN_INSTANTIATE_FITS(T)
BIRNN_INSTANTIATE(float)
BIRNN_INSTANTIATE(double)
BIRNN_INSTANTIATE(__half)
BIRNN_INSTANTIATE(__nv_bfloat16)
#undef BIRNN_INSTANTIATE

}  // namespace birnn::cuda
