// Device helpers of the CUDA kernel files (lstm_kernels.cu, sweep_fwd.cu, sweep_bwd.cu): the
// launch macros that let one source serve nvcc and the host emulator, the storage <->
// math conversions, the step -> time map and one element's forward cell. Torch-free.
#pragma once

#include "../lstm_cell.h"
#include "lstm_kernels.h"

#if !defined(BIRNN_EMU)
#define BIRNN_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define BIRNN_DYNAMIC_SHARED(type, name)                       \
  extern __shared__ __align__(16) unsigned char birnn_smem_[]; \
  type* name = reinterpret_cast<type*>(birnn_smem_)
#define BIRNN_LAUNCH_ERROR() cudaGetLastError()
#include <cooperative_groups.h>
#define BIRNN_GRID_SYNC() cooperative_groups::this_grid().sync()
#else
#define BIRNN_GRID_SYNC() ::birnn_emu::grid_sync()
#endif

// Thread-block clusters and distributed shared memory (sm_90 and later): the cluster
// barrier, a block's rank in its cluster, and the address of another block's copy of a
// shared-memory variable. Compiled for an older GPU they are unreachable (the host
// launches cluster kernels only on sm_90 and later) and trap.
#if defined(BIRNN_EMU)
#define BIRNN_HAVE_CLUSTERS 1
#define BIRNN_CLUSTER_SYNC() ::birnn_emu::cluster_sync()
#define BIRNN_CLUSTER_RANK() ::birnn_emu::cluster_block_rank()
#define BIRNN_MAP_SHARED(ptr, rank) ::birnn_emu::map_shared_rank(ptr, rank)
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define BIRNN_HAVE_CLUSTERS 1
#define BIRNN_CLUSTER_SYNC() cooperative_groups::this_cluster().sync()
#define BIRNN_CLUSTER_RANK() cooperative_groups::this_cluster().block_rank()
#define BIRNN_MAP_SHARED(ptr, rank) cooperative_groups::this_cluster().map_shared_rank(ptr, rank)
#else
#define BIRNN_HAVE_CLUSTERS 0
#define BIRNN_CLUSTER_SYNC() __trap()
#define BIRNN_CLUSTER_RANK() (__trap(), 0u)
#define BIRNN_MAP_SHARED(ptr, rank) ((void)(rank), __trap(), (ptr))
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

// One element's forward step from its x W_ih^T (x, per gate), recurrent sums and bias
// (b_ih + b_hh of its unit, per gate; zeros without a bias): the cell state c updated in
// place; the activated gates written to `gates` (the row and direction's part of xg) when
// training. Returns the new h.
template <typename T, bool Training>
__host__ __device__ __forceinline__ math_t<T> cell_forward(const math_t<T> (&x)[4], const math_t<T> (&rec)[4],
                                                           const math_t<T> (&bias)[4], math_t<T>& c, T* gates,
                                                           int64_t H, int64_t j) {
  using A = math_t<T>;
  A pre[4];
  for (int k = 0; k < 4; ++k) pre[k] = x[k] + rec[k] + bias[k];
  const Gates<A> a = activate(pre[0], pre[1], pre[2], pre[3]);
  c = cell_state(a, c);
  if (Training) {
    gates[j] = from_math<T>(a.i);
    gates[H + j] = from_math<T>(a.f);
    gates[2 * H + j] = from_math<T>(a.g);
    gates[3 * H + j] = from_math<T>(a.o);
  }
  return hidden_state(a, c);
}

// The same, reading x W_ih^T from xg (this row and direction), which the activated gates
// then overwrite when training.
template <typename T, bool Training>
__host__ __device__ __forceinline__ math_t<T> cell_forward(T* xg, const math_t<T> (&rec)[4],
                                                           const math_t<T> (&bias)[4], math_t<T>& c, int64_t H,
                                                           int64_t j) {
  math_t<T> x[4];
  for (int k = 0; k < 4; ++k) x[k] = to_math(xg[k * H + j]);
  return cell_forward<T, Training>(x, rec, bias, c, xg, H, j);
}

// 16 bytes of storage type T, loaded at once (one LDS.128 from shared memory).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kEntries = int(vec_entries(sizeof(T)));
  T v[kEntries];
};

// The 16 bytes at p, which must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
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

// The same for 16 bytes at p (16-byte aligned): one load where load_coherent makes 16 /
// sizeof(T).
template <typename T>
__device__ __forceinline__ Vec16<T> load_coherent_vec16(const T* p) {
#if defined(BIRNN_EMU)
  return load_vec16(p);
#else
  const int4 bits = __ldcg(reinterpret_cast<const int4*>(p));
  Vec16<T> v;
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

}  // namespace
}  // namespace birnn::cuda
