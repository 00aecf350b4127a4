// The persistent sweeps: a layer's forward or backward recurrence, both directions, in
// one launch (sweep_kernels.h says how the work is cut). Torch-free, launched through
// BIRNN_LAUNCH like lstm_kernels.cu, so the host emulator runs the same device code.
#include <type_traits>

#include "kernel_common.cuh"
#include "mma.cuh"
#include "sweep_kernels.h"

namespace birnn::cuda {
namespace {

// Copies rows [b0, b0 + nb) of a [B][W] matrix that other blocks wrote before the last
// barrier into the first W columns of dst ([rows][stride] in shared memory), rows past nb
// as zeros, so that the products can take batch rows four (eight) at a time. Eight loads
// in flight per thread before their stores: one at a time, each waits out a trip to L2.
template <typename T>
__device__ __forceinline__ void stage_tile(const T* src, int nb, int rows, int W, int stride, T* dst) {
  const int tid = threadIdx.x, nt = blockDim.x, n = rows * W;
  for (int i0 = tid; i0 < n; i0 += 8 * nt) {
    T v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int i = i0 + q * nt;
      v[q] = i < n && i / W < nb ? load_coherent(src + i) : from_math<T>(math_t<T>(0));
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int i = i0 + q * nt;
      if (i < n) dst[(i / W) * stride + i % W] = v[q];
    }
  }
}

// part[(bb * R + r) * L + l] = lane l's share of sum_k w[r][k] tile[bb][k], k = l, l + L, ...
// for the tile's nb rows and the block's R weight rows (w: [R][stride], tile:
// [4 * quads][stride], both in shared memory) on the CUDA cores. Each thread takes 4 x 2
// of them at a time: tile rows 4 bq .. 4 bq + 3 against weight rows rp and rp + R/2 (item
// order: rp fastest).
template <typename T>
__device__ __forceinline__ void tile_products(const T* w, const T* tile, int R, int W, int stride, int L, int nb,
                                              int quads, math_t<T>* part) {
  using A = math_t<T>;
  const int half = R / 2;
  for (int t = threadIdx.x; t < half * L * quads; t += blockDim.x) {
    const int rp = t % half, l = (t / half) % L, bq = t / (half * L);
    const T* w0 = w + rp * stride;
    const T* w1 = w0 + half * stride;
    const T* tq = tile + 4 * bq * stride;
    A acc[4][2] = {};
#pragma unroll 2
    for (int k = l; k < W; k += L) {
      const A a0 = to_math(w0[k]), a1 = to_math(w1[k]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const A v = to_math(tq[q * stride + k]);
        acc[q][0] += a0 * v;
        acc[q][1] += a1 * v;
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
}

// The same products on the tensor cores (sm_80 and later): part[(bb * R + r) * L + l] =
// slice l's share of sum_k w[r][k] tile[bb][k], slice l the columns [l kdim / L,
// (l + 1) kdim / L), for the tile's nb rows and the block's R weight rows (a multiple of
// 16; the tile's rows staged to a multiple of 8, the columns up to kdim zeros past the
// row's end). A warp's work item: 16 weight rows (mma's A, row-major) x 8 batch rows
// (B's columns) over one slice, accumulated in float.
template <typename T>
__device__ __forceinline__ void mma_products(const T* w, const T* tile, int R, int stride, int kdim, int L, int nb,
                                             float* part) {
  constexpr mma::Kind K = mma::KindOf<T>::value;
  const int warp = int(threadIdx.x / 32), warps = int(blockDim.x / 32);
  const int row_tiles = R / 16, octs = (nb + 7) / 8, slice = kdim / L;
  for (int item = warp; item < row_tiles * L * octs; item += warps) {  // the same for the whole warp
    const int rt = item % row_tiles, l = item / row_tiles % L, oc = item / (row_tiles * L);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    mma::warp_tile_product<K>(acc, w + rt * 16 * stride + l * slice, stride, tile + oc * 8 * stride + l * slice,
                              stride, slice);
    mma::store_c(acc, part + (oc * 8 * R + rt * 16) * L + l, L, R * L, nb - 8 * oc);
  }
}

// The barrier between two steps of a sweep. Where a direction is one block (per_dir ==
// 1), it exchanges its h (or dg) with itself alone, and the __syncthreads that ends
// every batch tile already orders the step's global writes before the next step's reads
// (a block barrier makes its threads' global writes visible to the block). Otherwise
// every block of the grid must have written its units first: the grid barrier, which
// needs the cooperative launch.
__device__ __forceinline__ void step_barrier(int per_dir) {
  if (per_dir > 1) BIRNN_GRID_SYNC();
}

// The batch rows a tile of nb rows stages: whole quads for the SIMT products, whole
// octets (one mma's N) for the tensor cores'.
template <bool Mma>
__device__ __forceinline__ int staged_rows(int nb) {
  return Mma ? (nb + 7) / 8 * 8 : (nb + 3) / 4 * 4;
}

// The sum of one dot product's lanes, in a fixed order.
template <typename A>
__device__ __forceinline__ A lane_sum(const A* lanes, int L) {
  A s = A(0);
  for (int l = 0; l < L; ++l) s += lanes[l];
  return s;
}

// Rows [b0, b0 + nb) of the whole row of the step before into the first W columns of dst
// ([rows][stride], rows past nb zeros), read from the cluster's blocks (distributed shared memory): each
// block keeps, for every batch row, its `per_block` entries of the row (gates x U units
// backward, U units forward) in own ([B][per_block], at the same address in each block).
// Entry k of the row is gate k / H, unit k % H, which is block (k % H) / U's.
template <typename T>
__device__ __forceinline__ void stage_from_cluster(const T* own, int64_t b0, int nb, int rows, int W, int stride,
                                                   int H, int U, int per_block, T* dst) {
  const int n = rows * W;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int bb = i / W, k = i % W, g = k / H, j = k % H;
    T v = from_math<T>(math_t<T>(0));
    if (bb < nb) v = BIRNN_MAP_SHARED(own, unsigned(j / U))[(b0 + bb) * per_block + g * U + j % U];
    dst[bb * stride + k] = v;
  }
}

// The forward sweep. Cluster = false: the grid sweep, h passed between the steps through
// global memory (hs), the grid barrier between them (or none where a block holds a
// direction). Cluster = true (sm_90): a thread-block cluster per direction; each block
// keeps its units' h of the last two steps in its shared memory (own, [2][B][U]), where
// the others read it, and the cluster barrier ends each step, the last one included: no
// block may leave while another still reads its shared memory. Mma: the step's products
// on the tensor cores (mma_products), else on the CUDA cores (tile_products).
template <typename T, bool Training, bool Cluster, bool Mma>
__global__ void sweep_fwd_kernel(const SweepFwd<T> p) {
  using A = math_t<T>;
  const SweepPlan& pl = p.plan;
  // Shared-memory indices fit in int; global offsets stay int64_t.
  const int H = int(p.H), U = int(pl.units), R = int(pl.rows), L = int(pl.lanes), stride = int(pl.stride);
  const int64_t G = 4 * p.H, B = p.B, D = p.D;
  const int per_dir = (H + U - 1) / U;
  const int64_t d = blockIdx.x / per_dir;
  const int j0 = (blockIdx.x % per_dir) * U;  // the block's rank in its cluster, times U
  const int nu = H - j0 < U ? H - j0 : U;     // this block's units: fewer in a direction's last block
  const int tid = threadIdx.x, nt = blockDim.x;
  BIRNN_DYNAMIC_SHARED(unsigned char, smem);
  T* w_s = reinterpret_cast<T*>(smem);                    // [R][stride]: row g*U + u is W_hh row g*H + j0 + u
  T* h_s = reinterpret_cast<T*>(smem + pl.tile_offset);  // [tile_rows][stride]: h of the tile's rows
  A* part = reinterpret_cast<A*>(smem + pl.part_offset);  // [batch_tile * R][L] partial dot products
  T* own = reinterpret_cast<T*>(smem + pl.own_offset);   // Cluster: [2][B][U]
  // Zeros past the rows of the block's units and past the row's end: the products read
  // whole mma tiles (the staged tile's first H columns are written each step, the rest
  // stays zeros).
  const T zero = from_math<T>(A(0));
  for (int i = tid; i < R * stride; i += nt) {
    const int r = i / stride, k = i % stride, g = r / U, u = r % U;
    w_s[i] = r < 4 * U && u < nu && k < H ? p.w_hh[d][(g * H + j0 + u) * H + k] : zero;
  }
  for (int i = tid; i < int(pl.tile_rows) * (stride - H); i += nt) h_s[i / (stride - H) * stride + H + i % (stride - H)] = zero;
  for (int64_t s = p.s_begin; s < p.s_end; ++s) {
    const T* h_cur = s == 0 ? p.h0 + d * B * H : p.h + ((s & 1) * D + d) * B * H;
    T* h_next = s == p.T_ - 1 ? p.h_n + d * B * H : p.h + (((s + 1) & 1) * D + d) * B * H;
    T* own_next = own + ((s + 1) & 1) * B * U;
    for (int64_t b0 = 0; b0 < B; b0 += pl.batch_tile) {
      const int nb = int(B - b0 < pl.batch_tile ? B - b0 : pl.batch_tile), staged = staged_rows<Mma>(nb);
      if (Cluster && s > 0) {
        stage_from_cluster(own + (s & 1) * B * U, b0, nb, staged, H, stride, H, U, U, h_s);
      } else {
        stage_tile(h_cur + b0 * H, nb, staged, H, stride, h_s);
      }
      __syncthreads();
      if constexpr (Mma) {
        mma_products(w_s, h_s, R, stride, int(pl.kdim), L, nb, part);
      } else {
        tile_products(w_s, h_s, R, H, stride, L, nb, staged / 4, part);
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
        T h_new = h_old;  // padding: zero output, state carried unchanged
        if (s >= len) {
          y[j] = from_math<T>(A(0));
        } else {
          A sums[4], bias[4] = {};
          for (int g = 0; g < 4; ++g) sums[g] = lane_sum(part + (bb * R + g * U + u) * L, L);
          // b_ih + b_hh rounded to the storage type, as a sum of the two tensors would be.
          if (p.b_ih[d])
            for (int g = 0; g < 4; ++g)
              bias[g] = to_math(from_math<T>(to_math(p.b_ih[d][g * H + j]) + to_math(p.b_hh[d][g * H + j])));
          h_new = from_math<T>(
              cell_forward<T, Training>(p.xg + row * D * G + d * G, sums, bias, p.c[state * H + j], H, j));
          y[j] = h_new;
        }
        if (Cluster) {
          own_next[b * U + u] = h_new;
          if (s == p.T_ - 1) h_next[b * H + j] = h_new;
        } else {
          h_next[b * H + j] = h_new;
        }
      }
      __syncthreads();  // the next tile overwrites h_s and part
    }
    if (Cluster) {
#if !defined(BIRNN_BREAK_CLUSTER_BARRIER)
      BIRNN_CLUSTER_SYNC();
#endif
    } else if (s + 1 < p.s_end) {
      step_barrier(per_dir);
    }
  }
}

// The backward sweep. The block's shared W_hh columns make dh = dg_{t+1} W_hh at its units
// from the whole dg row of the step before; the cell backward of its units then needs
// nothing from other blocks (dh and dc of its units are its own), and its dg goes out for
// the others' next phase: through global memory (dg_step) with the grid barrier, or with
// Cluster (sm_90) through its shared memory (own, [2][B][4 U]: its units' dg, gate by
// gate) with the cluster barrier, as in the forward sweep. Steps no gradient has reached
// are not skipped, as the CPU sweep skips them: both directions share the step barrier,
// so a direction whose dg is still zero (the reverse one under a loss on the last output
// only) would wait for the other direction anyway, and the zero products and cells cost
// no extra step time.
template <typename T, bool Cluster, bool Mma>
__global__ void sweep_bwd_kernel(const SweepBwd<T> p) {
  using A = math_t<T>;
  const SweepPlan& pl = p.plan;
  const int H = int(p.H), U = int(pl.units), R = int(pl.rows), W = 4 * H, L = int(pl.lanes);
  const int stride = int(pl.stride);
  const int64_t G = 4 * p.H, B = p.B, D = p.D;
  const int per_dir = (H + U - 1) / U;
  const int64_t d = blockIdx.x / per_dir;
  const int j0 = (blockIdx.x % per_dir) * U;
  const int nu = H - j0 < U ? H - j0 : U;
  const int tid = threadIdx.x, nt = blockDim.x;
  BIRNN_DYNAMIC_SHARED(unsigned char, smem);
  T* w_s = reinterpret_cast<T*>(smem);                    // [R][stride]: row u is W_hh column j0 + u (zeros past nu)
  T* g_s = reinterpret_cast<T*>(smem + pl.tile_offset);  // [tile_rows][stride]: dg of the tile's rows, last phase
  A* part = reinterpret_cast<A*>(smem + pl.part_offset);  // [batch_tile * R][L] partial dot products
  T* own = reinterpret_cast<T*>(smem + pl.own_offset);   // Cluster: [2][B][4 U]
  // k-major, so that neighbouring threads read neighbouring columns of a W_hh row; zeros
  // past the block's units and past the row's end, as in the forward sweep.
  const T zero = from_math<T>(A(0));
  for (int i = tid; i < R * stride; i += nt) {
    const int k = i / R, u = i % R;
    w_s[u * stride + k] = u < nu && k < W ? p.w_hh[d][k * H + j0 + u] : zero;
  }
  for (int i = tid; i < int(pl.tile_rows) * (stride - W); i += nt) g_s[i / (stride - W) * stride + W + i % (stride - W)] = zero;
  for (int64_t q = p.q_begin; q < p.q_end; ++q) {
    const int64_t s = p.T_ - 1 - q;  // the sweep step; -1 in the last phase, which only makes dh0
    const T* dg_last = p.dg_step + ((q & 1) * D + d) * B * G;
    T* dg_next = p.dg_step + (((q + 1) & 1) * D + d) * B * G;
    T* own_next = own + ((q + 1) & 1) * B * 4 * U;
    for (int64_t b0 = 0; b0 < B; b0 += pl.batch_tile) {
      const int nb = int(B - b0 < pl.batch_tile ? B - b0 : pl.batch_tile), staged = staged_rows<Mma>(nb);
      if (q > 0) {  // the first phase has no dg before it
        if (Cluster) {
          stage_from_cluster(own + (q & 1) * B * 4 * U, b0, nb, staged, W, stride, H, U, 4 * U, g_s);
        } else {
          stage_tile(dg_last + b0 * G, nb, staged, W, stride, g_s);
        }
        __syncthreads();
        if constexpr (Mma) {
          mma_products(w_s, g_s, R, stride, int(pl.kdim), L, nb, part);
        } else {
          tile_products(w_s, g_s, R, W, stride, L, nb, staged / 4, part);
        }
#if !defined(BIRNN_BREAK_SWEEP_BWD_BARRIER)
        __syncthreads();
#endif
      }
      for (int t = tid; t < nb * nu; t += nt) {
        const int bb = t / nu, u = t % nu, j = j0 + u;
        const int64_t b = b0 + bb, state = d * B + b;
        // The gradient carried to h_t: from h_n or the steps after, through padding unchanged.
        A carry = p.dh[state * H + j];
        if (q > 0) carry += lane_sum(part + (bb * R + u) * L, L);
        if (s < 0) {
          p.dh[state * H + j] = carry;
          continue;
        }
        const int64_t len = p.len ? p.len[b] : p.T_;
        const int64_t row = step_time(d, s, len) * B + b;
        T* dg = p.dg + (d * p.T_ * B + row) * G;
        A grads[4] = {};
        if (s >= len) {  // padding: no gradient through it, the carries pass unchanged
          p.dh[state * H + j] = carry;
        } else {
          const T* gt = p.gates + row * D * G + d * G;
          const Gates<A> a{to_math(gt[j]), to_math(gt[H + j]), to_math(gt[2 * H + j]), to_math(gt[3 * H + j])};
          const A dh = carry + (p.dy ? to_math(p.dy[row * D * H + d * H + j]) : A(0));
          const GateGrads<A> r = backward(a, p.c_prev[row * D * H + d * H + j], dh, p.dc[state * H + j]);
          grads[0] = r.di, grads[1] = r.df, grads[2] = r.dg, grads[3] = r.do_;
          p.dc[state * H + j] = r.dc_prev;
          p.dh[state * H + j] = A(0);  // the next phase adds dg W_hh to it
        }
        for (int g = 0; g < 4; ++g) {
          const T v = from_math<T>(grads[g]);
          dg[g * H + j] = v;
          if (Cluster) {
            own_next[b * 4 * U + g * U + u] = v;
          } else {
            dg_next[b * G + g * H + j] = v;
          }
        }
      }
      __syncthreads();  // the next tile overwrites g_s and part
    }
    if (Cluster) {
#if !defined(BIRNN_BREAK_CLUSTER_BWD_BARRIER)
      BIRNN_CLUSTER_SYNC();
#endif
    } else if (q + 1 < p.q_end) {
      step_barrier(per_dir);
    }
  }
}

// The kernel that runs a plan: tensor-core products where the plan has them (not in
// float64, which has no mma of its own), the forward's variant that saves what the
// backward needs where training. nullptr for a plan no kernel runs.
template <typename T>
constexpr bool kHasMma = !std::is_same_v<T, double>;

template <typename T, bool Cluster>
auto fwd_kernel(const SweepPlan& plan, bool training) -> void (*)(SweepFwd<T>) {
  if constexpr (kHasMma<T>) {
    if (plan.mma_k == mma::Traits<mma::KindOf<T>::value>::kK)
      return training ? sweep_fwd_kernel<T, true, Cluster, true> : sweep_fwd_kernel<T, false, Cluster, true>;
  }
  if (plan.mma_k) return nullptr;
  return training ? sweep_fwd_kernel<T, true, Cluster, false> : sweep_fwd_kernel<T, false, Cluster, false>;
}

template <typename T, bool Cluster>
auto bwd_kernel(const SweepPlan& plan) -> void (*)(SweepBwd<T>) {
  if constexpr (kHasMma<T>) {
    if (plan.mma_k == mma::Traits<mma::KindOf<T>::value>::kK) return sweep_bwd_kernel<T, Cluster, true>;
  }
  if (plan.mma_k) return nullptr;
  return sweep_bwd_kernel<T, Cluster, false>;
}

// Launches the plan's blocks of kSweepThreads: all at once with a grid barrier available
// (cooperative, GPU only), or as a plain launch: of one step, or of any number where
// each direction is one block (its step barrier is the block's own).
template <typename P>
cudaError_t launch_sweep(void (*kernel)(P), const P& p, int64_t steps, bool cooperative, cudaStream_t stream) {
  if (!kernel) return cudaErrorNotSupported;
  const int64_t blocks = p.D * ((p.H + p.plan.units - 1) / p.plan.units);
  const size_t shared_bytes = size_t(p.plan.shared_bytes);
#if !defined(BIRNN_EMU)
  if (cooperative) {
    void* args[] = {const_cast<P*>(&p)};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(blocks)),
                                       dim3(unsigned(kSweepThreads)), args, shared_bytes, stream);
  }
#else
  if (cooperative) return cudaErrorNotSupported;
#endif
  if (steps != 1 && blocks != p.D) return cudaErrorNotSupported;  // the steps need the grid barrier
  BIRNN_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(unsigned(kSweepThreads)), shared_bytes, stream, p);
  return BIRNN_LAUNCH_ERROR();
}

