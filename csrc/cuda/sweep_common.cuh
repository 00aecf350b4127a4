// What the persistent sweeps (sweep_fwd.cu, sweep_bwd.cu) share: staging a tile of the
// row the others wrote, the step products on the CUDA cores or the tensor cores, the step
// barrier, and the launches (grid, cooperative, cluster) with their fit tests.
// sweep_kernels.h says how the work is cut. Torch-free, launched through BIRNN_LAUNCH like
// lstm_kernels.cu, so the host emulator runs the same device code.
#pragma once

#include <type_traits>

#include "kernel_common.cuh"
#include "mma.cuh"
#include "sweep_kernels.h"

namespace birnn::cuda::sweep {

// Where a block of a sweep works (sweep_kernels.h): direction d, the hidden units [j0, j0 +
// nu), its rank in the blocks of its direction and group (its cluster) j0 / units, and its
// group's batch rows [b_begin, b_end).
struct BlockPlace {
  int64_t d, b_begin, b_end;
  int per_dir, j0, nu;
};

__device__ __forceinline__ BlockPlace block_place(const SweepPlan& pl, int64_t H, int64_t B) {
  BlockPlace w;
  const int U = int(pl.units);
  w.per_dir = int((H + U - 1) / U);
  const int64_t pair = blockIdx.x / w.per_dir;  // (direction, group), group fastest
  w.d = pair / pl.groups;
#if defined(BIRNN_BREAK_GROUP_ROWS)
  w.b_begin = 0;  // Deliberately wrong: every group works on the first group's rows.
#else
  w.b_begin = pair % pl.groups * pl.group_rows;
#endif
  w.b_end = B - w.b_begin < pl.group_rows ? B : w.b_begin + pl.group_rows;
  w.j0 = int(blockIdx.x % w.per_dir) * U;
  w.nu = int(H) - w.j0 < U ? int(H) - w.j0 : U;  // fewer in a direction's last block
  return w;
}

// The staging loop of stage_tile and stage_from_cluster: entries [0, n) of a tile of rows
// W long into the first W columns of dst ([rows][stride] in shared memory), `step`
// entries at a time (1, or the V of one 16-byte read, W then a multiple of it), those
// from `have` on zeros, the others from read(i) (a Vec16 whose first `step` entries are
// entries i, i + 1, ...). Each read takes about a trip to L2 (global memory, or another
// block's shared memory): eight in flight per thread before their stores, not one at a
// time.
template <typename T, typename Read>
__device__ __forceinline__ void stage_entries(int n, int have, int W, int stride, int step, T* dst, Read read) {
  constexpr int V = Vec16<T>::kEntries;
  const T zero = from_math<T>(math_t<T>(0));
  for (int i0 = int(threadIdx.x) * step; i0 < n; i0 += 8 * int(blockDim.x) * step) {
    Vec16<T> v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int i = i0 + q * int(blockDim.x) * step;
      if (i < have) {
        v[q] = read(i);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[q].v[e] = zero;
      }
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int i = i0 + q * int(blockDim.x) * step;
      if (i < n) {
        T* out = dst + (i / W) * stride + i % W;
        for (int e = 0; e < step; ++e) out[e] = v[q].v[e];
      }
    }
  }
}

// Copies rows [b0, b0 + nb) of a [B][W] matrix that other blocks wrote before the last
// barrier into the first W columns of dst ([rows][stride] in shared memory), rows past nb
// as zeros, so that the products can take batch rows four (eight) at a time. The rows are
// contiguous in src: 16 bytes a read where src is 16-byte aligned and W a whole number of
// them (each read then within one row), else an entry a read.
template <typename T>
__device__ __forceinline__ void stage_tile(const T* src, int nb, int rows, int W, int stride, T* dst) {
  constexpr int V = Vec16<T>::kEntries;
  const bool whole = reinterpret_cast<uintptr_t>(src) % 16 == 0 && W % V == 0;
  stage_entries(rows * W, nb * W, W, stride, whole ? V : 1, dst, [&](int i) {
    Vec16<T> v;
    if (whole) {
      v = load_coherent_vec16(src + i);
    } else {
      v.v[0] = load_coherent(src + i);
    }
    return v;
  });
}

