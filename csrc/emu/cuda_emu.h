// Host emulation of the SIMT subset the birnn_ext kernels use, so that g++ can compile
// csrc/cuda/*.cu and the tests can run their device code on a machine with no GPU, under
// AddressSanitizer and UndefinedBehaviorSanitizer.
//
// Supported: __global__/__device__/__host__/__forceinline__; threadIdx, blockIdx,
// blockDim, gridDim (dim3, up to 3-D); __syncthreads(); dynamic shared memory through
// BIRNN_DYNAMIC_SHARED; kernel launches through BIRNN_LAUNCH; thread-block clusters along
// x (launch_cluster): the cluster barrier and distributed shared memory (a block reading
// another's shared memory); cooperative launches along x (launch_cooperative) and their
// grid barrier (cooperative_groups::this_grid().sync()); cudaStream_t and cudaError_t.
// The threads of a launch run as fibers, each until it reaches a barrier or returns; the
// clusters of a grid (each block its own cluster without one) run one after another, the
// blocks of a cluster together, and the blocks of a cooperative launch all together. A
// block barrier is released when every thread of the block has reached it, a cluster
// barrier when every thread of the cluster has, the grid barrier when every thread of the
// grid has, which is what they mean on a GPU. A thread that returns while others of its
// block (cluster, grid) wait at a barrier is reported as barrier divergence, and so are
// threads of one block waiting at different barriers, and a grid barrier outside a
// cooperative launch (which a GPU does not release).
// Shared memory starts filled with 0xFF bytes (NaN as float): a read before the write it
// depends on shows up as a wrong answer rather than a lucky zero. The threads of a block
// run in turn from the first, and the blocks that run together from the first, so a read
// of what a later thread (block) writes before the barrier that should separate them reads
// stale data; BIRNN_EMU_ORDER=reverse runs both from the last instead, which exposes the
// reads of what an earlier one writes.
//
// Warp collectives: __shfl_sync, __shfl_xor_sync, __shfl_down_sync and __shfl_up_sync
// over whole warps (the mask must name every lane the warp has), and mma_sync, the
// tensor-core tile products (m16n8k8 on tf32, m16n8k16 on bf16 and f16, float
// accumulators; csrc/cuda/mma.cuh) computed from the fragments of all 32 lanes as the
// PTX ISA lays them out (mma_layout below, the reference the kernels' own fragment
// loaders are tested against). A lane that reaches a collective waits for the rest of its
// warp; lanes of one warp at different collectives, or at a collective and a barrier, or
// a lane that returns while others wait at one, are reported as warp divergence.
//
// Not supported (and not used by the kernels): votes, partial-warp masks, atomics, clusters
// in a cooperative launch, static __shared__ arrays, streams running concurrently.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <driver_types.h>  // cudaError_t, cudaStream_t
#include <vector_types.h>  // dim3

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define BIRNN_EMU_ASAN 1
#endif

namespace birnn_emu {

enum class Wait { kRunning, kBlock, kCluster, kGrid, kWarp, kDone };

constexpr unsigned kWarpSize = 32;
constexpr size_t kLaneSlot = 64;  // bytes a lane contributes to one warp collective, at most

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // left uninitialized: only the pages a thread touches are mapped
  dim3 tid;
  unsigned block = 0;  // index of its block within the blocks that run together
  Wait wait = Wait::kRunning;
  unsigned collectives = 0;  // warp collectives this thread has entered
  void* fake_stack = nullptr;
};

struct State {
  dim3 thread, block, block_dim, grid_dim;
  unsigned cluster_x = 1;                          // blocks per cluster, along x
  bool cooperative = false;                        // a cooperative launch: every block runs together
  std::vector<std::vector<unsigned char>> shared;  // per block of those running together (a cluster, or the grid)
  // Per block of those running together: [warp][2][lane][kLaneSlot], what the lanes put into
  // their warp's collectives; two buffers, so that a lane that moves on to the next
  // collective does not overwrite what slower lanes of its warp still read.
  std::vector<std::vector<unsigned char>> exchange;
  unsigned shared_block = 0;                       // the running thread's block among those
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
};

inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const char* what) {
  State& s = state();
  std::fprintf(stderr, "birnn_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, s.block.x, s.block.y, s.block.z,
               s.thread.x, s.thread.y, s.thread.z);
  std::abort();
}

// Switches from the running fiber back to the scheduler.
inline void yield_to_scheduler(bool dying) {
  State& s = state();
  Fiber* f = s.current;
#ifdef BIRNN_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f->fake_stack, s.scheduler_stack, s.scheduler_stack_size);
#endif
  swapcontext(&f->ctx, &s.scheduler);
#ifdef BIRNN_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &s.scheduler_stack, &s.scheduler_stack_size);
#endif
  (void)dying;
}

inline void fiber_main() {
  State& s = state();
#ifdef BIRNN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack, &s.scheduler_stack_size);
#endif
  (*s.body)();
  s.current->wait = Wait::kDone;
  yield_to_scheduler(true);
  fail("a finished thread was resumed");
}

inline void syncthreads() {
  state().current->wait = Wait::kBlock;
  yield_to_scheduler(false);
}

inline void cluster_sync() {
  if (state().cooperative) fail("cluster barrier in a cooperative launch: not emulated");
  state().current->wait = Wait::kCluster;
  yield_to_scheduler(false);
}

// cooperative_groups::this_grid().sync(): only a cooperative launch has every block of its
// grid resident at once, so that the barrier can be released.
inline void grid_sync() {
  if (!state().cooperative) fail("grid barrier outside a cooperative launch");
  state().current->wait = Wait::kGrid;
  yield_to_scheduler(false);
}

inline unsigned char* dynamic_shared() {
  State& s = state();
  return s.shared[s.shared_block].data();
}

// The cluster's block `rank`'s copy of the running block's shared-memory address p.
template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  State& s = state();
  if (rank >= s.cluster_x) fail("map_shared_rank: no such block in the cluster");
  const auto* base = s.shared[s.shared_block].data();
  const auto offset = reinterpret_cast<const unsigned char*>(p) - base;
  if (offset < 0 || size_t(offset) >= s.shared[s.shared_block].size())
    fail("map_shared_rank: the address is not in this block's shared memory");
  return reinterpret_cast<T*>(s.shared[s.shared_block / s.cluster_x * s.cluster_x + rank].data() + offset);
}

inline unsigned cluster_block_rank() { return state().block.x % state().cluster_x; }

inline unsigned linear_thread() {
  const State& s = state();
  return s.thread.x + s.block_dim.x * (s.thread.y + s.block_dim.y * s.thread.z);
}
inline unsigned lane_id() { return linear_thread() % kWarpSize; }

// The lanes the running thread's warp has (the last warp of a block may be partial).
inline unsigned warp_lanes() {
  const State& s = state();
  const unsigned n = s.block_dim.x * s.block_dim.y * s.block_dim.z, first = linear_thread() / kWarpSize * kWarpSize;
  return std::min(kWarpSize, n - first);
}

inline void check_mask(unsigned mask, const char* what) {
  const unsigned lanes = warp_lanes(), full = lanes == kWarpSize ? 0xFFFFFFFFu : (1u << lanes) - 1;
  if (mask != full) fail(what);
}

// Puts `bytes` of `in` into the running lane's slot of its warp's next collective and waits
// for every lane of the warp to do the same; returns the [lane][kLaneSlot] slots of all
// of them, valid until this lane enters its next collective.
inline const unsigned char* warp_exchange(const void* in, size_t bytes) {
  State& s = state();
  if (bytes > kLaneSlot) fail("warp collective: more bytes per lane than the emulator's slot holds");
  Fiber* f = s.current;
  const unsigned t = linear_thread(), warp = t / kWarpSize, lane = t % kWarpSize;
  unsigned char* buffer =
      s.exchange[s.shared_block].data() + ((size_t(warp) * 2 + f->collectives % 2) * kWarpSize) * kLaneSlot;
  std::memcpy(buffer + lane * kLaneSlot, in, bytes);
  ++f->collectives;
  f->wait = Wait::kWarp;
  yield_to_scheduler(false);
  return buffer;
}

