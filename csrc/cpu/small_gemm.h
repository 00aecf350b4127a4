// A register-blocked GEMM for the per-step products of a sweep: C[M,N] = A[M,K] B[K,N]
// (+ beta C), float32, with B (the weights) packed once per call into panels of columns.
//
// Why not BLAS or oneDNN: a step multiplies a few rows (the batch) by a weight matrix that
// stays in cache for the whole sweep. Four rows of A against 64 columns of B keep 16
// AVX-512 accumulators busy, each B load feeding four FMAs. The weights are packed once
// per layer call, not once per product, and there is no per-call setup: at these sizes
// both cost BLAS and oneDNN more than the arithmetic
// (benchmarks/bench_step_gemm.py times the three on the sweep's shapes).
//
// Each output sums its K products in order, k = 0, 1, ...: the same bits on every call.
#pragma once

#include <cstdint>

namespace birnn {

// B [K,N], B(k, n) = b[k * b_row + n * b_col], packed into panels of columns for
// small_gemm: out must hold small_gemm_packed_size(K, N) floats. The _checked variant
// also returns whether every value of B is finite, read on the way.
int64_t small_gemm_packed_size(int64_t K, int64_t N);
void small_gemm_pack(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out);
bool small_gemm_pack_checked(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col, float* out);
// The same panels from a bfloat16 B (its bits), widened exactly; and from a float32 B
// rounded to bfloat16 on the way in (the panels of packing B.to(torch.bfloat16)).
void small_gemm_pack(int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col, float* out);
void small_gemm_pack_rounded_to_bf16(int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col,
                                     float* out);

// C[M,N] = A B + beta C, B packed by small_gemm_pack. A(r, k) = a[r * a_row + k * a_col];
// C(r, n) = c[r * ldc + n].
void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                float beta, float* c, int64_t ldc);
// The same with C in bfloat16 (its bits as uint16_t): each output accumulated in float32
// and rounded to nearest even once (beta C read widened), in the tile's store.
void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* packed,
                float beta, uint16_t* c, int64_t ldc);

// C[M,N] = A B + beta C with B read where it lies, for products of a few rows, where
// packing B would cost more than the product saves. B(k, n) = b[k * b_row + n * b_col].
// Two layouts (small_gemm_in_place_fits says whether a product has one):
//  - b_col == 1, B's rows contiguous: each row of A scales them into vector accumulators;
//  - b_row == 1, B the transpose of a row-major matrix (a weight as nn.LSTM stores it):
//    each output is a dot product, summed in vector lanes; A's rows must be contiguous
//    (a_col == 1) and K at least 64, or at least 16 over up to 3 rows.
bool small_gemm_in_place_fits(int64_t M, int64_t K, int64_t a_col, int64_t b_row, int64_t b_col);
void small_gemm_in_place(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t b_row, int64_t b_col, float beta, float* c, int64_t ldc);

// "avx512", "avx2" or "baseline": the build picked (BIRNN_EXT_SMALL_GEMM=avx2 or
// baseline forces a narrower one).
const char* small_gemm_build();

// The bfloat16 step products (small_gemm_bf16.cpp): C[M,N] = A B + beta C with A, B and
// C in bfloat16 (their bits as uint16_t), float32 accumulation, each output rounded
// once. B packed once per call by small_gemm_bf16_pack into small_gemm_bf16_packed_bytes
// bytes, into one of two kinds of panels:
//  - dot: k in pairs for the processor's AVX512_BF16 dot products (vdpbf16ps); only
//    where small_gemm_bf16_has_dot();
//  - widened: float32 panels for small_gemm, A widened and C rounded around it.
// Strides as above.
enum class Bf16Panels : uint8_t { dot, widened };
bool small_gemm_bf16_has_dot();
// The panels for the step products of a layer call at this batch: the rule of
// dispatch_rules.h (bf16_dot_products_at_fma_rate, kBf16DotMaxBatch) on this processor,
// or what BIRNN_EXT_BF16=avx512bf16|widen forces.
Bf16Panels small_gemm_bf16_panels(int64_t batch);
int64_t small_gemm_bf16_packed_bytes(Bf16Panels panels, int64_t K, int64_t N);
void small_gemm_bf16_pack(Bf16Panels panels, int64_t K, int64_t N, const uint16_t* b, int64_t b_row, int64_t b_col,
                          void* out);
// The same from a float32 B, each element rounded to bfloat16 (to nearest even) on the
// way in: the panels of packing B.to(torch.bfloat16), without that copy.
void small_gemm_bf16_pack(Bf16Panels panels, int64_t K, int64_t N, const float* b, int64_t b_row, int64_t b_col,
                          void* out);
void small_gemm_bf16(Bf16Panels panels, int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t a_row,
                     int64_t a_col, const void* packed, float beta, uint16_t* c, int64_t ldc);
// What small_gemm_bf16_panels gives: "avx512bf16" (the dot products at every batch),
// "widen" (widened at every batch), or "widen+avx512bf16" (the dot products up to
// kBf16DotMaxBatch, widened above).
const char* small_gemm_bf16_build();
// Whether the large bfloat16 products (projections, gradients; blas.h) go to a float32
// GEMM on widened copies rather than to oneDNN's bfloat16 one: on a processor with slow
// bfloat16 dot products and no AMX, or under BIRNN_EXT_BF16=widen.
bool bf16_large_products_in_float32();

}  // namespace birnn
