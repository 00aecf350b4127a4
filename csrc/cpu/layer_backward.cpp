// The CPU kernel of lstm_layer_backward. Per step, the fused cell backward (cell_rows.h)
// and dh = dg W_hh; the sweep skips the steps no gradient has reached. The input and
// weight gradients, each where asked, are GEMMs over row blocks (fixed_order.h), taken
// by whichever thread is free as soon as the sweep has written their rows (BlockWork).
// Storage float32, float64 or bfloat16; the math and the cell state in math_t.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "../layer_checks.h"
#include "../lstm_cell.h"
#include "bf16_bits.h"
#include "blas.h"
#include "buffer_pool.h"
#include "cell_rows.h"
#include "dispatch_rules.h"
#include "fixed_order.h"
#include "float16.h"
#include "kernel_util.h"

namespace birnn {
namespace {

// The rows of one direction's dg, cut into blocks for the weight-gradient GEMMs. The cut
// depends on the row range alone, so each block's product, and the order in which the
// blocks are summed, are the same for any thread count: the same bits come out.
// The block sizes: dispatch_rules.h (kGradBlockMinRows, kGradMaxBlocks).
struct RowBlocks {
  int64_t begin = 0, end = 0, size = 1, count = 0;
  static RowBlocks over(int64_t begin, int64_t end) {
    RowBlocks r;
    r.begin = begin;
    r.end = std::max(begin, end);
    const int64_t K = r.end - r.begin;
    if (K == 0) return r;
    r.size = std::max(cpu_rules::kGradBlockMinRows, (K + cpu_rules::kGradMaxBlocks - 1) / cpu_rules::kGradMaxBlocks);
    r.count = (K + r.size - 1) / r.size;
    return r;
  }
  static int64_t max_count(int64_t rows) {
    return std::min(cpu_rules::kGradMaxBlocks,
                    (rows + cpu_rules::kGradBlockMinRows - 1) / cpu_rules::kGradBlockMinRows);
  }
  int64_t first(int64_t i) const { return begin + i * size; }
  int64_t last(int64_t i) const { return std::min(end, first(i) + size); }  // one past
};

// What the threads of one layer backward share. Each direction's sweep publishes its
// row blocks once it knows which rows it will write (at its first live step), then how
// far it has come; every thread whose own sweep is done takes the blocks whose dg rows
// are final. So the weight gradients of a direction are computed while its sweep still
// runs, on a core that would otherwise wait: in a many-to-one model's top layer, the
// reverse direction has almost nothing to sweep.
struct BlockWork {
  struct Direction {
    std::atomic<bool> planned{false};  // blocks and dx_here are set
    std::atomic<int64_t> progress{0};  // every sweep step >= progress is done
    RowBlocks blocks;
    bool dx_here = false;  // every row is live: the blocks also write their rows of dg W_ih (see below)
    std::array<std::atomic<bool>, cpu_rules::kGradMaxBlocks> taken;
  };
  std::array<Direction, 2> dir;
  std::atomic<bool> failed{false};  // a worker threw: the others stop waiting for it
  BlockWork() {
    for (auto& d : dir)
      for (auto& t : d.taken) t.store(false, std::memory_order_relaxed);
  }
};

template <typename T>
struct BwdParams {
  LayerDims n;
  const int64_t* len;                 // [B] or nullptr
  std::array<StepWeight, 2> w_hh;     // [4H,P] per direction, ready for the step products
  std::array<StepWeight, 2> w_hr;     // [P,H] per direction, empty without a projection
  T* dh;                              // [D,B,P] grad of h_n on entry, of h0 on exit
  T* dg_step;                         // [D,B,4H] scratch: dg of one step, for the recurrent GEMM
  T* dh_proj;                         // [D,B,P] scratch with a projection: total grad of h at one step
  T* dh_raw;                          // [D,B,H] scratch with a projection: dh_proj W_hr
  const T* gates;                     // [T,B,D*4H] activated
  const math_t<T>* c_prev;            // [T,B,D*H]
  const T* dy;                        // [T,B,D*P] or nullptr
  math_t<T>* dc;                      // [D,B,H] grad of c_n on entry, of c0 on exit
  T* dg;                              // [D,T,B,4H] out: grads of the gate pre-activations, time-ordered
  T* dh_proj_saved;                   // [D,T,B,P] out with a projection, for dW_hr
  T* dbias;                           // [D,4H] out: the sum of every step's dg rows
  // For the skip of steps with zero gradients (backward_direction): the values that
  // nn.LSTM would multiply by those zeros, which must be finite for the products to be zero.
  const T* x;                         // [T,B,I] the layer's input
  const T* h_prev;                    // [D,T,B,P]
  const T* h_raw;                     // [D,T,B,H] with a projection, else nullptr
  std::array<const T*, 2> w_ih;       // [4H,I] per direction
  BlockWork* work;                    // shared with the threads that take the weight-gradient blocks
  bool input_grad;                    // dx wanted
  bool weight_grads;                  // dW_ih, dW_hh (and dW_hr) wanted
};

// A step of the backward sweep whose gradients are all zero: the carried dh and dc
// are zero, and so is dy at every row the step reads. Its dg is then zero too, and
// its dh_{t-1} and dc_{t-1} stay zero, provided that the saved gates and cell states
// it would multiply by those zeros are finite (0 * NaN is NaN, as nn.LSTM computes it).
template <typename T>
bool step_has_zero_grads(const BwdParams<T>& p, int64_t d, int64_t s) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = p.len ? p.len[b] : T_;
    if (s >= L) continue;  // padding: nothing flows through it
    const int64_t row = time_index(int(d), s, L) * B + b;
    if (p.dy && !all_zero(p.dy + row * D * P + d * P, P)) return false;
    if (!all_finite(p.gates + row * D * G + d * G, G) || !all_finite(p.c_prev + row * D * H + d * H, H)) return false;
  }
  return true;
}