template <typename T>
T lane_value(const unsigned char* slots, unsigned lane) {
  T v;
  std::memcpy(&v, slots + size_t(lane) * kLaneSlot, sizeof v);
  return v;
}

// The shuffles, as CUDA defines them for a whole warp: width a power of two up to 32,
// the warp cut into segments of `width` lanes; a source outside the lane's segment (down,
// up) leaves the lane its own value.
template <typename T>
T shfl_sync(unsigned mask, T v, int src, int width) {
  check_mask(mask, "__shfl_sync: the emulator takes only masks of the whole warp");
  const unsigned char* slots = warp_exchange(&v, sizeof v);
  const unsigned lane = lane_id(), base = lane & ~unsigned(width - 1);
  return lane_value<T>(slots, base + (unsigned(src) & unsigned(width - 1)));
}
template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int width) {
  check_mask(mask, "__shfl_xor_sync: the emulator takes only masks of the whole warp");
  const unsigned char* slots = warp_exchange(&v, sizeof v);
  const unsigned lane = lane_id(), from = lane ^ unsigned(lane_mask);
  return (from & ~unsigned(width - 1)) == (lane & ~unsigned(width - 1)) && from < warp_lanes()
             ? lane_value<T>(slots, from) : v;
}
template <typename T>
T shfl_down_sync(unsigned mask, T v, unsigned delta, int width) {
  check_mask(mask, "__shfl_down_sync: the emulator takes only masks of the whole warp");
  const unsigned char* slots = warp_exchange(&v, sizeof v);
  const unsigned lane = lane_id();
  return (lane % unsigned(width)) + delta < unsigned(width) && lane + delta < warp_lanes()
             ? lane_value<T>(slots, lane + delta) : v;
}
template <typename T>
T shfl_up_sync(unsigned mask, T v, unsigned delta, int width) {
  check_mask(mask, "__shfl_up_sync: the emulator takes only masks of the whole warp");
  const unsigned char* slots = warp_exchange(&v, sizeof v);
  const unsigned lane = lane_id();
  return lane % unsigned(width) >= delta ? lane_value<T>(slots, lane - delta) : v;
}

// ---------------------------------------------------------------- tensor-core tiles

// Where element i of a lane's fragment sits in its matrix, as the PTX ISA lays out the
// fragments of mma.sync (sections "Matrix Fragments for mma.m16n8k8" and "... m16n8k16
// with floating point type"): group = lane / 4, tig = lane % 4. A is M x K row-major,
// B is K x N, C and D are M x N (M 16, N 8). This is the reference the kernels' fragment
// loaders (csrc/cuda/mma.cuh) are checked against: keep it written from the ISA, not from them.
enum class MmaShape { kM16N8K8Tf32, kM16N8K16Bf16, kM16N8K16F16 };

struct Coord {
  int row, col;
};

