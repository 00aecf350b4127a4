// bfloat16 <-> float32 on the bits (a bfloat16 as its uint16_t), for the CPU kernels'
// scalar loops: the same results as c10::BFloat16's conversions (round to nearest even,
// NaN to the quiet NaN 0x7FC0), in shifts, adds and a select that vectorize, where
// c10's branch on NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace birnn {

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return uint16_t(f != f ? 0x7FC0u : rounded);
}

// n contiguous values at once, in loops the compiler vectorizes.
inline void bf16_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = bf16_to_float(src[e]);
}
inline void float_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = float_to_bf16(src[e]);
}

}  // namespace birnn