// Where the step products' partial sums lie in shared memory (the plan's part_stride and
// part_batch_stride): lane l of weight row r and batch row bb at bb batch + r row + l.
struct PartLayout {
  int row, batch;
};

__device__ __forceinline__ PartLayout part_layout(const SweepPlan& pl) {
  return {int(pl.part_stride), int(pl.part_batch_stride)};
}

// part[bb, r, l] (PartLayout pt) = lane l's share of sum_k w[r][k] tile[bb][k], k = l,
// l + L, ... for the tile's nb rows and the block's R weight rows (w: [R][stride], tile:
// [4 * quads][stride], both in shared memory) on the CUDA cores. Each thread takes 4 x 2
// of them at a time: tile rows 4 bq .. 4 bq + 3 against weight rows rp and rp + R/2 (item
// order: rp fastest).
template <typename T>
__device__ __forceinline__ void tile_products(const T* w, const T* tile, int R, int W, int stride, int L, int nb,
                                              int quads, PartLayout pt, math_t<T>* part) {
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
        part[bb * pt.batch + rp * pt.row + l] = acc[q][0];
        part[bb * pt.batch + (rp + half) * pt.row + l] = acc[q][1];
      }
    }
  }
}

// The same products on the tensor cores (sm_80 and later): part[bb, r, l] =
// slice l's share of sum_k w[r][k] tile[bb][k], slice l the columns [l kdim / L,
// (l + 1) kdim / L), for the tile's nb rows and the block's R weight rows (a multiple of
// 16; the tile's rows staged to a multiple of 8, the columns up to kdim zeros past the
// row's end). A warp's work item: 16 weight rows (mma's A, row-major) x 8 batch rows
// (B's columns) over one slice, accumulated in float.
//
// With the plan's registers, the warp's weight fragments come from `a` (weight_fragments,
// loaded once per sweep) instead of shared memory: all its items share one tile and slice.
template <typename T>
__device__ __forceinline__ void mma_products(const T* w, const T* tile, int R, int stride, int kdim, int L, int nb,
                                             const uint32_t (&a)[kRegSteps][4], bool registers, PartLayout pt,
                                             float* part) {
  constexpr mma::Kind K = mma::KindOf<T>::value;
  constexpr int kK = mma::Traits<K>::kK;
  const int warp = int(threadIdx.x / 32), warps = int(blockDim.x / 32);
  const int row_tiles = R / 16, octs = (nb + 7) / 8, slice = kdim / L;
  for (int item = warp; item < row_tiles * L * octs; item += warps) {  // the same for the whole warp
    const int rt = item % row_tiles, l = item / row_tiles % L, oc = item / (row_tiles * L);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const T* b_cols = tile + oc * 8 * stride + l * slice;
    if (registers) {
#pragma unroll
      for (int k = 0; k < kRegSteps; ++k) {
        if (k * kK < slice) {
          uint32_t fb[2];
          mma::load_b_cols<K>(fb, b_cols + k * kK, stride);
          mma::mma_sync<K>(acc, a[k], fb, acc);
        }
      }
    } else {
      mma::warp_tile_product<K>(acc, w + rt * 16 * stride + l * slice, stride, b_cols, stride, slice);
    }
    mma::store_c(acc, part + oc * 8 * pt.batch + rt * 16 * pt.row + l, pt.row, pt.batch, nb - 8 * oc);
  }
}

// The weight fragments of the warp's one (tile, slice) pair (mma_products' `a`), from the
// block's weight rows in shared memory, once per sweep. Registers: every index is fixed
// at compile time.
template <typename T>
__device__ __forceinline__ void weight_fragments(const T* w, int R, int stride, int kdim, int L,
                                                 uint32_t (&a)[kRegSteps][4]) {
  constexpr mma::Kind K = mma::KindOf<T>::value;
  constexpr int kK = mma::Traits<K>::kK;
  const int pair = int(threadIdx.x / 32) % (R / 16 * L), rt = pair % (R / 16), l = pair / (R / 16);
  const int slice = kdim / L;
#pragma unroll
  for (int k = 0; k < kRegSteps; ++k) {
    if (k * kK < slice) mma::load_a<K>(a[k], w + rt * 16 * stride + l * slice + k * kK, stride);
  }
}

