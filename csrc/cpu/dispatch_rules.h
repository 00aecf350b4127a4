// The dispatch rules of the CPU ops, in one place, each with the measurement that chose
// it: which GEMM engine takes a product, when a weight is packed for the step products,
// when a second thread is woken, how the work is cut into blocks. The kernels ask with
// these constants; the mechanisms stay where they are (blas.h, small_gemm.cpp,
// fixed_order.h, kernel_util.h, the layer and cell ops). Torch-free, so that
// small_gemm.cpp reads it too. Figures: one thread unless said, us a call.
#pragma once

#include <cstdint>

namespace birnn::cpu_rules {

// ---------------------------------------------------------------- GEMM engines (blas.h)

// M*N*K from which a float32 product goes to oneDNN's matmul rather than BLAS: where
// oneDNN's per-call cost (about 10 us, against BLAS's 3) and BLAS's slower kernels break
// even. On AMD processors MKL takes its path for non-Intel ones, AVX2 kernels tuned for
// Zen (mkl_blas_def_sgemm_kernel_0_zen in a profile), no AVX-512: on the Zen 4 machine
// (torch 2.14.1) oneDNN ran the layers' input projections (2800-6400 rows, K 28-512,
// N 512-2048) 1.14-1.45x as fast on one core, 1.03-1.18x on two.
constexpr int64_t kOnednnMinWork = int64_t(1) << 21;

// The products of a sweep's steps, c = a B for a weight B: packed for small_gemm when the
// sweep multiplies at least this many rows (steps x batch) by B, read in place otherwise.
// B the transpose of a weight as nn.LSTM stores it (h W_hh^T, x W_ih^T): in place, every
// output is a dot product with its lanes summed at the end, 2.0 us at batch 1
// (128 x 512) against the packed kernel's 1.4, 4.7 against 2.1 at batch 4; the
// transposing copy (V x V blocks in registers) costs about as much as 16 rows save.
constexpr int64_t kMinRowsToPackTransposed = 16;
// B's rows contiguous (dg W_hh): in place, W's rows scale into accumulators as the packed
// kernel's do, within a few percent of it; a copy pays only over long sweeps.
constexpr int64_t kMinRowsToPack = 256;

// small_gemm_in_place over B's transpose (dot products) needs K of at least a vector (16
// lanes in the widest build) for the overlapping last vector of a ragged K. Over short
// rows the lane sums weigh more than the products: below K 64 the dot products beat BLAS
// on up to 3 rows of A only (benchmarks/bench_step_gemm.py, Zen 4, in place / BLAS:
// 1 x 28 x 512 1.4 / 1.7, 2 x 28 x 512 2.6 / 2.8, 4 x 28 x 512 5.0 / 2.4, 28 x 28 x 512
// several times slower; 1 x 12 x 256, a scalar tail alone, 1.2 / 0.6).
constexpr int64_t kDotMinK = 64, kShortDotMinK = 16, kShortDotMaxRows = 3;

// bfloat16 products run on the processor's bfloat16 dot products (vdpbf16ps, AVX512_BF16:
// two products a float32 lane per instruction; small_gemm_bf16's dot-product build, and
// oneDNN's bfloat16 GEMMs) where that instruction issues about as often as an FMA, and
// as float32 products of the widened values where it does not. Single-core loops of 16
// independent instructions, and benchmarks/bench_step_gemm.py --dtype bf16:
//  - Intel Xeon, family 6 model 207: vdpbf16ps one per 0.74 ns, vfmadd231ps one per
//    0.18 ns: half the float32 rate. Step products 87 GFLOP/s on the dot products
//    against 154-164 widened from batch 4 up (classic h W_hh^T, 100 x 128 x 512: 150 us
//    against 85; at batch 1, 1.7 us against 2.1). oneDNN's bfloat16 GEMMs 146-167
//    GFLOP/s on two cores at the classic and medium layers' projections and gradients,
//    its float32 ones 268-322.
//  - AMD Zen 4, family 25 model 17: the dot-product build at 213-231 GFLOP/s a core
//    against a float32 FMA peak of 115: twice the float32 rate.
// AMX (Intel processors from Sapphire Rapids where the OS enables it) runs oneDNN's
// bfloat16 GEMMs on its tiles, so there the large products stay in bfloat16.
// Where the dot products are slow, a layer call at a batch of one or two still packs for
// them: a step's product of a row or two is bound by the latency of its few accumulator
// chains, where a dot product advances two k, over panels of half the bytes. On the
// Intel Xeon above (bench_step_gemm.py --dtype bf16), dot / widened: 1 x 128 x 512
// 1.7 / 2.1 us, 2 x 128 x 512 3.2 / 3.7, 4 x 128 x 512 6.1 / 3.4; the batch-1 inference
// input chunk, 28 x 28 x 512, 9.9 / 6.6, once a call where the step products are 28.
constexpr int64_t kBf16DotMaxBatch = 2;
inline bool bf16_dot_products_at_fma_rate() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return !__builtin_cpu_is("intel");
#else
  return true;
#endif
}
inline bool has_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// ---------------------------------------------------------------- weight gradients (fixed_order.h)

