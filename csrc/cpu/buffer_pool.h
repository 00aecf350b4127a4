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

// The scratch buffers of one call, carved out of one allocation: a call at batch 1
// spends a large part of its fixed cost making tensors (about 0.15 us each here), and
// scratch needs no tensor of its own. Each buffer starts on a 64-byte line.
//   Scratch s;
//   const auto rec = s.reserve<float>(n);  // ... every buffer first
//   s.allocate();
//   float* p = s.get<float>(rec);          // valid while s lives
class Scratch {
 public:
  template <typename T>
  size_t reserve(int64_t n) {
    TORCH_INTERNAL_ASSERT(!owner_.defined() && n >= 0, "Scratch: reserve every buffer before allocate()");
    const size_t at = bytes_;
    bytes_ += (size_t(n) * sizeof(T) + kLine - 1) / kLine * kLine;
    return at;
  }
  void allocate() {
    owner_ = pooled_empty({int64_t(bytes_)}, at::TensorOptions().dtype(at::kByte));
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(owner_.data_ptr()) % kLine == 0);
  }
  template <typename T>
  T* get(size_t at) const {
    return reinterpret_cast<T*>(static_cast<char*>(owner_.data_ptr()) + at);
  }

 private:
  static constexpr size_t kLine = 64;  // CPU tensors' alignment (c10::alloc_cpu), a cache line
  size_t bytes_ = 0;
  at::Tensor owner_;
};

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