// The SIMT products with the weights in registers (the plan's registers, slice and
// batch_lanes; the weights in `wr`, register_weights): thread t holds rows r = t % P and
// r + P (P = R / 2 pairs) over slice l of the row, the columns [l slice, (l + 1) slice),
// l = t / (P F), and runs the staged batch rows f, f + F, f + 2F, ... of the tile against
// them, 4 at a time (f = t / P % F, F batch lanes), reading the tile 16 bytes at a time:
// the lanes of one row and slice read the same address, and the batch lanes of a warp
// neighbouring rows, on different banks (the plan's stride). No lane waits on another:
// each writes its own partial sums, part[bb, r, l] (the plan's lanes: its slices).
// Threads past the slices idle.
template <typename T>
struct SimtRegisters {
  static constexpr int kSlice = int(simt_max_slice(sizeof(math_t<T>)));
  math_t<T> w[2][kSlice];
};

template <typename T>
__device__ __forceinline__ void register_products(const SweepPlan& pl, const T* tile, int nb, int staged,
                                                  const SimtRegisters<T>& wr, math_t<T>* part) {
  using A = math_t<T>;
  constexpr int V = Vec16<T>::kEntries, kSlice = SimtRegisters<T>::kSlice;
  const int R = int(pl.rows), P = R / 2, F = int(pl.batch_lanes), L = int(pl.lanes), stride = int(pl.stride);
  const int slice = int(pl.slice), t = int(threadIdx.x), r = t % P, f = t / P % F, l = t / (P * F);
  const PartLayout pt = part_layout(pl);
  if (l >= L) return;
#if defined(BIRNN_BREAK_REGISTER_SLICE)
  const T* cols = tile + (l + 1) % L * slice;  // Deliberately wrong: the next slice's columns.
#else
  const T* cols = tile + l * slice;
#endif
  for (int b = f; b < staged; b += 4 * F) {  // rows b + q F, q = 0..3
    // A row past the staged ones reads row b again, unused: no branch between the loads,
    // so that the four are in flight together.
    const T* row[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) row[q] = cols + (b + q * F < staged ? b + q * F : b) * stride;
    A acc[4][2] = {};
#pragma unroll
    for (int v = 0; v < kSlice / V; ++v) {
      if (v * V < slice) {  // the same for the whole block
        Vec16<T> h[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) h[q] = load_vec16(row[q] + v * V);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const A x = to_math(h[q].v[e]);
            acc[q][0] += wr.w[0][v * V + e] * x;
            acc[q][1] += wr.w[1][v * V + e] * x;
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int bb = b + q * F;
      if (bb < nb) {
        part[bb * pt.batch + r * pt.row + l] = acc[q][0];
        part[bb * pt.batch + (r + P) * pt.row + l] = acc[q][1];
      }
    }
  }
}

// The thread's weights of register_products from the block's weight rows w ([R][stride],
// zeros past the row's end), once per sweep: zeros where it has no slice and past the
// slice.
template <typename T>
__device__ __forceinline__ void register_weights(const SweepPlan& pl, const T* w, SimtRegisters<T>& wr) {
  const int P = int(pl.rows) / 2, stride = int(pl.stride), slice = int(pl.slice);
  const int t = int(threadIdx.x), r = t % P, l = t / (P * int(pl.batch_lanes));
  const bool has_slice = l < int(pl.lanes);
#pragma unroll
  for (int k = 0; k < SimtRegisters<T>::kSlice; ++k) {
    const bool in = has_slice && k < slice;
    wr.w[0][k] = in ? to_math(w[r * stride + l * slice + k]) : math_t<T>(0);
    wr.w[1][k] = in ? to_math(w[(r + P) * stride + l * slice + k]) : math_t<T>(0);
  }
}

// The weights a thread keeps in registers where the plan says so: the mma fragments of
// its warp, or its SIMT rows.
template <typename T, bool Mma>
struct WeightRegisters {
  uint32_t a[kRegSteps][4];
};
template <typename T>
struct WeightRegisters<T, false> {
  SimtRegisters<T> simt;
};

// What the products need before the first step: zeros in the staged tile's columns past
// the row's end (`width`; staging writes only the first `width` of each row, the tensor
// cores and the SIMT register slices read up to kdim), and where the plan keeps the
// weights in registers, the thread's share of them from the block's weight rows `w`
// (written before the call by all the block's threads).
template <bool Mma, typename T>
__device__ __forceinline__ void prepare_products(const SweepPlan& pl, const T* w, int width, T* tile,
                                                 WeightRegisters<T, Mma>& regs) {
  const int stride = int(pl.stride), pad = stride - width;
  for (int i = int(threadIdx.x); i < int(pl.tile_rows) * pad; i += int(blockDim.x))
    tile[i / pad * stride + width + i % pad] = from_math<T>(math_t<T>(0));
  if (pl.registers) {
    __syncthreads();  // the weight rows are in place
    if constexpr (Mma) {
      weight_fragments(w, int(pl.rows), stride, int(pl.kdim), int(pl.lanes), regs.a);
    } else {
      register_weights(pl, w, regs.simt);
    }
  }
}

// One step's products of the staged tile (nb batch rows, `staged` of them staged) against
// the block's weight rows (in shared memory `w`, or in registers where the plan says so),
// into part: on the tensor cores (Mma) or the CUDA cores.
template <bool Mma, typename T>
__device__ __forceinline__ void step_products(const SweepPlan& pl, const T* w, const T* tile, int width, int nb,
                                              int staged, const WeightRegisters<T, Mma>& regs, math_t<T>* part) {
  if constexpr (Mma) {
    mma_products(w, tile, int(pl.rows), int(pl.stride), int(pl.kdim), int(pl.lanes), nb, regs.a, pl.registers,
                 part_layout(pl), part);
  } else if (pl.registers) {
    register_products(pl, tile, nb, staged, regs.simt, part);
  } else {
    tile_products(w, tile, int(pl.rows), width, int(pl.stride), int(pl.lanes), nb, staged / 4, part_layout(pl), part);
  }
}

// The barrier between two steps of a sweep. Where a direction is one block (per_dir ==
// 1), it exchanges its h (or dg) with itself alone, and the __syncthreads that ends
// every batch tile already orders the step's global writes before the next step's reads
// (a block barrier makes its threads' global writes visible to the block). Otherwise
// every block of the grid must have written its units first: the grid barrier, which
// needs the cooperative launch.
__device__ __forceinline__ void step_barrier(int per_dir) {
#if defined(BIRNN_BREAK_GRID_BARRIER)
  (void)per_dir;  // deliberately wrong: no barrier between the steps, for the test that the emulator catches it
#else
  if (per_dir > 1) BIRNN_GRID_SYNC();
#endif
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

// Rows [b0, b0 + nb) of the group's part of the row of the step before into the first W
// columns of dst ([rows][stride], rows past nb zeros; b0 counted from the group's first
// row), read from the cluster's blocks (distributed shared memory): each block keeps, for
// every row of its group, its `per_block` entries of the row (gates x U units backward, U
// units forward) in own ([group_rows][per_block], at the same address in each block,
// 16-byte aligned). Entry k of the row is gate k / H, unit k % H, which is block (k % H) /
// U's. 16 bytes a read where U and H are whole 16-byte words (V entries), so that V
// neighbouring entries of the row are neighbours in one block's own; else an entry a read.
template <typename T>
__device__ __forceinline__ void stage_from_cluster(const T* own, int64_t b0, int nb, int rows, int W, int stride,
                                                   int H, int U, int per_block, T* dst) {
  constexpr int V = Vec16<T>::kEntries;
  const bool whole = U % V == 0 && H % V == 0;
  stage_entries(rows * W, nb * W, W, stride, whole ? V : 1, dst, [&](int i) {
    const int bb = i / W, k = i % W, g = k / H, j = k % H;
#if defined(BIRNN_BREAK_DSMEM_RANK)
    // Deliberately wrong: each entry read from the next block of the cluster, not its owner's.
    const unsigned rank = unsigned((j / U + 1) % ((H + U - 1) / U));
#else
    const unsigned rank = unsigned(j / U);
#endif
    const T* at = BIRNN_MAP_SHARED(own, rank) + (b0 + bb) * per_block + g * U + j % U;
    Vec16<T> v;
    if (whole) {
      v = load_vec16(at);
    } else {
      v.v[0] = *at;
    }
    return v;
  });
}

// Whether storage type T has tensor-core products (float64 has no mma of its own).
template <typename T>
constexpr bool kHasMma = !std::is_same_v<T, double>;

// Launches the plan's blocks of kSweepThreads: all at once with a grid barrier available
// (cooperative), or as a plain launch: of one step, or of any number where each direction
// is one block per group (its step barrier is the block's own).
template <typename P>
cudaError_t launch_sweep(void (*kernel)(P), const P& p, int64_t steps, bool cooperative, cudaStream_t stream) {
  if (!kernel) return cudaErrorNotSupported;
  const int64_t blocks = p.plan.blocks, per_dir = sweep_blocks_per_direction(p.plan, p.D);
  const size_t shared_bytes = size_t(p.plan.shared_bytes);
  if (cooperative) {
#if !defined(BIRNN_EMU)
    void* args[] = {const_cast<P*>(&p)};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(blocks)),
                                       dim3(unsigned(kSweepThreads)), args, shared_bytes, stream);
#else
    BIRNN_LAUNCH_COOPERATIVE(kernel, dim3(unsigned(blocks)), dim3(unsigned(kSweepThreads)), shared_bytes, stream, p);
    return BIRNN_LAUNCH_ERROR();
#endif
  }
  if (steps != 1 && per_dir != 1) return cudaErrorNotSupported;  // the steps need the grid barrier
  BIRNN_LAUNCH(kernel, dim3(unsigned(blocks)), dim3(unsigned(kSweepThreads)), shared_bytes, stream, p);
  return BIRNN_LAUNCH_ERROR();
}

