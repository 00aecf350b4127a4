// Tensor-core tile products for the sweeps' step products (sm_80 and later): one warp
// computes D[16][8] = A[16][K] B[K][8] + C with mma.sync, K = 8 on TF32 (float32 storage
// under cudnn.allow_tf32) or 16 on bfloat16 and float16, accumulating in float.
//
// The fragment loaders below take A and B from row-major tiles (shared or global memory)
// into each lane's registers as the PTX ISA lays them out; the host emulator computes
// mma_sync from the same registers through its own reference of that layout
// (csrc/emu/cuda_emu.h, mma_layout), which the emulated tests check these loaders against.
// Both follow the PTX ISA's tables "Matrix Fragments for mma.m16n8k8" (.tf32) and "... for
// mma.m16n8k16 with floating point type" (.f16/.bf16), row by row.
// Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_common.cuh"

namespace birnn::cuda {
namespace mma {

enum class Kind { kTf32, kBf16, kF16 };

// The storage type each kind multiplies, and the K of one mma.
template <Kind K>
struct Traits;
template <>
struct Traits<Kind::kTf32> {
  using T = float;
  static constexpr int kK = 8;
};
template <>
struct Traits<Kind::kBf16> {
  using T = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct Traits<Kind::kF16> {
  using T = __half;
  static constexpr int kK = 16;
};

__device__ __forceinline__ unsigned lane() {
#if defined(BIRNN_EMU)
  return ::birnn_emu::lane_id();
#else
  return threadIdx.x % 32;
#endif
}

// A float rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), in a 32-bit
// register: what an mma on .tf32 operands takes.
__device__ __forceinline__ uint32_t to_tf32(float f) {
#if defined(BIRNN_EMU)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;  // NaN and infinity pass as they are
  return u;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(f));
  return u;
#else
  __trap();  // as mma_sync: the host launches tensor-core kernels only on sm_80 and later
  return 0u;
#endif
}

// Two 16-bit values in one register, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, sizeof l);
  memcpy(&h, &hi, sizeof h);
  return uint32_t(l) | (uint32_t(h) << 16);
}

// Lane's A fragment from a row-major tile a (row r at a + r * lda), rows 0..15 and
// columns 0..K-1 of it. TF32 (m16n8k8): a0..a3 at (g, t), (g + 8, t), (g, t + 4),
// (g + 8, t + 4), g = lane / 4, t = lane % 4. 16-bit (m16n8k16): registers of two columns,
// 2t and 2t + 1: rows g, g + 8, g, g + 8; column offsets 0, 0, 8, 8.
template <Kind K, typename T>
__device__ __forceinline__ void load_a(uint32_t (&frag)[4], const T* a, int lda) {
  const int g = int(lane() / 4), t = int(lane() % 4);
  if constexpr (K == Kind::kTf32) {
    frag[0] = to_tf32(a[g * lda + t]);
#if defined(BIRNN_BREAK_MMA_LAYOUT)
    // Deliberately wrong (a1 and a2 swapped), for the test that the emulated run catches it.
    frag[2] = to_tf32(a[(g + 8) * lda + t]);
    frag[1] = to_tf32(a[g * lda + t + 4]);
#else
    frag[1] = to_tf32(a[(g + 8) * lda + t]);
    frag[2] = to_tf32(a[g * lda + t + 4]);
#endif
    frag[3] = to_tf32(a[(g + 8) * lda + t + 4]);
  } else {
    const T* r0 = a + g * lda + 2 * t;
    const T* r8 = r0 + 8 * lda;
    frag[0] = pack2(r0[0], r0[1]);
#if defined(BIRNN_BREAK_MMA_LAYOUT)
    frag[2] = pack2(r8[0], r8[1]);
    frag[1] = pack2(r0[8], r0[9]);
#else
    frag[1] = pack2(r8[0], r8[1]);
    frag[2] = pack2(r0[8], r0[9]);
#endif
    frag[3] = pack2(r8[8], r8[9]);
  }
}

// Lane's B fragment from a K x 8 tile stored column by column: column n at b + n * ldb
// (B^T row-major, as W_hh rows are: B = W^T). TF32: b0, b1 at rows t and t + 4 of column
// g. 16-bit: registers of rows 2t, 2t + 1 and 2t + 8, 2t + 9 of column g.
template <Kind K, typename T>
__device__ __forceinline__ void load_b_cols(uint32_t (&frag)[2], const T* b, int ldb) {
  const int g = int(lane() / 4), t = int(lane() % 4);
  const T* col = b + g * ldb;
  if constexpr (K == Kind::kTf32) {
    frag[0] = to_tf32(col[t]);
    frag[1] = to_tf32(col[t + 4]);
  } else {
    frag[0] = pack2(col[2 * t], col[2 * t + 1]);
    frag[1] = pack2(col[2 * t + 8], col[2 * t + 9]);
  }
}

// d = A B + c on the warp's tensor cores (every lane of the warp calls it).
template <Kind K>
__device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                         const float (&c)[4]) {
#if defined(BIRNN_EMU)
  constexpr auto shape = K == Kind::kTf32   ? ::birnn_emu::MmaShape::kM16N8K8Tf32
                         : K == Kind::kBf16 ? ::birnn_emu::MmaShape::kM16N8K16Bf16
                                            : ::birnn_emu::MmaShape::kM16N8K16F16;
  ::birnn_emu::mma_sync<shape>(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// One mma.sync of the given shape and types, on this function's d, a, b and c.
#define BIRNN_MMA_SYNC(shape_and_types)                                                                 \
  asm volatile("mma.sync.aligned." shape_and_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "            \
               "{%10,%11,%12,%13};"                                                                     \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]))
  if constexpr (K == Kind::kTf32) {
    BIRNN_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32");
  } else if constexpr (K == Kind::kBf16) {
    BIRNN_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32");
  } else {
    BIRNN_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32");
  }
#undef BIRNN_MMA_SYNC
#else
  __trap();  // the host launches tensor-core kernels only on sm_80 and later
#endif
}

// Lane's accumulators into a 16 x 8 tile d, entry (r, n) at d[r * row_stride + n * col_stride],
// columns n < cols only (a batch tile's last rows): c0, c1 at (g, 2t), (g, 2t + 1); c2, c3
// at (g + 8, 2t), (g + 8, 2t + 1).
__device__ __forceinline__ void store_c(const float (&c)[4], float* d, int row_stride, int col_stride, int cols = 8) {
  const int g = int(lane() / 4), n = 2 * int(lane() % 4);
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), col = n + (i & 1);
    if (col < cols) d[r * row_stride + col * col_stride] = c[i];
  }
}

// One warp's acc[16][8] += A[16][Kdim] B[Kdim][8], A row-major (lda), B given by its
// columns (ldb), Kdim a multiple of the kind's K: the building block of the step products.
template <Kind K, typename T>
__device__ __forceinline__ void warp_tile_product(float (&acc)[4], const T* a, int lda, const T* b_cols, int ldb,
                                                  int kdim) {
  for (int k0 = 0; k0 < kdim; k0 += Traits<K>::kK) {
    uint32_t fa[4], fb[2];
    load_a<K>(fa, a + k0, lda);
    load_b_cols<K>(fb, b_cols + k0, ldb);
    mma_sync<K>(acc, fa, fb, acc);
  }
}

// The kind that multiplies storage type T (float32 storage: TF32).
template <typename T>
struct KindOf;
template <>
struct KindOf<float> {
  static constexpr Kind value = Kind::kTf32;
};
template <>
struct KindOf<__nv_bfloat16> {
  static constexpr Kind value = Kind::kBf16;
};
template <>
struct KindOf<__half> {
  static constexpr Kind value = Kind::kF16;
};

}  // namespace mma
}  // namespace birnn::cuda
