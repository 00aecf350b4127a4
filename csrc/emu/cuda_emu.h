// Host emulation of the SIMT subset the birnn_ext kernels use, so that g++ can compile
// csrc/cuda/*.cu and the tests can run their device code on a machine with no GPU, under
// AddressSanitizer and UndefinedBehaviorSanitizer.
//
// Supported: __global__/__device__/__host__/__forceinline__; threadIdx, blockIdx,
// blockDim, gridDim (dim3, up to 3-D); __syncthreads(); dynamic shared memory through
// BIRNN_DYNAMIC_SHARED; kernel launches through BIRNN_LAUNCH; thread-block clusters along
// x (launch_cluster): the cluster barrier and distributed shared memory (a block reading
// another's shared memory); cudaStream_t and cudaError_t. The threads of a launch run as
// fibers, each until it reaches a barrier or returns; the clusters of a grid (each block
// its own cluster without one) run one after another, the blocks of a cluster together.
// A block barrier is released when every thread of the block has reached it, a cluster
// barrier when every thread of the cluster has, which is what they mean on a GPU. A thread
// that returns while others of its block (or cluster) wait at a barrier is reported as
// barrier divergence, and so are threads of one block waiting at different barriers.
// Shared memory starts filled with 0xFF bytes (NaN as float): a read before the write it
// depends on shows up as a wrong answer rather than a lucky zero.
//
// Not supported (and not used by the kernels): warp shuffles and votes, atomics, the
// grid barrier, static __shared__ arrays, streams running concurrently.
#pragma once

#include <ucontext.h>

#include <algorithm>
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

enum class Wait { kRunning, kBlock, kCluster, kDone };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // left uninitialized: only the pages a thread touches are mapped
  dim3 tid;
  unsigned block = 0;  // index of its block within the cluster
  Wait wait = Wait::kRunning;
  void* fake_stack = nullptr;
};

struct State {
  dim3 thread, block, block_dim, grid_dim;
  unsigned cluster_x = 1;                          // blocks per cluster, along x
  std::vector<std::vector<unsigned char>> shared;  // per block of the running cluster
  unsigned shared_block = 0;                       // the running thread's block within its cluster
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
  state().current->wait = Wait::kCluster;
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
  if (rank >= s.shared.size()) fail("map_shared_rank: no such block in the cluster");
  const auto* base = s.shared[s.shared_block].data();
  const auto offset = reinterpret_cast<const unsigned char*>(p) - base;
  if (offset < 0 || size_t(offset) >= s.shared[s.shared_block].size())
    fail("map_shared_rank: the address is not in this block's shared memory");
  return reinterpret_cast<T*>(s.shared[rank].data() + offset);
}

inline unsigned cluster_block_rank() { return state().block.x % state().cluster_x; }

// Runs body once per thread of every block of the grid, in clusters of cluster_x blocks
// along x (1: no clusters).
inline void launch_cluster(dim3 grid, dim3 block, unsigned cluster_x, size_t shared_bytes,
                           const std::function<void()>& body) {
  State& s = state();
  if (cluster_x == 0 || grid.x % cluster_x != 0) fail("launch: the grid is not a whole number of clusters");
  s.body = &body;
  s.grid_dim = grid;
  s.block_dim = block;
  s.cluster_x = cluster_x;
  const unsigned n = block.x * block.y * block.z;
  constexpr size_t kStack = 256 * 1024;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster_x) {
        s.shared.assign(cluster_x, std::vector<unsigned char>(shared_bytes, 0xFF));
        std::vector<Fiber> fibers(size_t(n) * cluster_x);
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
        // another block's data before the cluster barrier that should precede it.
        for (;;) {
          bool live = false;
          for (unsigned b = 0; b < cluster_x; ++b) {
            Fiber* first = &fibers[size_t(b) * n];
            for (;;) {
              for (unsigned t = 0; t < n; ++t) {
                Fiber& f = first[t];
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
              unsigned block_waits = 0, done = 0;
              for (unsigned t = 0; t < n; ++t) block_waits += first[t].wait == Wait::kBlock, done += first[t].wait == Wait::kDone;
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
                if (done == n && cluster_x > 1) std::fill(s.shared[b].begin(), s.shared[b].end(), 0xFF);
                live = live || done < n;
                break;
              }
              for (unsigned t = 0; t < n; ++t) first[t].wait = Wait::kRunning;
            }
          }
          if (!live) break;
          // Every thread left waits at the cluster barrier: all of the cluster's must.
          for (const Fiber& f : fibers)
            if (f.wait != Wait::kCluster) {
              where(f);
              fail("barrier divergence: a thread returned while others of its cluster wait at the cluster barrier");
            }
          for (Fiber& f : fibers) f.wait = Wait::kRunning;
        }
        s.current = nullptr;
      }
  s.cluster_x = 1;
}

// Runs body once per thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  launch_cluster(grid, block, 1, shared_bytes, body);
}

}  // namespace birnn_emu

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
#define BIRNN_LAUNCH_ERROR() cudaSuccess