namespace mma_layout {
// A: m16n8k8 .tf32, four elements a0..a3: rows group, group + 8, group, group + 8;
// columns tig, tig, tig + 4, tig + 4.
inline Coord a_tf32(unsigned lane, int i) {
  return {int(lane / 4) + (i % 2) * 8, int(lane % 4) + (i / 2) * 4};
}
// B: m16n8k8 .tf32, b0 and b1: rows tig and tig + 4, column group.
inline Coord b_tf32(unsigned lane, int i) { return {int(lane % 4) + i * 4, int(lane / 4)}; }
// A: m16n8k16 .bf16/.f16, eight elements a0..a7 (two per 32-bit register): rows group for
// a0, a1, a4, a5 and group + 8 for a2, a3, a6, a7; columns 2 tig + (i % 2), plus 8 for a4..a7.
inline Coord a_16bit(unsigned lane, int i) {
  return {int(lane / 4) + ((i / 2) % 2) * 8, int(lane % 4) * 2 + (i % 2) + (i / 4) * 8};
}
// B: m16n8k16 .bf16/.f16, b0..b3: rows 2 tig + (i % 2), plus 8 for b2 and b3; column group.
inline Coord b_16bit(unsigned lane, int i) { return {int(lane % 4) * 2 + (i % 2) + (i / 2) * 8, int(lane / 4)}; }
// C and D, float: c0..c3: rows group (c0, c1) and group + 8 (c2, c3), columns 2 tig + (i % 2).
inline Coord c(unsigned lane, int i) { return {int(lane / 4) + (i / 2) * 8, int(lane % 4) * 2 + (i % 2)}; }
}  // namespace mma_layout

inline float tf32_value(uint32_t bits) {
  bits &= 0xFFFFE000u;  // the tensor cores read the top 19 bits of a .tf32 operand
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float half_value(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  const uint32_t sign = uint32_t(bits >> 15) << 31, exp = (bits >> 10) & 0x1F, man = bits & 0x3FF;
  float mag;
  if (exp == 0) mag = std::ldexp(float(man), -24);
  else if (exp == 31) mag = man ? NAN : INFINITY;
  else mag = std::ldexp(float(man | 0x400), int(exp) - 25);
  return sign ? -mag : mag;
}

// d = A B + c for one warp's 16 x 8 tile: a[4] and b[2] the lane's 32-bit fragment
// registers, c[4] and d[4] its accumulators. Each product sum is formed in double and
// rounded once to float: the tensor cores' own order and precision of accumulation are
// not specified, and the tests compare with tolerances that cover any of them.
template <MmaShape S>
void mma_sync(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if (warp_lanes() != kWarpSize) fail("mma_sync: needs a whole warp");
  struct Fragments {
    uint32_t a[4], b[2];
    float c[4];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const unsigned char* slots = warp_exchange(&mine, sizeof mine);
  constexpr int K = S == MmaShape::kM16N8K8Tf32 ? 8 : 16;
  double A[16][16] = {}, B[16][8] = {};
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    const Fragments f = lane_value<Fragments>(slots, lane);
    if constexpr (S == MmaShape::kM16N8K8Tf32) {
      for (int i = 0; i < 4; ++i) {
        const Coord at = mma_layout::a_tf32(lane, i);
        A[at.row][at.col] = tf32_value(f.a[i]);
      }
      for (int i = 0; i < 2; ++i) {
        const Coord at = mma_layout::b_tf32(lane, i);
        B[at.row][at.col] = tf32_value(f.b[i]);
      }
    } else {
      const bool bf16 = S == MmaShape::kM16N8K16Bf16;
      for (int i = 0; i < 8; ++i) {  // element i: register i / 2, its low half first
        const Coord at = mma_layout::a_16bit(lane, i);
        A[at.row][at.col] = half_value(uint16_t(f.a[i / 2] >> (16 * (i % 2))), bf16);
      }
      for (int i = 0; i < 4; ++i) {
        const Coord at = mma_layout::b_16bit(lane, i);
        B[at.row][at.col] = half_value(uint16_t(f.b[i / 2] >> (16 * (i % 2))), bf16);
      }
    }
  }
  const unsigned lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    const Coord at = mma_layout::c(lane, i);
    double acc = c[i];
    for (int k = 0; k < K; ++k) acc += A[at.row][k] * B[k][at.col];
    d[i] = float(acc);
  }
}