#if !defined(BIRNN_EMU)
template <typename P>
bool fits(void (*kernel)(P), const SweepPlan& plan, int multiprocessors) {
  if (!kernel) return false;
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
#endif

}  // namespace

template <typename T>
cudaError_t launch_sweep_fwd(const SweepFwd<T>& p, bool cooperative, cudaStream_t stream) {
  if (p.B == 0 || p.s_begin >= p.s_end) return cudaSuccess;
  return launch_sweep(fwd_kernel<T, false>(p.plan, p.c_prev != nullptr), p, p.s_end - p.s_begin, cooperative, stream);
}

template <typename T>
cudaError_t launch_sweep_bwd(const SweepBwd<T>& p, bool cooperative, cudaStream_t stream) {
  if (p.B == 0 || p.q_begin >= p.q_end) return cudaSuccess;
  return launch_sweep(bwd_kernel<T, false>(p.plan), p, p.q_end - p.q_begin, cooperative, stream);
}

namespace {

// A cluster of ceil(H / units) blocks per direction along x, a direction each.
template <typename P>
cudaError_t launch_clusters(void (*kernel)(P), const P& p, cudaStream_t stream) {
  if (!kernel) return cudaErrorNotSupported;
  const int64_t per_dir = (p.H + p.plan.units - 1) / p.plan.units;
  const size_t shared_bytes = size_t(p.plan.shared_bytes);
#if !defined(BIRNN_EMU)
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(p.D * per_dir));
  cfg.blockDim = dim3(unsigned(kSweepThreads));
  cfg.dynamicSmemBytes = shared_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(per_dir);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
#else
  BIRNN_LAUNCH_CLUSTER(kernel, dim3(unsigned(p.D * per_dir)), dim3(unsigned(kSweepThreads)), unsigned(per_dir),
                       shared_bytes, stream, p);
  return BIRNN_LAUNCH_ERROR();
#endif
}