// The longest sum (rows of a and b in a^T b) that a weight gradient takes to
// small_gemm_in_place rather than to a GEMM engine, and the fewest columns it must have
// there: a short block (a small batch over a few steps) of a wide weight. At batch 1,
// T 28, H 128, dW_hh (512 x 28 x 128) takes 17 us in place against 35 us in BLAS
// (benchmarks/bench_step_gemm.py). Narrower ones (dW_ih at a small input size) stay on
// matmul: with a few columns the in-place kernel's tiles hold too few accumulators.
constexpr int64_t kMaxRowsInPlace = 64;
constexpr int64_t kMinColsInPlace = 64;

// The rows of one direction's dg are cut into blocks of at least kGradBlockMinRows rows,
// at most kGradMaxBlocks of them, for the weight-gradient GEMMs (layer_backward.cpp's
// RowBlocks): each block's share of dW is a partial sum written out and added back, and
// smaller blocks cost more in that traffic than they win by starting earlier (the demo's
// training step, 2800 rows, ran about 5% faster than with 512-row blocks; with 2048
// rows or a single block it ran slower).
constexpr int64_t kGradBlockMinRows = 1024, kGradMaxBlocks = 16;

// ---------------------------------------------------------------- cell step (fixed_order.h)

// A cell step's products with a weight (FusedLSTMCell; fixed_order.h): float32 up to
// kCellInPlaceMaxRows rows in place (small_gemm_in_place, spans of the weight's columns
// split between threads), everything else in column tiles of at most kCellTileMaxCols
// on BLAS (oneDNN for bfloat16), one tile a thread at a time; the weight gradients over a
// batch above kMaxRowsInPlace in tiles of dW's rows (kCellGradTileMaxRows, below).
// FusedLSTMCell, benchmarks/bench_cell.py (16 steps), inference / forward+backward ms,
// Intel Xeon (2 MB L2 a core), two runs each:
//  - In place up to 8, 16, 32 rows, against row tiles above, us a step: B 16, I 128,
//    H 256 286 / 1053, 142 / 552, 141 / 581; B 16, I 512, H 512 1073 / 3282, 648 / 2621,
//    673 / 2618. Column tiles from 5 rows against from 17: B 8, I 128, H 256 1.23-1.28 /
//    4.92-4.95 and 1.26-1.43 / 4.93-5.01; B 16, I 512, H 512 9.98-10.20 / 32.0-32.9 and
//    8.87-9.12 / 36.7-37.2; B 12, I 64, H 64 0.61-0.65 / 1.89-2.51 and 0.59-0.60 /
//    1.68-1.72.
//  - Row tiles of 64 (each thread reading the whole weight; in place up to 64 rows where
//    the weight fit half of L2) against column tiles of 512: B 48, I 100, H 200
//    4.33-4.35 / 10.8-10.9 and 2.51-2.58 / 8.66-8.70; B 128, I 128, H 256 9.77-10.05 /
//    32.5-33.9 and 8.49-8.63 / 25.7-26.0; B 128, I 512, H 512 39.1-41.6 / 143.0-143.8
//    and 36.9-37.1 / 111.0-111.2; B 256, I 256, H 256 24.6-25.0 / 77.1-77.3 and
//    20.5-20.8 / 57.8-57.9. The tiles go to BLAS (a tile of columns is not contiguous,
//    matmul's rule for oneDNN): row tiles on BLAS (BIRNN_EXT_ONEDNN=0) took 110.9-112.1
//    at B 128, I 512, H 512 forward+backward too, so there MKL's single-threaded GEMMs
//    beat oneDNN's on this processor; the inference gains are the tiling's.
//  - Column tiles of 128, 256, 512: B 64, I 128, H 256 4.99-5.24, 4.77-4.84, 4.68-4.76
//    in inference; B 32, I 128, H 256 3.22-3.24, 2.83-2.86, 2.76-2.77.
constexpr int64_t kCellInPlaceMaxRows = 16, kCellTileMaxCols = 512;

// A cell step's weight gradients over a batch above kMaxRowsInPlace: tiles of at most this
// many of dW's rows, each a contiguous block of dW that one BLAS call writes, reading the
// whole batch of x or h. The column tiles they replaced (strided blocks of dW, which MKL
// zeroes in a slower pass before summing) and the products' separate parallel regions
// cost FusedLSTMCell against nn.LSTMCell, benchmarks/bench_cell.py forward+backward
// (16 steps, AMD Zen 4, family 25 model 17, two runs each, ratio nn / fused): B 128,
// I 512, H 512 0.87 before, 0.98-0.99 with these tiles and all of a step's tiles in one
// region; B 256, I 256, H 256 0.85-0.86 and 0.89-0.96 (with dx also skipped for a data
// input, as nn.LSTMCell's backward does: 1.10-1.18 and 1.06-1.07). The tile's height
// matters little: the backward op with tiles of at most 256, 512, 1024 rows and in two
// halves, ms (medians of 15 interleaved rounds, same machine): B 128, I 512, H 512 8.69,
// 8.67, 8.64, 8.76; B 256, I 256, H 256 2.83, 2.77, 2.82, 2.81; B 96, I 72, H 300 1.21,
// 1.15, 1.12, 1.13; B 128, I 128, H 256 1.23, 1.26, 1.29, 1.28. 512 leaves more than two
// tiles to share at H above 256, for machines with more cores.
constexpr int64_t kCellGradTileMaxRows = 512;