// Runs body once per thread of every block of the grid, in clusters of cluster_x blocks
// along x (1: no clusters); `cooperative` (cluster_x 1, a grid along x): every block
// together, with the grid barrier.
inline void launch_group(dim3 grid, dim3 block, unsigned cluster_x, bool cooperative, size_t shared_bytes,
                         const std::function<void()>& body) {
  State& s = state();
  if (cluster_x == 0 || grid.x % cluster_x != 0) fail("launch: the grid is not a whole number of clusters");
  if (cooperative && (cluster_x != 1 || grid.y != 1 || grid.z != 1))
    fail("launch: the emulator runs cooperative launches of blocks along x, without clusters");
  s.body = &body;
  s.grid_dim = grid;
  s.block_dim = block;
  s.cluster_x = cluster_x;
  s.cooperative = cooperative;
  // The blocks that run side by side, each as far as it can before the next: a cluster, or
  // the whole grid of a cooperative launch.
  const unsigned together = cooperative ? grid.x : cluster_x;
  const Wait group_barrier = cooperative ? Wait::kGrid : Wait::kCluster;
  const unsigned n = block.x * block.y * block.z;
  constexpr size_t kStack = 256 * 1024;
  static const bool reverse = [] {
    const char* v = std::getenv("BIRNN_EMU_ORDER");
    if (!v || std::strcmp(v, "forward") == 0) return false;
    if (std::strcmp(v, "reverse") == 0) return true;
    std::fprintf(stderr, "birnn_emu: BIRNN_EMU_ORDER is forward or reverse, not '%s'\n", v);
    std::abort();
  }();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += together) {
        s.shared.assign(together, std::vector<unsigned char>(shared_bytes, 0xFF));
        s.exchange.assign(together, std::vector<unsigned char>(size_t(n + kWarpSize - 1) / kWarpSize * 2 * kWarpSize *
                                                               kLaneSlot));
        std::vector<Fiber> fibers(size_t(n) * together);
        for (unsigned i = 0; i < fibers.size(); ++i) {
          Fiber& f = fibers[i];
          const unsigned t = i % n;
          f.block = i / n;
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.stack.reset(new char[kStack]);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_main, 0);
        }
        auto where = [&](const Fiber& f) {
          s.block = dim3(bx0 + f.block, by, bz);
          s.thread = f.tid;
        };
        // Each block in turn runs as far as it can (its own barriers released as its threads
        // all reach them) before the next starts: the order that most exposes a read of
        // another block's data before the cluster (grid) barrier that should precede it.
        for (;;) {
          bool live = false;
          for (unsigned bi = 0; bi < together; ++bi) {
            const unsigned b = reverse ? together - 1 - bi : bi;
            Fiber* first = &fibers[size_t(b) * n];
            for (;;) {
              for (unsigned ti = 0; ti < n; ++ti) {
                Fiber& f = first[reverse ? n - 1 - ti : ti];
                if (f.wait != Wait::kRunning) continue;
                s.current = &f;
                s.shared_block = f.block;
                where(f);
#ifdef BIRNN_EMU_ASAN
                __sanitizer_start_switch_fiber(&s.scheduler_fake_stack, f.stack.get(), kStack);
#endif
                swapcontext(&s.scheduler, &f.ctx);
#ifdef BIRNN_EMU_ASAN
                __sanitizer_finish_switch_fiber(s.scheduler_fake_stack, nullptr, nullptr);
#endif
              }
              // Warps whose every lane waits at the same collective go on; a warp whose lanes
              // wait at different points (or some returned) cannot.
              bool released = false;
              for (unsigned w0 = 0; w0 < n; w0 += kWarpSize) {
                const unsigned lanes = std::min(kWarpSize, n - w0);
                unsigned at_collective = 0;
                for (unsigned t = w0; t < w0 + lanes; ++t) at_collective += first[t].wait == Wait::kWarp;
                if (at_collective == 0) continue;
                for (unsigned t = w0; t < w0 + lanes; ++t)
                  if (first[t].wait != Wait::kWarp || first[t].collectives != first[w0].collectives) {
                    where(first[t]);
                    fail("warp divergence: lanes of one warp at different collectives, or at a collective and a "
                         "barrier, or returned while others wait at a collective");
                  }
                for (unsigned t = w0; t < w0 + lanes; ++t) first[t].wait = Wait::kRunning;
                released = true;
              }
              if (released) continue;
              unsigned block_waits = 0, done = 0;
              for (unsigned t = 0; t < n; ++t)
                block_waits += first[t].wait == Wait::kBlock, done += first[t].wait == Wait::kDone;
              if (block_waits && block_waits + done != n) {
                where(*first);
                fail("barrier divergence: threads of one block wait at different barriers");
              }
              if (block_waits && done) {
                where(*first);
                fail("barrier divergence: a thread returned while others of its block wait at __syncthreads");
              }
              if (block_waits == 0) {
                // A block that has returned has no shared memory left for the others to read.
                if (done == n && together > 1) std::fill(s.shared[b].begin(), s.shared[b].end(), 0xFF);
                live = live || done < n;
                break;
              }
              for (unsigned t = 0; t < n; ++t) first[t].wait = Wait::kRunning;
            }
          }
          if (!live) break;
          // Every thread left waits at the cluster (grid) barrier: all of the cluster's (grid's) must.
          for (const Fiber& f : fibers)
            if (f.wait != group_barrier) {
              where(f);
              fail(cooperative ? "barrier divergence: a thread returned or waits elsewhere while others wait at the "
                                 "grid barrier"
                               : "barrier divergence: a thread returned or waits elsewhere while others of its "
                                 "cluster wait at the cluster barrier");
            }
          for (Fiber& f : fibers) f.wait = Wait::kRunning;
        }
        s.current = nullptr;
      }
  s.cluster_x = 1;
  s.cooperative = false;
}

