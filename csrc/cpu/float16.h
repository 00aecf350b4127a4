// float16 storage on the CPU: the float32 kernels on widened copies, every result rounded
// back to float16 but the saved cell state (c_prev, float32 for every 16-bit type, as the
// schema says). nn.LSTM takes float16 on the CPU, so a drop-in must; it is rare there
// (the x86 processors this project serves have no float16 arithmetic below AVX512-FP16),
// and the copies cost what a cast costs, so it has no kernels of its own. The math is the
// same as the float16 CUDA kernels': float32 products, gate math and cell state.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace birnn::float16 {

inline bool is(const at::Tensor& x) { return x.scalar_type() == at::kHalf; }

inline at::Tensor widen(const at::Tensor& t) { return t.defined() && is(t) ? t.to(at::kFloat) : t; }
inline std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(widen(*t)) : std::nullopt;
}

inline at::Tensor narrow(const at::Tensor& t) { return t.defined() ? t.to(at::kHalf) : t; }

}  // namespace birnn::float16