// bfloat16 cell products on oneDNN (blas.h's bf16_matmul_on_onednn: where the bfloat16
// dot products run at the FMA rate): the backward's dg W in tiles of at most this many
// batch rows, each reading the whole weight, rather than tiles of the weight's columns.
// at::native::mkldnn_matmul copies an operand that is neither contiguous nor a whole
// transposed matrix, and an output that is not contiguous, before and after each call:
// a column tile of W, and a block of dg^T's rows (the weight gradients' a, which is why
// that is transposed once into contiguous rows first). Those copies were a fifth of the
// bfloat16 backward's time (perf). lstm_cell_backward without dx, ms, medians of 11
// interleaved rounds, AMD Zen 4: B 128, I 512, H 512 3.18 in column tiles, 3.04 in row
// tiles, 2.63 with dg^T transposed too (torch's three products over both cores
// 2.06-2.29); B 128, I 128, H 256 0.85, 0.84, 0.67 (0.49-0.52). Row tiles of at most 32
// and 64 at B 128, I 512, H 512: 2.67 and 2.41; 64 and 128 at B 256, I 256, H 256:
// 1.33-1.38 and 1.30-1.31. A column tile of W^T (the forward's x W^T, h W^T) is read in
// place, and there column tiles stay ahead of row tiles of 128: the forward op in
// inference, ms, medians of 21 interleaved rounds, rows / columns: B 24, I 300, H 128
// 0.123 / 0.110; B 32, I 512, H 512 0.638 / 0.601; B 128, I 512, H 512 1.651 / 1.641;
// B 256, I 256, H 256 0.822 / 0.795.
constexpr int64_t kCellBf16TileMaxRows = 128;

// ---------------------------------------------------------------- threads (kernel_util.h)

// Multiply-adds of one direction's forward sweep (T*B*4H*(I+P)) from which a second
// thread pays for its waking: below it, the forward and the backward run on the
// calling thread alone. Measured at batch 1, bidirectional, one thread against two:
// - the forward op in inference: H 16, T 8 (16k MACs) 23.6 / 27.8; H 32, T 4 (33k)
//   24.0 / 24.9; H 64, T 2 (66k) 24.6 / 22.9; H 32, T 8 (66k) 30.1 / 27.7; H 128, T 1
//   (131k) 35.0 / 28.8 (a Zen 5);
// - the backward op: H 16, T 1 (2k) 11.6 / 13.2; H 16, T 8 (16k) 15.3 / 18.6; H 32,
//   T 4 (25k) 17.9 / 19.8; H 32, T 8 (66k) 24.1 / 24.0; H 64, T 2 (66k) 24.3 / 19.1;
//   H 128, T 1 (80k) 46.6 / 31.7 (a Zen 4).
constexpr int64_t kMinMacsPerThread = int64_t(1) << 16;

// Multiply-adds of a cell step (B*4H*(I+H)) below which the step runs on the calling
// thread alone, its products' threads not woken. Measured with FusedLSTMCell, one thread
// against two (inference and forward+backward): B 1, I 16, H 16 (2k) 19.4/21.7 and
// 134.5/141.1; B 1, I 28, H 128 (80k) 25.3/28.2 and 195.8/201.2; B 8, I 64, H 64 (262k)
// 30.1/38.8 and 174.7/171.5; B 8, I 128, H 128 (1M) 56.4/47.6 and 276.2/228.6.
constexpr int64_t kCellMinMacsForThreads = int64_t(1) << 19;

// ---------------------------------------------------------------- the layer forward (layer_forward.cpp)

// In inference, each direction's sweep projects its input a chunk of steps at a time:
// chunks of about this many rows (steps x batch), enough for the product to run at the
// speed of a large one (benchmarks/bench_step_gemm.py, the 'medium x W_ih^T (chunk)' row,
// 256 x 128 x 1024 on small_gemm: 163 GFLOP/s on an Intel Xeon, as the classic size's
// step products, 100 x 128 x 512, run there).
constexpr int64_t kInferenceChunkRows = 256;

// In training, whether each direction projects its own input on its thread, rather than
// one product over both directions (their W_ih copied side by side) before the sweeps:
// below oneDNN's threshold, where that product would be a BLAS call. The layer op at
// batch 1, T 28, H 128 took 91 us a call with the one product, 77 with a product per
// direction.
constexpr bool project_per_direction(int64_t T, int64_t B, int64_t D, int64_t H, int64_t I) {
  return T * B * D * 4 * H * I < kOnednnMinWork;
}

}  // namespace birnn::cpu_rules