inline void launch_cluster(dim3 grid, dim3 block, unsigned cluster_x, size_t shared_bytes,
                           const std::function<void()>& body) {
  launch_group(grid, block, cluster_x, /*cooperative=*/false, shared_bytes, body);
}

// Runs body once per thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  launch_group(grid, block, 1, /*cooperative=*/false, shared_bytes, body);
}

// cudaLaunchCooperativeKernel: every block of the grid at once, with the grid barrier.
inline void launch_cooperative(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  launch_group(grid, block, 1, /*cooperative=*/true, shared_bytes, body);
}

}  // namespace birnn_emu

// The warp shuffles under their CUDA names (functions: a macro would also rewrite the
// CUDA headers' own declarations).
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::birnn_emu::shfl_sync(mask, v, src, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::birnn_emu::shfl_xor_sync(mask, v, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::birnn_emu::shfl_down_sync(mask, v, delta, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::birnn_emu::shfl_up_sync(mask, v, delta, width);
}

#define threadIdx (::birnn_emu::state().thread)
#define blockIdx (::birnn_emu::state().block)
#define blockDim (::birnn_emu::state().block_dim)
#define gridDim (::birnn_emu::state().grid_dim)
#define __syncthreads() ::birnn_emu::syncthreads()
#define BIRNN_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::birnn_emu::dynamic_shared())
#define BIRNN_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::birnn_emu::launch(grid, block, shared_bytes, [&] { kernel(__VA_ARGS__); })
#define BIRNN_LAUNCH_CLUSTER(kernel, grid, block, cluster_x, shared_bytes, stream, ...) \
  ::birnn_emu::launch_cluster(grid, block, cluster_x, shared_bytes, [&] { kernel(__VA_ARGS__); })
#define BIRNN_LAUNCH_COOPERATIVE(kernel, grid, block, shared_bytes, stream, ...) \
  ::birnn_emu::launch_cooperative(grid, block, shared_bytes, [&] { kernel(__VA_ARGS__); })
#define BIRNN_LAUNCH_ERROR() cudaSuccess