#if !defined(BIRNN_EMU)
template <typename P>
bool fits(void (*kernel)(P), const SweepPlan& plan, int multiprocessors) {
  if (!kernel) return false;
  const int shared_bytes = int(plan.shared_bytes);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes) != cudaSuccess) {
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

// The launch configuration of `blocks` blocks of kSweepThreads in clusters of `per_dir`
// along x (the configuration points at its own attribute: not copyable).
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1] = {};
  ClusterLaunch(int64_t blocks, int64_t per_dir, size_t shared_bytes, cudaStream_t stream) {
    cfg.gridDim = dim3(unsigned(blocks));
    cfg.blockDim = dim3(unsigned(kSweepThreads));
    cfg.dynamicSmemBytes = shared_bytes;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(per_dir);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};
#endif

// A cluster of ceil(H / units) blocks along x per direction and group of batch rows.
template <typename P>
cudaError_t launch_clusters(void (*kernel)(P), const P& p, cudaStream_t stream) {
  if (!kernel) return cudaErrorNotSupported;
  const int64_t blocks = p.plan.blocks, per_dir = sweep_blocks_per_direction(p.plan, p.D);
  const size_t shared_bytes = size_t(p.plan.shared_bytes);
#if !defined(BIRNN_EMU)
  const ClusterLaunch launch(blocks, per_dir, shared_bytes, stream);
  return cudaLaunchKernelEx(&launch.cfg, kernel, p);
#else
  BIRNN_LAUNCH_CLUSTER(kernel, dim3(unsigned(blocks)), dim3(unsigned(kSweepThreads)), unsigned(per_dir),
                       shared_bytes, stream, p);
  return BIRNN_LAUNCH_ERROR();
#endif
}

#if !defined(BIRNN_EMU)
// How many of the plan's clusters the device runs at once: 0 where not one (a size it does
// not allow, too much shared memory). The clusters of the directions and groups do not
// wait for each other, so one at a time will do; all at once is what is fastest.
template <typename P>
int64_t max_clusters(void (*kernel)(P), const SweepPlan& plan, int64_t D) {
  if (!kernel) return 0;
  const int64_t per_dir = sweep_blocks_per_direction(plan, D);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes)) !=
          cudaSuccess ||
      (per_dir > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    (void)cudaGetLastError();
    return 0;
  }
  const ClusterLaunch launch(plan.blocks, per_dir, size_t(plan.shared_bytes), nullptr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return clusters;
}
#endif

}  // namespace birnn::cuda::sweep