#if !defined(BIRNN_EMU)
// Whether the device runs a cluster of the plan (its size allowed; the directions'
// clusters do not wait for each other, so one at a time will do).
template <typename P>
bool cluster_fits(void (*kernel)(P), const SweepPlan& plan, int64_t D) {
  if (!kernel) return false;
  const int64_t per_dir = plan.blocks / D;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)) !=
          cudaSuccess ||
      (per_dir > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    (void)cudaGetLastError();
    return false;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(plan.blocks));
  cfg.blockDim = dim3(unsigned(kSweepThreads));
  cfg.dynamicSmemBytes = size_t(plan.shared_bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(per_dir);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return clusters >= 1;
}
#endif

}  // namespace

template <typename T>
cudaError_t launch_sweep_fwd_cluster(const SweepFwd<T>& p, cudaStream_t stream) {
  if (p.B == 0 || p.s_begin >= p.s_end) return cudaSuccess;
  return launch_clusters(fwd_kernel<T, true>(p.plan, p.c_prev != nullptr), p, stream);
}

template <typename T>
cudaError_t launch_sweep_bwd_cluster(const SweepBwd<T>& p, cudaStream_t stream) {
  if (p.B == 0 || p.q_begin >= p.q_end) return cudaSuccess;
  return launch_clusters(bwd_kernel<T, true>(p.plan), p, stream);
}