// Called by a direction's sweep at its first live step (or at its end, when every step
// was skipped): steps past last_live will never be written. Decides the rows the
// weight-gradient GEMMs read, zeroes the skipped rows among them, and publishes the
// blocks.
template <typename T>
void plan_blocks(const BwdParams<T>& p, int64_t d, int64_t last_live) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr[d].defined();
  // The times [t0, t1) that hold every row a live step wrote; dead rows inside are
  // zeroed below. (time_index maps steps to times, and times back to steps.)
  auto length = [&](int64_t b) { return p.len ? p.len[b] : T_; };
  int64_t t0 = T_, t1 = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s <= last_live; ++s) {
      const int64_t t = time_index(int(d), s, length(b));
      t0 = std::min(t0, t), t1 = std::max(t1, t + 1);
    }
  // Rows outside [t0, t1) are left out of the GEMMs. nn.LSTM multiplies their zero dg
  // by x, h_prev (and h_raw) for the weight gradients: where one of those is not finite,
  // the product is NaN, so the GEMMs then read every row.
  auto outside_finite = [&](const T* m, int64_t width) {
    return all_finite(m, t0 >= t1 ? T_ * B * width : t0 * B * width) &&
           (t0 >= t1 || all_finite(m + t1 * B * width, (T_ - t1) * B * width));
  };
  if (p.weight_grads && (!outside_finite(p.x, I) || !outside_finite(p.h_prev + d * T_ * B * P, P) ||
                        (proj && !outside_finite(p.h_raw + d * T_ * B * H, H))))
    t0 = 0, t1 = T_;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t b = 0; b < B; ++b) {
      if (time_index(int(d), t, length(b)) <= last_live) continue;
      std::memset(p.dg + (d * T_ * B + t * B + b) * G, 0, G * sizeof(T));
      if (proj) std::memset(p.dh_proj_saved + (d * T_ * B + t * B + b) * P, 0, P * sizeof(T));
    }
  BlockWork::Direction& work = p.work->dir[d];
  const bool products = p.input_grad || p.weight_grads;  // else only dh0 and dc0 (and dbias) are asked
  work.blocks = t0 < t1 && products ? RowBlocks::over(t0 * B, t1 * B) : RowBlocks::over(0, 0);
  work.dx_here = p.input_grad && t0 == 0 && t1 == T_;
  work.progress.store(last_live + 1, std::memory_order_relaxed);
  work.planned.store(true, std::memory_order_release);
}

