// Reused memory for the large CPU tensors of the layer ops (activations saved for
// backward, outputs, gradients of the gate pre-activations).
//
// Why: glibc serves buffers of this size with fresh pages from the OS and hands them
// back when they are freed, so every training step page-faults its activations in
// again: a fifth of the demo classifier's step went to the kernel zeroing pages. A
// training loop asks for the same sizes every step; the pool keeps the freed blocks and
// gives them out again, keyed by size.
//
// Bounded: at most BIRNN_EXT_CPU_CACHE_MB megabytes (default 1024; 0 turns the pool
// off) are kept; a block freed beyond that goes back to the system.
// birnn_ext.empty_cpu_cache() frees every kept block. Tensors from the pool are ordinary
// resizable CPU tensors; the pool only decides where their memory comes from.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace birnn {

// at::empty, with memory from the pool when the tensor is large enough to page-fault.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor pooled_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, options).zero_();
}

struct PoolStats {
  int64_t cached_bytes;  // kept, free, for the next request of their size
  int64_t limit_bytes;
  int64_t hits;          // requests served from kept blocks
  int64_t misses;        // requests that went to the system
};
PoolStats pool_stats();

// Frees every kept block; returns the bytes freed.
int64_t pool_empty_cache();

}  // namespace birnn
