// Torch-free interface of the persistent sweeps (sweep_fwd.cu, sweep_bwd.cu): a layer's whole
// recurrence, forward or backward, both directions, in one launch. Serves the torch glue
// (lstm_cuda.cpp) and the host emulator (csrc/emu/), as lstm_kernels.h does.
//
// Both sweeps cut the hidden units the same way. Block (d, k) of D * ceil(H / units)
// blocks owns the hidden units [k units, (k + 1) units) of direction d and keeps the
// part of W_hh those units need in shared memory for the whole sweep:
//   forward   its 4 * units rows of W_hh (one per gate and unit), against the whole h of
//             the step before: the gates of its units;
//   backward  its units' columns of W_hh, against the whole dg of the step before:
//             dh_{t-1} = dg W_hh at its units, which then feed its units' cell backward.
// What one block needs from the others each step (h forward, dg backward) goes through
// global memory, staged tile by tile into shared memory, with a grid-wide barrier between
// steps; that needs every block resident at once (a cooperative launch). Where a block
// holds a whole direction (units >= H), the step barrier is the block's own and a plain
// launch runs every step. The host emulator runs the grid-barrier sweeps one step per
// launch, where the launch boundary is the barrier, and the one-block ones whole.
//
// The batch rows of a sequence never meet another's, so a plan may also cut the batch
// into `groups` of group_rows rows: the blocks of (d, k) are then repeated per group, each
// copy working on its group's rows alone, and the units' blocks of one group exchange h
// (dg) among themselves only. That puts more of the GPU's multiprocessors to work where
// one direction's blocks are few (a block per direction, a cluster per direction) and
// shrinks what each block stages per step to its group's rows. Block index: ((d * groups
// + group) * per_dir + k), so that a cluster of per_dir blocks is one (direction, group).
//
// A step's products (weight rows x staged batch rows, summed over the row of the step
// before) run on the CUDA cores (SIMT: each thread 4 batch rows x 2 weight rows) or, where
// the plan says so (mma_k > 0, sm_80 and later), on the tensor cores: one warp per 16
// weight rows x 8 batch rows through csrc/cuda/mma.cuh, TF32 for float32 storage, bf16 or
// f16 for those; the weight rows are then padded to a multiple of 16, the staged batch
// rows to a multiple of 8 and the row length to whole mma steps, all with zeros.
//
// Either kind may keep the block's weights in registers for the whole sweep where they
// fit (Products::registers), as persistent RNNs do, instead of reading them from shared
// memory every step: on the CUDA cores each thread then holds 2 weight rows over a slice
// of the row, and a step reads only the staged tile, 16 bytes at a time, the same address
// across the lanes of one batch row and slice (a broadcast). Per 8 float32 multiply-adds
// the shared-memory path issues 6 loads (2 weights, 4 tile entries), the register path
// one 16-byte load.
#pragma once

#include <algorithm>

#include "lstm_kernels.h"

