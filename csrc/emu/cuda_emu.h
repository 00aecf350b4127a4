// Host emulation of the SIMT subset the birnn_ext kernels use, so that g++ can compile
// csrc/cuda/lstm_kernels.cu and the tests can run its device code on a machine with no
// GPU, under AddressSanitizer and UndefinedBehaviorSanitizer.
//
// Supported: __global__/__device__/__host__/__forceinline__; threadIdx, blockIdx,
// blockDim, gridDim (dim3, up to 3-D); __syncthreads(); dynamic shared memory through
// BIRNN_DYNAMIC_SHARED; kernel launches through BIRNN_LAUNCH; cudaStream_t and
// cudaError_t. Blocks run one after another; the threads of a block run as fibers,
// each until it reaches a barrier or returns, and a barrier is released only when every
// thread of the block has reached it, which is what it means on a GPU. A thread that
// returns while others wait at a barrier is reported as barrier divergence. Shared
// memory starts filled with 0xFF bytes (NaN as float): a read before the write it
// depends on shows up as a wrong answer rather than a lucky zero.
//
// Not supported (and not used by the kernels): warp shuffles and votes, atomics,
// cooperative groups, static __shared__ arrays, streams running concurrently.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
  void* fake_stack = nullptr;
};

struct State {
  dim3 thread, block, block_dim, grid_dim;
  std::vector<unsigned char> shared;
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
  s.current->done = true;
  yield_to_scheduler(true);
  fail("a finished thread was resumed");
}

inline void syncthreads() { yield_to_scheduler(false); }

inline unsigned char* dynamic_shared() { return state().shared.data(); }

// Runs body once per thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  State& s = state();
  s.body = &body;
  s.grid_dim = grid;
  s.block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  constexpr size_t kStack = 256 * 1024;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = dim3(bx, by, bz);
        s.shared.assign(shared_bytes, 0xFF);
        std::vector<Fiber> fibers(n);
        for (unsigned i = 0; i < n; ++i) {
          Fiber& f = fibers[i];
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.stack.resize(kStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_main, 0);
        }
        // One round resumes every live thread; each runs to its next barrier or its end.
        for (;;) {
          unsigned finished = 0, waiting = 0;
          for (Fiber& f : fibers) {
            if (f.done) continue;
            s.current = &f;
            s.thread = f.tid;
#ifdef BIRNN_EMU_ASAN
            __sanitizer_start_switch_fiber(&s.scheduler_fake_stack, f.stack.data(), kStack);
#endif
            swapcontext(&s.scheduler, &f.ctx);
#ifdef BIRNN_EMU_ASAN
            __sanitizer_finish_switch_fiber(s.scheduler_fake_stack, nullptr, nullptr);
#endif
            f.done ? ++finished : ++waiting;
          }
          if (waiting == 0) break;
          for (const Fiber& f : fibers)
            if (f.done) {
              s.thread = f.tid;
              fail("barrier divergence: this thread returned while others wait at __syncthreads");
            }
        }
        s.current = nullptr;
      }
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
#define BIRNN_LAUNCH_ERROR() cudaSuccess