#if !defined(BIRNN_EMU)
template <typename T>
bool sweep_fwd_cluster_fits(const SweepPlan& plan, bool training, int64_t D) {
  return cluster_fits(fwd_kernel<T, true>(plan, training), plan, D);
}

template <typename T>
bool sweep_bwd_cluster_fits(const SweepPlan& plan, int64_t D) {
  return cluster_fits(bwd_kernel<T, true>(plan), plan, D);
}

template <typename T>
bool sweep_fwd_fits(const SweepPlan& plan, bool training, int multiprocessors) {
  return fits(fwd_kernel<T, false>(plan, training), plan, multiprocessors);
}
template <typename T>
bool sweep_bwd_fits(const SweepPlan& plan, int multiprocessors) {
  return fits(bwd_kernel<T, false>(plan), plan, multiprocessors);
}
#define BIRNN_INSTANTIATE_FITS(T)                                             \
  template bool sweep_fwd_fits<T>(const SweepPlan&, bool, int);           \
  template bool sweep_bwd_fits<T>(const SweepPlan&, int);                 \
  template bool sweep_fwd_cluster_fits<T>(const SweepPlan&, bool, int64_t); \
  template bool sweep_bwd_cluster_fits<T>(const SweepPlan&, int64_t);
#else
#define BIRNN_INSTANTIATE_FITS(T)
#endif

#define BIRNN_INSTANTIATE(T)                                                          \
  template cudaError_t launch_sweep_fwd<T>(const SweepFwd<T>&, bool, cudaStream_t); \
  template cudaError_t launch_sweep_bwd<T>(const SweepBwd<T>&, bool, cudaStream_t); \
  template cudaError_t launch_sweep_fwd_cluster<T>(const SweepFwd<T>&, cudaStream_t); \
  template cudaError_t launch_sweep_bwd_cluster<T>(const SweepBwd<T>&, cudaStream_t); \
  BIRNN_INSTANTIATE_FITS(T)
BIRNN_INSTANTIATE(float)
BIRNN_INSTANTIATE(double)
BIRNN_INSTANTIATE(__half)
BIRNN_INSTANTIATE(__nv_bfloat16)
#undef BIRNN_INSTANTIATE

}  // namespace birnn::cuda
