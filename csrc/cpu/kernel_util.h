// What every CPU kernel file shares: the math type of a storage type, loads and stores
// between them, the guard that keeps a kernel's own ATen calls below autograd, bit
// tests over storage values, and the run of a layer's directions on their threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/ParallelGuard.h>

#include <array>
#include <cstdint>
#include <cstring>

#include "bf16_bits.h"
#include "buffer_pool.h"
#include "dispatch_rules.h"

extern "C" {
// MKL's thread count for the calling thread (0: MKL's global one); returns the previous
// one. The C entry point (mkl_service.h's mkl_set_num_threads_local; the lowercase symbol
// is the Fortran one, which takes a pointer). Weak: null where libtorch's BLAS is not MKL.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace birnn {

// The math type: float for float and bfloat16 storage, double for double. The gate math,
// the cell state and the sums run in it.
template <typename T>
using math_t = at::opmath_type<T>;

// Entered first by every kernel: the tensors a kernel makes are its scratch and its
// outputs, never part of an autograd graph, so its own ATen calls (views, allocations,
// copies) skip the autograd and view-tracking layers. At batch 1 a layer call makes
// about forty of them, and each paid a microsecond or more for that bookkeeping.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

inline at::ScalarType math_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// Storage <-> math conversions for the row loops; bfloat16 through bf16_bits.h, whose
// conversions vectorize where c10::BFloat16's do not.
template <typename T>
inline math_t<T> load(T v) {
  return math_t<T>(v);
}
template <>
inline float load(at::BFloat16 v) {
  return bf16_to_float(v.x);
}
template <typename T>
inline T store(math_t<T> v) {
  return T(v);
}
template <>
inline at::BFloat16 store<at::BFloat16>(float f) {
  at::BFloat16 b;
  b.x = float_to_bf16(f);
  return b;
}

// t itself when contiguous, else a contiguous copy in pooled memory.
inline at::Tensor contiguous(const at::Tensor& t) {
  return t.is_contiguous() ? t : pooled_empty(t.sizes(), t.options()).copy_(t);
}

// One kind of a layer's weights, per direction, each contiguous (undefined past D, or
// when absent).
using Weights = std::array<at::Tensor, 2>;
inline Weights weights(const Weights& kind) {
  Weights w;
  for (size_t d = 0; d < 2; ++d)
    if (kind[d].defined()) w[d] = contiguous(kind[d]);
  return w;
}

// Bit tests over storage values, in integer operations so that the loops vectorize.
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kAbs = 0x7FFFFFFFu, kExp = 0x7F800000u;
};
template <>
struct Bits<double> {
  using U = uint64_t;
  static constexpr U kAbs = 0x7FFFFFFFFFFFFFFFull, kExp = 0x7FF0000000000000ull;
};
template <>
struct Bits<at::BFloat16> {
  using U = uint16_t;
  static constexpr U kAbs = 0x7FFF, kExp = 0x7F80;
};

// True when every one of the n values is +0 or -0.
template <typename T>
inline bool all_zero(const T* p, int64_t n) {
  using U = typename Bits<T>::U;
  U acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof u);
    acc |= u;
  }
  return (acc & Bits<T>::kAbs) == 0;
}

// True when none of the n values is NaN or infinite.
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  using U = typename Bits<T>::U;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= (u & Bits<T>::kExp) == Bits<T>::kExp;
  }
  return !bad;
}

// BLAS kept to the calling thread for a scope: on_this_thread's, and every parallel body
// that calls BLAS. Outside a parallel region (a small layer run on the calling thread
// alone) MKL split even a tiny product over every thread, waking them for it: the
// backward op at batch 1, H 16, T 8, I 16 took 20.4 us with two threads against 13.8
// with one, the forward in training 17.8 against 14.1. Inside one it keeps to one thread
// by itself only while its dynamic adjustment is on, and torch.set_num_threads turns that
// off: after torch.set_num_threads(2), MKL threaded the products a worker called, and
// FusedLSTMCell's dx at B 64, H 300 (two column tiles of 64 x 1200 x 16 and x 8) came out
// in other bits than with one thread.
class BlasOnThisThread {
 public:
  BlasOnThisThread() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~BlasOnThisThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  BlasOnThisThread(const BlasOnThisThread&) = delete;
  BlasOnThisThread& operator=(const BlasOnThisThread&) = delete;

 private:
  int prev_;
};

// Runs fn() on the calling thread alone: the at::parallel_for calls inside it run
// inline, as inside a parallel region, and MKL keeps to this thread.
//
// ATen sizes a thread's OpenMP pool from MKL's thread count the first time the thread
// asks (at::internal::lazy_init_num_threads, whose once-per-thread flag libtorch and this
// library each keep a copy of). Asked first in here, where MKL keeps to one thread, it
// left all of torch on one thread for the rest of the process: after a FusedLSTMCell step
// at batch 1 as a program's first call, torch.mm ran at half speed. Both copies ask first.
template <typename F>
void on_this_thread(const F& fn) {
  at::internal::lazy_init_num_threads();
  (void)at::get_num_threads();
  const c10::ParallelGuard inline_loops(true);
  const BlasOnThisThread blas;
  fn();
}
// fn() on the calling thread alone when `small` (work below what a second thread repays),
// else as it comes.
template <typename F>
void on_this_thread_if(bool small, const F& fn) {
  if (small)
    on_this_thread(fn);
  else
    fn();
}

// Runs fn(d) for each direction d, both at once on separate threads when the layer
// is bidirectional, there are threads to spare and each direction has `macs`
// multiply-adds or more. Inside, the GEMM engines run single-threaded.
template <typename F>
void for_each_direction(int64_t D, int64_t macs, const F& fn) {
  if (D > 1 && macs >= cpu_rules::kMinMacsPerThread && at::get_num_threads() > 1) {
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      const BlasOnThisThread blas;
      for (int64_t d = d0; d < d1; ++d) fn(d);
    });
  } else {
    // A small layer, of one direction or two, on the calling thread alone; a large one
    // on one direction (or one thread) as it comes: a float64 sweep's BLAS products may thread.
    on_this_thread_if(macs < cpu_rules::kMinMacsPerThread, [&] {
      for (int64_t d = 0; d < D; ++d) fn(d);
    });
  }
}

}  // namespace birnn
