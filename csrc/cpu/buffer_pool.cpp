// See buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <torch/library.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace birnn {
namespace {

// Below this, glibc serves requests from its heap without fresh pages; they go to the
// default allocator. Sizes are rounded to whole pages, so that the same shape finds the
// same block again.
constexpr size_t kMinPooled = size_t(128) << 10;
constexpr size_t kPage = 4096;

int64_t limit_from_env() {
  const char* env = std::getenv("BIRNN_EXT_CPU_CACHE_MB");
  if (!env || !*env) return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end && *end == '\0' && mb >= 0, "BIRNN_EXT_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '",
              env, "'");
  return int64_t(mb) << 20;
}

class Pool final : public c10::Allocator {
 public:
  static Pool& instance() {
    // Never destroyed: tensors holding pool memory may outlive static destructors.
    static Pool* pool = new Pool();
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinPooled || limit_ == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
        cached_ -= int64_t(size);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!p) p = c10::alloc_cpu(size);
    return {p, new Block{p, size}, &Pool::release_block, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

  int64_t empty_cache() {
    std::multimap<size_t, void*> blocks;
    int64_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      freed = cached_;
      cached_ = 0;
    }
    for (auto& [size, p] : blocks) c10::free_cpu(p);
    return freed;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  Pool() : limit_(limit_from_env()) {}

  static void release_block(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    instance().release(b->ptr, b->size);
    delete b;
  }

  void release(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + int64_t(size) <= limit_) {
        free_.emplace(size, p);
        cached_ += int64_t(size);
        return;
      }
    }
    c10::free_cpu(p);
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> block
  int64_t cached_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &Pool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

PoolStats pool_stats() { return Pool::instance().stats(); }

int64_t pool_empty_cache() { return Pool::instance().empty_cache(); }

// The ops take no tensor, so there is no backend to dispatch on.
TORCH_LIBRARY_IMPL(birnn_ext, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_stats", [] {
    const PoolStats s = pool_stats();
    return std::vector<int64_t>{s.cached_bytes, s.limit_bytes, s.hits, s.misses};
  });
  m.impl("empty_cpu_cache", [] { return pool_empty_cache(); });
}

}  // namespace birnn