namespace birnn::cuda {

constexpr int64_t kSweepThreads = 256;
// The most mma steps of weight fragments a warp keeps in registers (4 registers each).
constexpr int kRegSteps = 16;
// The bytes of weights a thread keeps in registers with SIMT products (64 registers):
// 2 rows of a slice of at most kRegSimtBytes / (2 * sizeof(math_t<T>)) entries.
constexpr int64_t kRegSimtBytes = 256;
__host__ __device__ constexpr int64_t simt_max_slice(int64_t math_bytes) { return kRegSimtBytes / (2 * math_bytes); }

// How a plan's step products run: on the tensor cores with mma_k (the K of one mma: 8
// TF32, 16 bf16 and f16) or on the CUDA cores (0); with the weights in registers for the
// whole sweep where they fit (`registers`), else read from shared memory every step.
struct Products {
  int64_t mma_k = 0;
  bool registers = false;
};

// How a sweep is cut: `units` hidden units per block, whose `rows` weight rows it keeps
// in shared memory ([rows][stride]); batch rows in tiles of `batch_tile`, each tile's h
// (or dg) staged in shared memory ([tile_rows][stride], rows past the tile zeros); each
// dot product summed in `lanes` parts (SIMT: a power of two up to 32 threads, so that
// small batches still keep the block's threads busy; mma: up to 8 slices of the row, one
// warp each; SIMT with registers: a slice of `slice` entries each, as many as the
// registers need, more up to 32 where threads are left), which land in shared memory
// (lane l of weight row r and batch row bb at bb part_batch_stride + r part_stride + l)
// for the cell update to add in a fixed order. The products
// read `kdim` entries of each row (the row's length, padded with zeros to whole mma steps
// on the tensor cores, to whole slices with SIMT registers).
struct SweepPlan {
  int64_t units = 0, batch_tile = 0, lanes = 0, blocks = 0;
  int64_t groups = 1, group_rows = 0;  // the batch cut into groups of group_rows rows (the last may have fewer)
  int64_t mma_k = 0;  // the K of one mma (8 TF32, 16 bf16 and f16), or 0: SIMT products
  // The weights in registers for the whole sweep. mma: each warp keeps its weight
  // fragments (its work items share one 16-row tile and slice, of at most kRegSteps mma
  // steps). SIMT: each thread keeps 2 rows over `slice` entries of the row and takes every
  // batch_lanes-th batch row of a tile (simt_register_cut).
  bool registers = false;
  int64_t slice = 0, batch_lanes = 0;
  int64_t rows = 0, tile_rows = 0, kdim = 0, stride = 0;
  int64_t part_stride = 0, part_batch_stride = 0;  // the partial sums' layout, both odd
  int64_t tile_offset = 0, part_offset = 0, shared_bytes = 0;
  int64_t own_offset = 0;  // the cluster sweeps' own h or dg, [2][group_rows][units or 4 units], after the rest
};

// The forward sweep of a layer without a projection.
template <typename T>
struct SweepFwd {
  int64_t T_, B, H, D, s_begin, s_end;  // runs the sweep steps [s_begin, s_end)
  SweepPlan plan;      // how the work is cut and where it lies in shared memory
  const int64_t* len;  // [B] or nullptr
  // Each direction's own weights where they lie (nn.LSTM's Parameters): no stacked copy.
  const T* w_hh[2];    // [4H,H] per direction
  const T* b_ih[2];    // [4H] per direction, or nullptr (no bias)
  const T* b_hh[2];    // [4H] per direction, or nullptr (no bias)
  T* xg;               // [T,B,D*4H] x W_ih^T; the activated gates are written back when training
  math_t<T>* c;        // [D,B,H] cell state, c0 in, c_n out
  const T* h0;         // [D,B,H] read by step 0
  T* h;                // [2,D,B,H] between the steps: step s > 0 reads h[s % 2], step s < T-1 writes h[(s + 1) % 2]
  T* h_n;              // [D,B,H] written by step T-1
  T* y;                // [T,B,D*H]
  math_t<T>* c_prev;   // [T,B,D*H] saved when training, else nullptr
  T* h_prev;           // [D,T,B,H] saved when training, else nullptr
};

// The backward sweep of a layer without a projection, in phases: phase q runs sweep step
// s = T - 1 - q (the steps in reverse); phase T only adds the last dg W_hh to dh, which
// makes dh0. Each phase first sums dh_{t} = dg_{t+1} W_hh at the block's units from the
// dg the previous phase wrote (none at phase 0), then runs their cell backward.
template <typename T>
struct SweepBwd {
  int64_t T_, B, H, D, q_begin, q_end;  // runs the phases [q_begin, q_end) of [0, T]
  SweepPlan plan;           // how the work is cut and where it lies in shared memory
  const int64_t* len;       // [B] or nullptr
  const T* w_hh[2];         // [4H,H] per direction
  const T* gates;           // [T,B,D*4H] activated, saved by the forward
  const math_t<T>* c_prev;  // [T,B,D*H] saved by the forward
  const T* dy;              // [T,B,D*H] or nullptr
  math_t<T>* dh;            // [D,B,H] carry: grad of h_n in, of h0 out
  math_t<T>* dc;            // [D,B,H] carry: grad of c_n in, of c0 out
  T* dg;                    // [D,T,B,4H] out: gradients of the gate pre-activations, time-ordered
  T* dg_step;               // [2,D,B,4H]: phase q reads dg_step[q % 2] and writes dg_step[(q + 1) % 2]
};

inline int64_t sweep_align(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// The weight rows a block holds: forward 4 * units rows of W_hh, backward the units'
// columns of W_hh, an even count (a SIMT work item takes two; the spare one of an odd
// count is zeros), and a multiple of 16 on the tensor cores (one mma's M).
__host__ __device__ inline int64_t sweep_rows(bool backward, int64_t units, bool mma) {
  const int64_t rows = backward ? (units + 1) / 2 * 2 : 4 * units;
  return mma ? (rows + 15) / 16 * 16 : rows;
}
// Their length, the dot products' length: H forward (against h), 4H backward (against dg).
__host__ __device__ inline int64_t sweep_width(bool backward, int64_t H) { return backward ? 4 * H : H; }

// The rows of a group where B rows are cut into at most `groups` groups.
inline int64_t sweep_group_rows(int64_t B, int64_t groups) {
  groups = groups < 1 ? 1 : groups < B ? groups : B;
  return groups > 1 ? (B + groups - 1) / groups : B;
}

// The cut of the SIMT products with the weights in registers (SweepPlan::registers,
// register_products): thread t holds weight rows r and r + P (P = rows / 2 pairs, r = t %
// P) over slice l of the row (l = t / (P F)), and takes every F-th batch row of a tile from
// row f (f = t / P % F, F batch lanes). The fewest slices the registers allow (at most
// simt_max_slice entries, whole 16-byte loads), as each is one more partial sum for the
// cell update to add; then as many batch lanes as the tile has quads of rows and the
// block has threads; then more slices for the threads left, up to 32. False where the
// pairs outnumber the threads or the slices do.
struct SimtRegisterCut {
  int64_t slice = 0, slices = 0, batch_lanes = 0;
};

inline bool simt_register_cut(int64_t rows, int64_t width, int64_t quads, int64_t elem_bytes, int64_t math_bytes,
                              SimtRegisterCut* cut) {
  const int64_t pairs = rows / 2, vec = vec_entries(elem_bytes), longest = simt_max_slice(math_bytes);
  if (pairs < 1 || quads < 1) return false;
  int64_t slices = (width + longest - 1) / longest;
  if (pairs * slices > kSweepThreads) return false;
  const int64_t lanes = std::min(quads, kSweepThreads / (pairs * slices));
  slices = std::max(slices, std::min({kSweepThreads / (pairs * lanes), int64_t(32), (width + vec - 1) / vec}));
  cut->slice = ((width + slices - 1) / slices + vec - 1) / vec * vec;  // at most `longest`, a multiple of vec
  cut->slices = (width + cut->slice - 1) / cut->slice;
  cut->batch_lanes = lanes;
  return true;
}

// `products`: on the tensor cores or the CUDA cores, with the weights in registers where
// they fit. `groups`: the batch cut into at most that many groups of rows, none empty.
inline SweepPlan sweep_plan(bool backward, int64_t H, int64_t B, int64_t D, int64_t units, int64_t batch_tile,
                            int64_t elem_bytes, int64_t math_bytes, Products products = {}, int64_t groups = 1) {
  const int64_t mma_k = products.mma_k;
  const bool registers = products.registers;
  SweepPlan pl;
  pl.units = units;
  pl.mma_k = mma_k;
  pl.group_rows = sweep_group_rows(B, groups);
  pl.groups = B > 0 ? (B + pl.group_rows - 1) / pl.group_rows : 1;
  pl.batch_tile = batch_tile < pl.group_rows ? batch_tile : pl.group_rows;
  pl.rows = sweep_rows(backward, units, mma_k > 0);
  const int64_t width = sweep_width(backward, H);
  SimtRegisterCut cut;
  if (mma_k == 0 && registers &&
      simt_register_cut(pl.rows, width, (pl.batch_tile + 3) / 4, elem_bytes, math_bytes, &cut)) {
    pl.registers = true;
    pl.slice = cut.slice;
    pl.batch_lanes = cut.batch_lanes;
    pl.lanes = cut.slices;  // a partial sum per slice
    pl.tile_rows = (pl.batch_tile + 3) / 4 * 4;
    pl.kdim = cut.slices * cut.slice;
    // Rows an odd number of 16-byte words apart: the batch lanes of a warp read
    // neighbouring rows at the same column, which then fall on different banks (and the
    // rows stay 16-byte aligned for the loads). Lanes of one row pair and slice read the
    // same address: a broadcast.
    const int64_t vec = vec_entries(elem_bytes);
    pl.stride = pl.kdim / vec % 2 ? pl.kdim : pl.kdim + vec;
  } else if (mma_k == 0) {
    // A thread's work item: 4 batch rows x 2 weight rows, in one lane of the dot products.
    const int64_t quads = (pl.batch_tile + 3) / 4, items = quads * (pl.rows / 2);
    pl.lanes = 1;
    while (pl.lanes < 32 && items * pl.lanes * 2 <= kSweepThreads) pl.lanes *= 2;
    pl.tile_rows = 4 * quads;
    pl.kdim = width;
    pl.stride = width + 1;  // an odd stride: a row apart is a bank apart
  } else {
    // A warp's work item: 16 weight rows x 8 batch rows over one slice of the row; slices
    // while the items do not yet fill the block's warps and each slice keeps a whole mma
    // step of the row.
    const int64_t octs = (pl.batch_tile + 7) / 8, row_tiles = pl.rows / 16, warps = kSweepThreads / 32;
    pl.lanes = 1;
    while (pl.lanes < 8 && row_tiles * octs * pl.lanes < warps && width > mma_k * pl.lanes) pl.lanes *= 2;
    // The weights in registers, as persistent RNNs keep them: where the (tile, slice) pairs
    // divide the warps, warp w's items all have pair w % pairs (items go pair-fastest);
    // more slices while a slice has more than kRegSteps mma steps and the pairs still fit.
    auto steps = [&](int64_t lanes) { return (width + mma_k * lanes - 1) / (mma_k * lanes); };
    int64_t lanes = pl.lanes;
    while (lanes < 8 && row_tiles * lanes * 2 <= warps && steps(lanes) > kRegSteps) lanes *= 2;
    if (registers && warps % (row_tiles * lanes) == 0 && steps(lanes) <= kRegSteps) {
      pl.lanes = lanes;
      pl.registers = true;
    }
    pl.tile_rows = 8 * octs;
    pl.kdim = (width + mma_k * pl.lanes - 1) / (mma_k * pl.lanes) * (mma_k * pl.lanes);
    // Rows kdim + 4 words apart (kdim is whole 8-word steps): the 8 x 4 lanes of a fragment
    // load (row lane / 4, word lane % 4) then reach 32 different banks.
    pl.stride = pl.kdim + 4 * 4 / elem_bytes;
  }
  // The cell update's threads, a unit each, read the partial sums of neighbouring weight
  // rows, and those of the next batch row after the block's last unit: both strides odd,
  // so that a warp's reads fall on different banks (with a power-of-two count of lanes,
  // rows `lanes` apart would share a bank every 32 / lanes threads).
  pl.part_stride = pl.lanes | 1;
  pl.part_batch_stride = pl.rows * pl.part_stride | 1;
  pl.blocks = D * pl.groups * ((H + units - 1) / units);
  pl.tile_offset = sweep_align(pl.rows * pl.stride * elem_bytes);
  pl.part_offset = pl.tile_offset + sweep_align(pl.tile_rows * pl.stride * elem_bytes);
  pl.shared_bytes = pl.part_offset + sweep_align(pl.batch_tile * pl.part_batch_stride * math_bytes);
  return pl;
}

// The blocks that share one direction's units for one group of rows (a cluster's size).
inline int64_t sweep_blocks_per_direction(const SweepPlan& pl, int64_t D) { return pl.blocks / (D * pl.groups); }

// Whether a grid sweep's steps need the grid barrier, and so a cooperative launch: several
// blocks share a direction's units.
inline bool sweep_is_cooperative(const SweepPlan& pl, int64_t D) { return sweep_blocks_per_direction(pl, D) > 1; }

// The plan with `units` units per block, the batch in `groups`, and the largest batch
// tile that fits `max_shared` bytes, with `own_bytes_per_row` more per row of a group (the
// cluster sweeps' own rows, two steps deep); false where not even one row fits.
inline bool fit_batch_tile(bool backward, int64_t H, int64_t B, int64_t D, int64_t units, int64_t elem_bytes,
                           int64_t math_bytes, Products products, int64_t own_bytes_per_row, int64_t max_shared,
                           SweepPlan* out, int64_t groups = 1) {
  for (int64_t tile = sweep_group_rows(B, groups); tile >= 1; tile = tile > 64 ? tile * 3 / 4 : tile - 1) {
    SweepPlan pl = sweep_plan(backward, H, B, D, units, tile, elem_bytes, math_bytes, products, groups);
    pl.own_offset = pl.shared_bytes;
    pl.shared_bytes += sweep_align(pl.group_rows * own_bytes_per_row);
    if (pl.shared_bytes <= max_shared) {
      *out = pl;
      return true;
    }
  }
  return false;
}

// Units per block on the tensor cores come in fours (16 forward weight rows, one mma's M;
// the backward's rows are padded to 16 instead), at most H.
inline int64_t mma_units(int64_t units, int64_t H, int64_t mma_k) {
  if (mma_k == 0) return units;
  units = (units + 3) / 4 * 4;
  return units < H ? units : H;
}

// The plan for a GPU that keeps at most `max_blocks` blocks resident with at most
// `max_shared` bytes each: the fewest units per block that fit the blocks (spreading
// the work over as many as there are), then the largest batch tile that fits the
// shared memory. Returns false where nothing fits (the weight rows too long).
// `products`: how the step products run (Products).
inline bool choose_sweep_plan(bool backward, int64_t H, int64_t B, int64_t D, int64_t elem_bytes, int64_t math_bytes,
                              Products products, int64_t max_blocks, int64_t max_shared, SweepPlan* out) {
  if (H <= 0 || B <= 0 || D <= 0 || max_blocks < D) return false;
  int64_t units = (D * H + max_blocks - 1) / max_blocks;
  while (D * ((H + units - 1) / units) > max_blocks) ++units;
  units = mma_units(units, H, products.mma_k);
  return fit_batch_tile(backward, H, B, D, units, elem_bytes, math_bytes, products, 0, max_shared, out);
}

// The plan that gives each direction one block per group of batch rows (units = H, the
// largest batch tile that fits), or false where W_hh's share does not fit one block's
// shared memory.
inline bool choose_block_sweep_plan(bool backward, int64_t H, int64_t B, int64_t D, int64_t elem_bytes,
                                    int64_t math_bytes, Products products, int64_t max_shared, SweepPlan* out,
                                    int64_t groups = 1) {
  if (H <= 0 || B <= 0 || D <= 0) return false;
  return fit_batch_tile(backward, H, B, D, H, elem_bytes, math_bytes, products, 0, max_shared, out, groups);
}

// A sweep with a thread-block cluster per direction and group of batch rows (sm_90): at
// most `cluster` blocks share a direction's units, and each keeps its units' part of the
// row the others need next (h forward; dg backward, 4 gates per unit) for the last two
// steps, all of its group's rows, in its shared memory, where the others read it
// (distributed shared memory) instead of through global memory; the cluster barrier
// replaces the grid's. False where nothing fits.
inline bool choose_cluster_sweep_plan(bool backward, int64_t H, int64_t B, int64_t D, int64_t elem_bytes,
                                      int64_t math_bytes, Products products, int64_t cluster, int64_t max_shared,
                                      SweepPlan* out, int64_t groups = 1) {
  if (H <= 0 || B <= 0 || D <= 0 || cluster < 1) return false;
  const int64_t units = mma_units((H + cluster - 1) / cluster, H, products.mma_k);
  return fit_batch_tile(backward, H, B, D, units, elem_bytes, math_bytes, products,
                        2 * (backward ? 4 : 1) * units * elem_bytes, max_shared, out, groups);
}

// Each returns the launch's error (cudaSuccess where it went): cudaErrorNotSupported for
// a plan with tensor-core products in float64. `cooperative` launches all the steps
// (phases) of p at once with the grid barrier (a cooperative launch); otherwise p must
// hold one step, or the plan one block per direction.
template <typename T>
cudaError_t launch_sweep_fwd(const SweepFwd<T>& p, bool cooperative, cudaStream_t stream);
template <typename T>
cudaError_t launch_sweep_bwd(const SweepBwd<T>& p, bool cooperative, cudaStream_t stream);
// Every step of p with a cluster of ceil(H / units) blocks per direction (a plan with
// own_offset); GPU of compute capability 9.0 or later.
template <typename T>
cudaError_t launch_sweep_fwd_cluster(const SweepFwd<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_sweep_bwd_cluster(const SweepBwd<T>& p, cudaStream_t stream);
#if !defined(BIRNN_EMU)
// Whether the device keeps all of the plan's blocks resident at once (what a cooperative
// launch needs); sets the kernel's shared-memory limit to the plan's on the way.
template <typename T>
bool sweep_fwd_fits(const SweepPlan& plan, bool training, int multiprocessors);
template <typename T>
bool sweep_bwd_fits(const SweepPlan& plan, int multiprocessors);
// How many of the plan's clusters the device runs at once (0: none; sets the kernel's
// shared-memory limit and cluster size on the way).
template <typename T>
int64_t sweep_fwd_clusters(const SweepPlan& plan, bool training, int64_t D);
template <typename T>
int64_t sweep_bwd_clusters(const SweepPlan& plan, int64_t D);
#endif

}  // namespace birnn::cuda