template <typename T>
void backward_direction(const BwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr[d].defined();
  T* dh = p.dh + d * B * P;
  math_t<T>* dc = p.dc + d * B * H;
  T* dg_step = p.dg_step + d * B * G;
  std::vector<math_t<T>> dbias(G, 0);
  T* dh_proj = proj ? p.dh_proj + d * B * P : nullptr;
  T* dh_raw = proj ? p.dh_raw + d * B * H : nullptr;
  p.w_hh[d].pack();
  p.w_hr[d].pack();
  // The sweep starts with the last step. Where no loss term reaches the first steps it
  // meets (the reverse direction of a many-to-one model's top layer gets a gradient
  // only at its own first step, the sweep's last), those steps are skipped: no cell, no
  // GEMM, their dg rows not even written. Only while every weight is finite: each
  // skipped product with them would be zero times a weight. The weights are read for
  // that only where the sweep's first step can be skipped: a loss on every output leaves
  // nothing to skip, and the read is no small thing (312 KB a direction at I 28, H 128;
  // W_hh alone 4 MB at H 512).
  bool zeros_so_far = all_zero(dh, B * P) && all_zero(dc, B * H) && step_has_zero_grads(p, d, T_ - 1) &&
                      all_finite(p.w_ih[d], G * I) && all_finite(static_cast<const T*>(p.w_hh[d].data), G * P) &&
                      (!proj || all_finite(static_cast<const T*>(p.w_hr[d].data), P * H));
  int64_t last_live = T_ - 1;  // steps past it were skipped
  BlockWork::Direction& work = p.work->dir[d];
  for (int64_t s = T_ - 1; s >= 0; --s) {
    if (zeros_so_far) {
      if (step_has_zero_grads(p, d, s)) {
        last_live = s - 1;
        continue;
      }
      zeros_so_far = false;
    }
    if (!work.planned.load(std::memory_order_relaxed)) plan_blocks(p, d, last_live);
    if (proj) {
      // The total gradient of this step's h (carried + output), then through W_hr.
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = p.len ? p.len[b] : T_;
        const int64_t row = time_index(int(d), s, L) * B + b;
        T* out = p.dh_proj_saved + (d * T_ * B + row) * P;
        if (s >= L) {
          std::memset(dh_proj + b * P, 0, P * sizeof(T));
          std::memset(out, 0, P * sizeof(T));
          continue;
        }
        const T* dy = p.dy ? p.dy + row * D * P + d * P : nullptr;
        for (int64_t k = 0; k < P; ++k) {
          dh_proj[b * P + k] = T(math_t<T>(dh[b * P + k]) + (dy ? math_t<T>(dy[k]) : math_t<T>(0)));
          dh[b * P + k] = T(0);  // refilled with dg W_hh below
        }
        std::memcpy(out, dh_proj + b * P, P * sizeof(T));
      }
      step_product<T>(Mat<const T>::dense(dh_proj, B, P), p.w_hr[d], Mat<T>::dense(dh_raw, B, H), T(0));
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = p.len ? p.len[b] : T_;
      const int64_t row = time_index(int(d), s, L) * B + b;
      T* dg = p.dg + (d * T_ * B + row) * G;
      if (s >= L) {  // padding: the state's gradient passes through unchanged
        std::memset(dg, 0, G * sizeof(T));
        std::memset(dg_step + b * G, 0, G * sizeof(T));
        continue;
      }
      const T* gates = p.gates + row * D * G + d * G;
      const math_t<T>* c_prev = p.c_prev + row * D * H + d * H;
      if (proj)
        cell_backward_row<T>(H, gates, c_prev, nullptr, dh_raw + b * H, dc + b * H, dg, dg_step + b * G);
      else
        cell_backward_row<T>(H, gates, c_prev, p.dy ? p.dy + row * D * H + d * H : nullptr, dh + b * H, dc + b * H,
                             dg, dg_step + b * G);
    }
    work.progress.store(s, std::memory_order_release);  // this step's dg rows are final
    // dh_{t-1} = dg W_hh for the sequences that stepped; padded rows of dg_step are
    // zero, so their carried gradient is left as it was.
    step_product<T>(Mat<const T>::dense(dg_step, B, G), p.w_hh[d], Mat<T>::dense(dh, B, P), T(1));
    // The bias gradient, while the step's rows are in cache: in a fixed order (steps
    // descending, rows ascending), so the same bits for any thread count.
    for (int64_t b = 0; b < B; ++b) add_row(G, dg_step + b * G, dbias.data());
  }
  for (int64_t k = 0; k < G; ++k) p.dbias[d * G + k] = T(dbias[k]);

  if (!work.planned.load(std::memory_order_relaxed)) plan_blocks(p, d, last_live);  // every step was skipped
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
                        const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x_,
                        const std::optional<at::Tensor>& lengths, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                        const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& w_ih_reverse,
                        const std::optional<at::Tensor>& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
                        const at::Tensor& gates_, const at::Tensor& c_prev_,
                        const at::Tensor& h_prev_, const at::Tensor& h_raw_, bool input_grad, bool weight_grads) {
  const BelowAutograd below_autograd;
  const LayerWeights wts = layer_weights("lstm_layer_backward", w_ih_, w_hh_, std::nullopt, std::nullopt, w_hr_,
                                         w_ih_reverse, w_hh_reverse, std::nullopt, std::nullopt, w_hr_reverse);
  const LayerDims n = check_layer_backward(grad_y, grad_h_n, grad_c_n, x_, wts, gates_, c_prev_, h_prev_, h_raw_);
  if (float16::is(x_)) {
    using float16::widen, float16::narrow;
    auto [dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr] = lstm_layer_backward_cpu(
        widen(grad_y), widen(grad_h_n), widen(grad_c_n), widen(x_), lengths, widen(w_ih_), widen(w_hh_), widen(w_hr_),
        widen(w_ih_reverse), widen(w_hh_reverse), widen(w_hr_reverse), widen(gates_), c_prev_, widen(h_prev_),
        widen(h_raw_), input_grad, weight_grads);
    return {narrow(dx), narrow(dh0), narrow(dc0), narrow(dw_ih), narrow(dw_hh), narrow(dbias), narrow(dw_hr)};
  }
  const auto [T_, B, I, H, P, D] = n;
  const bool proj = wts.proj();
  const at::Tensor len = checked_lengths("lstm_layer_backward", lengths, T_, B);

  const at::Tensor x = contiguous(x_), h_raw = proj ? contiguous(h_raw_) : at::Tensor();
  const Weights w_ih = weights(wts.w_ih), w_hh = weights(wts.w_hh), w_hr = weights(wts.w_hr);
  const at::Tensor gates = contiguous(gates_), c_prev = contiguous(c_prev_), h_prev = contiguous(h_prev_);
  // grad_y is often a view (a transpose for batch_first, a gradient scattered into zeros).
  const at::Tensor dy = grad_y ? contiguous(*grad_y) : at::Tensor();
  auto opt = x.options();
  at::Tensor dh = grad_h_n ? grad_h_n->clone(at::MemoryFormat::Contiguous) : pooled_zeros({D, B, P}, opt);
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  at::Tensor dc = grad_c_n ? grad_c_n->to(mopt, false, true).contiguous() : pooled_zeros({D, B, H}, mopt);
  at::Tensor dx = input_grad ? pooled_empty({T_, B, I}, opt) : pooled_empty({0}, opt);
  // The weight matrices' gradients: empty when not asked (the op's weight_grad).
  auto weight_out = [&](at::IntArrayRef sizes) {
    return weight_grads ? pooled_empty(sizes, opt) : pooled_empty({0}, opt);
  };
  at::Tensor dw_ih = weight_out({D, 4 * H, I});
  at::Tensor dw_hh = weight_out({D, 4 * H, P});
  at::Tensor dbias = pooled_empty({D, 4 * H}, opt);
  at::Tensor dw_hr = weight_out({proj ? D : 0, P, H});
  if (B == 0) {
    dw_ih.zero_(), dw_hh.zero_(), dbias.zero_(), dw_hr.zero_();
    return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias, dw_hr};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t G = 4 * H, rows = T_ * B;
    // Scratch: the gate gradients dg [D,rows,G] and a step's [D,B,G]; with a projection
    // dh_proj of every step [D,rows,P] and of one [D,B,P], dh_raw [D,B,H]; per direction
    // and block of rows, the block's share of dW_ih [D,blocks,G,I], dW_hh [D,blocks,G,P]
    // (and dW_hr [D,blocks,P,H]); the reverse direction's share of dx, dg[1] W_ih[1]
    // [rows,I], where its blocks write it; the packed weights.
    const int64_t max_blocks = RowBlocks::max_count(rows);
    Scratch scratch;
    const size_t at_dg = scratch.reserve<T>(D * rows * G), at_dg_step = scratch.reserve<T>(D * B * G);
    const size_t at_dh_proj_saved = scratch.reserve<T>(proj ? D * rows * P : 0);
    const size_t at_dh_proj = scratch.reserve<T>(proj ? D * B * P : 0);
    const size_t at_dh_raw = scratch.reserve<T>(proj ? D * B * H : 0);
    const int64_t part_blocks = weight_grads ? D * max_blocks : 0;
    const size_t at_part_ih = scratch.reserve<T>(part_blocks * G * I);
    const size_t at_part_hh = scratch.reserve<T>(part_blocks * G * P);
    const size_t at_part_hr = scratch.reserve<T>(proj ? part_blocks * P * H : 0);
    const size_t at_dx_reverse = scratch.reserve<T>(input_grad && D == 2 ? rows * I : 0);
    // bfloat16 whose large products run as float32 GEMMs (blas.h, on processors with slow
    // bfloat16 dot products): the blocks' products in float32 (run_block_float32), with
    // W_ih [D,G,I] widened once for them.
    const bool blocks_in_float32 = std::is_same_v<T, at::BFloat16> && bf16_large_products_in_float32();
    const size_t at_w_ih32 = scratch.reserve<float>(blocks_in_float32 && input_grad ? D * G * I : 0);
    BwdParams<T> p{};
    for (int64_t d = 0; d < D; ++d) {
      p.w_hh[d] = StepWeight::as_is(w_hh[d], T_, B);
      if (proj) p.w_hr[d] = StepWeight::as_is(w_hr[d], T_, B);
      p.w_hh[d].reserve(scratch);
      p.w_hr[d].reserve(scratch);
    }
    scratch.allocate();
    for (int64_t d = 0; d < D; ++d) {
      p.w_hh[d].place(scratch);
      p.w_hr[d].place(scratch);
    }
    p.n = n;
    p.len = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    p.dh = dh.data_ptr<T>();
    p.dg_step = scratch.get<T>(at_dg_step);
    p.dh_proj = proj ? scratch.get<T>(at_dh_proj) : nullptr;
    p.dh_raw = proj ? scratch.get<T>(at_dh_raw) : nullptr;
    p.gates = gates.data_ptr<T>();
    p.c_prev = c_prev.data_ptr<math_t<T>>();
    p.dy = dy.defined() ? dy.data_ptr<T>() : nullptr;
    p.dc = dc.data_ptr<math_t<T>>();
    p.dg = scratch.get<T>(at_dg);
    p.dh_proj_saved = proj ? scratch.get<T>(at_dh_proj_saved) : nullptr;
    p.dbias = dbias.data_ptr<T>();
    p.x = x.data_ptr<T>();
    p.h_prev = h_prev.data_ptr<T>();
    p.h_raw = proj ? h_raw.data_ptr<T>() : nullptr;
    for (int64_t d = 0; d < D; ++d) p.w_ih[d] = w_ih[d].data_ptr<T>();
    float* const w_ih32 = blocks_in_float32 && input_grad ? scratch.get<float>(at_w_ih32) : nullptr;
    if (w_ih32)
      for (int64_t d = 0; d < D; ++d)
        bf16_to_float(reinterpret_cast<const uint16_t*>(p.w_ih[d]), G * I, w_ih32 + d * G * I);
    BlockWork work;
    p.work = &work;
    p.input_grad = input_grad;
    p.weight_grads = weight_grads;
    // The blocks' operands by pointer: rows r0 .. r0+k of direction d's [rows, width]
    // slab of a [D, rows, width] buffer (or of x, which the directions share), and
    // block i's [n_rows, n_cols] output: dW itself, or the block's share of it.
    T* const dw_ih_p = dw_ih.data_ptr<T>();
    T* const dw_hh_p = dw_hh.data_ptr<T>();
    T* const dw_hr_p = proj ? dw_hr.data_ptr<T>() : nullptr;
    T* const part_ih_p = scratch.get<T>(at_part_ih);
    T* const part_hh_p = scratch.get<T>(at_part_hh);
    T* const part_hr_p = proj ? scratch.get<T>(at_part_hr) : nullptr;
    T* const dx_p[2] = {input_grad ? dx.data_ptr<T>() : nullptr,
                        input_grad && D == 2 ? scratch.get<T>(at_dx_reverse) : nullptr};
    auto slab = [&](const T* base, int64_t d, int64_t width, int64_t r0, int64_t k) {
      return Mat<const T>::dense(base + (d * rows + r0) * width, k, width);
    };
    auto out = [&](T* dw, T* parts, int64_t d, int64_t i, int64_t count, int64_t n_rows, int64_t n_cols) {
      // A direction's only block writes its dW directly: there is nothing to sum.
      T* at = count == 1 ? dw + d * n_rows * n_cols : parts + (d * max_blocks + i) * n_rows * n_cols;
      return Mat<T>::dense(at, n_rows, n_cols);
    };
    // A block's operands widened once, not once per product (its dg enters two or three),
    // each result rounded once into its bfloat16 output.
    auto run_block_float32 = [&](int64_t d, int64_t i) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        const BlockWork::Direction& w = work.dir[d];
        const int64_t r0 = w.blocks.first(i), k = w.blocks.last(i) - r0, count = w.blocks.count;
        const at::Tensor buf = pooled_empty({k * (G + I + P) + G * std::max(I, P) + (w.dx_here ? k * I : 0)},
                                            at::TensorOptions().dtype(at::kFloat));
        float* const dg32 = buf.data_ptr<float>();
        float* const x32 = dg32 + k * G;
        float* const h32 = x32 + k * I;
        float* const out32 = h32 + k * P;
        float* const dx32 = out32 + G * std::max(I, P);
        auto widen = [](const T* src, int64_t n, float* dst) {
          bf16_to_float(reinterpret_cast<const uint16_t*>(src), n, dst);
        };
        auto round_into = [](const float* src, int64_t n, T* dst) {
          float_to_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
        };
        widen(slab(p.dg, d, G, r0, k).data, k * G, dg32);
        const Mat<const float> dg_rows = Mat<const float>::dense(dg32, k, G);
        if (p.weight_grads) {
          widen(slab(p.x, 0, I, r0, k).data, k * I, x32);
          widen(slab(p.h_prev, d, P, r0, k).data, k * P, h32);
          weight_grad<float>(dg_rows, Mat<const float>::dense(x32, k, I), Mat<float>::dense(out32, G, I));
          round_into(out32, G * I, out(dw_ih_p, part_ih_p, d, i, count, G, I).data);
          weight_grad<float>(dg_rows, Mat<const float>::dense(h32, k, P), Mat<float>::dense(out32, G, P));
          round_into(out32, G * P, out(dw_hh_p, part_hh_p, d, i, count, G, P).data);
          if (proj)
            weight_grad<T>(slab(p.dh_proj_saved, d, P, r0, k), slab(p.h_raw, d, H, r0, k),
                           out(dw_hr_p, part_hr_p, d, i, count, P, H));
        }
        if (w.dx_here) {
          matmul<float>(dg_rows, Mat<const float>::dense(w_ih32 + d * G * I, G, I), Mat<float>::dense(dx32, k, I),
                        0.f);
          round_into(dx32, k * I, dx_p[d] + r0 * I);
        }
      }
    };
    auto run_block = [&](int64_t d, int64_t i) {
      if (!p.weight_grads && !work.dir[d].dx_here) return;  // dx is left to the end (below)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (blocks_in_float32) return run_block_float32(d, i);
      }
      const BlockWork::Direction& w = work.dir[d];
      const int64_t r0 = w.blocks.first(i), k = w.blocks.last(i) - r0, count = w.blocks.count;
      const Mat<const T> dg_rows = slab(p.dg, d, G, r0, k);
      if (p.weight_grads) {
        weight_grad<T>(dg_rows, slab(p.x, 0, I, r0, k), out(dw_ih_p, part_ih_p, d, i, count, G, I));
        weight_grad<T>(dg_rows, slab(p.h_prev, d, P, r0, k), out(dw_hh_p, part_hh_p, d, i, count, G, P));
        if (proj)
          weight_grad<T>(slab(p.dh_proj_saved, d, P, r0, k), slab(p.h_raw, d, H, r0, k),
                         out(dw_hr_p, part_hr_p, d, i, count, P, H));
      }
      if (w.dx_here)
        matmul<T>(dg_rows, Mat<const T>::dense(p.w_ih[d], G, I), Mat<T>::dense(dx_p[d] + r0 * I, k, I), T(0));
    };
    // A block is ready once the sweep has written all of its rows. The forward direction
    // writes time s at step s; the reverse one time T-1-s, or, with lengths, a time that
    // differs per sequence: its blocks wait for the end of the sweep.
    auto ready = [&](int64_t d, int64_t i) {
      const BlockWork::Direction& w = work.dir[d];
      const int64_t done = w.progress.load(std::memory_order_acquire);
      if (done == 0) return true;
      if (d == 1 && p.len) return false;
      const int64_t t_first = w.blocks.first(i) / B, t_last = (w.blocks.last(i) - 1) / B;
      return d == 0 ? t_first >= done : T_ - 1 - t_last >= done;
    };
    // Takes ready blocks until every direction has published its blocks and all are taken.
    auto take_blocks = [&]() {
      while (!work.failed.load(std::memory_order_relaxed)) {
        bool left = false, ran = false;
        for (int64_t d = 0; d < D; ++d) {
          BlockWork::Direction& w = work.dir[d];
          if (!w.planned.load(std::memory_order_acquire)) {
            left = true;
            continue;
          }
          for (int64_t i = 0; i < w.blocks.count; ++i) {
            if (w.taken[i].load(std::memory_order_relaxed)) continue;
            if (!ready(d, i) || w.taken[i].exchange(true, std::memory_order_acq_rel)) {
              left = true;
              continue;
            }
            run_block(d, i);
            ran = true;
          }
        }
        if (!left) return;
        if (!ran) std::this_thread::yield();
      }
    };
    // One worker per direction sweeps it, then takes blocks; further threads only take
    // blocks. A thread given several workers (a single thread, or a nested call) runs
    // all its sweeps first, so it never waits on a sweep queued behind it.
    // A small layer (cpu_rules::kMinMacsPerThread) runs on the calling thread alone.
    const bool one_thread = T_ * B * G * (I + P + (proj ? H : 0)) < cpu_rules::kMinMacsPerThread;
    const int64_t workers =
        one_thread ? D : std::max<int64_t>(D, std::min<int64_t>(at::get_num_threads(), D * (1 + max_blocks)));
    auto run_workers = [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < std::min(w1, D); ++w) backward_direction<T>(p, w);
      take_blocks();
    };
    if (one_thread) {
      on_this_thread([&] { run_workers(0, workers); });
    } else {
      // bfloat16 products make tensors over their operands on the workers (blas.h's
      // matmul): give the workers the caller's state.
      const at::ThreadLocalState caller_state;
      at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
        at::ThreadLocalStateGuard guard(caller_state);
        const BlasOnThisThread blas;
        try {
          run_workers(w0, w1);
        } catch (...) {
          work.failed.store(true);
          throw;  // at::parallel_for rethrows it on the caller
        }
      });
    }

    // dW = the blocks' shares summed in block order (a single block wrote dW itself).
    auto sum_blocks = [&](const T* parts, T* out, int64_t n) {  // n: one direction's dW
      for (int64_t d = 0; d < D; ++d) {
        const int64_t count = work.dir[d].blocks.count;
        if (count != 1) sum_parts(parts + d * max_blocks * n, count, n, out + d * n);
      }
    };
    if (weight_grads) {
      sum_blocks(part_ih_p, dw_ih_p, G * I);
      sum_blocks(part_hh_p, dw_hh_p, G * P);
      if (proj) sum_blocks(part_hr_p, dw_hr_p, P * H);
    }
    // dx = dg[0] W_ih[0] + dg[1] W_ih[1]. When every row of a direction was live, its
    // blocks wrote its product, the forward direction's into dx and the reverse one's
    // into dx_reverse, on the threads that took them. The rest is computed here, over
    // the direction's rows (onto zeros where the forward direction wrote nothing).
    if (input_grad) {
      const bool wrote_forward = work.dir[0].dx_here;
      if (!wrote_forward) dx.zero_();
      for (int64_t d = wrote_forward ? 1 : 0; d < D; ++d) {
        if (d == 1 && work.dir[1].dx_here) {
          T* out = dx_p[0];
          const T* rev = dx_p[1];
          at::parallel_for(0, rows * I, 4096, [&](int64_t e0, int64_t e1) {
            for (int64_t e = e0; e < e1; ++e) out[e] = T(math_t<T>(out[e]) + math_t<T>(rev[e]));
          });
          continue;
        }
        const RowBlocks& r = work.dir[d].blocks;
        const int64_t k = r.end - r.begin;
        matmul<T>(slab(p.dg, d, G, r.begin, k), Mat<const T>::dense(p.w_ih[d], G, I),
                  Mat<T>::dense(dx_p[0] + r.begin * I, k, I), T(1));
      }
    }
  });
  return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias, dw_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CPU, m) { m.impl("lstm_layer_backward", &lstm_layer_backward_cpu); }

}  // namespace birnn
