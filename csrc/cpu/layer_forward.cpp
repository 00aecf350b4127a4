// The CPU kernel of lstm_layer_forward. The input projection of every step and
// direction (one GEMM in training; chunk by chunk per direction in inference), then per
// step a recurrent product and the fused cell (cell_rows.h). The directions of a
// bidirectional layer are independent, so each runs its whole sweep on its own thread.
// Products are called directly into preallocated buffers (blas.h): the step products
// on small_gemm / small_gemm_bf16 over weights packed once per call, the large ones on
// oneDNN. Large buffers come from buffer_pool.h. Storage float32, float64 or bfloat16;
// the math and the cell state in math_t.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "../layer_checks.h"
#include "../lstm_cell.h"
#include "blas.h"
#include "buffer_pool.h"
#include "cell_rows.h"
#include "dispatch_rules.h"
#include "fixed_order.h"
#include "float16.h"
#include "kernel_util.h"

namespace birnn {
namespace {

// Pointers and sizes of one forward sweep. Shapes are in elements, row-major; P is the
// size of h (proj_size, or H without a projection).
template <typename T>
struct FwdParams {
  LayerDims n;
  const int64_t* len;  // [B] or nullptr: every sequence has T steps
  // Per-direction GEMM operands, made on the calling thread (the packing runs on the
  // direction's own).
  std::array<StepWeight, 2> w_hh_t;  // [P,4H] = W_hh[d]^T
  std::array<StepWeight, 2> w_hr_t;  // [H,P] = W_hr[d]^T, empty without a projection
  T* h;                              // [D,B,P] h0 on entry, h_n on exit
  T* rec;                            // [D,B,4H] scratch: h W_hh^T of one step
  T* h_raw;                          // [D,B,H] scratch with a projection: o * tanh(c) of one step
  T* h_proj;                         // [D,B,P] scratch with a projection: h_raw W_hr^T
  const T* bias;                     // [D,4H], zeros when the layer has none
  T* xg;                             // [T,B,D*4H] x W_ih^T on entry; activated gates on exit when training;
                                     // nullptr when the projection is made chunk by chunk (inference)
  // Inference: x W_ih^T made per direction for `chunk` steps at a time, into a buffer
  // that stays in cache, instead of for all steps at once (T*B*D*4H floats, mapped
  // fresh from the OS and page-faulted in on every call).
  int64_t chunk = 0;
  const T* x = nullptr;                   // [T,B,I]
  std::array<StepWeight, 2> w_ih_t;       // [I,4H] = W_ih[d]^T
  T* x_chunk = nullptr;                   // [D, chunk*B, I] the rows of x each direction reads next
  T* xg_chunk = nullptr;                  // [D, chunk*B, 4H]
  // Training, a short sweep (float32): each direction projects all of x on its own
  // thread, over its W_ih^T (w_ih_t), into its columns of xg.
  bool project_per_direction = false;
  bool h0_zero = false;              // no h0 given: h starts as zeros
  T* y;                              // [T,B,D*P]
  math_t<T>* c;                      // [D,B,H] c0 on entry, c_n on exit
  math_t<T>* c_prev;                 // [T,B,D*H] saved when training
  T* h_prev;                         // [D,T,B,P] saved when training, direction-major for the dW_hh GEMM
  T* h_raw_saved;                    // [D,T,B,H] saved when training with a projection, for dW_hr
};

template <typename T, bool Training>
void forward_direction(const FwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr_t[d].defined();
  const T* bias = p.bias + d * G;
  T* h = p.h + d * B * P;
  math_t<T>* c = p.c + d * B * H;
  T* rec = p.rec + d * B * G;
  T* h_raw = proj ? p.h_raw + d * B * H : nullptr;
  const T* h_proj = proj ? p.h_proj + d * B * P : nullptr;
  const bool w_hh_finite = p.w_hh_t[d].pack(/*check_finite=*/p.h0_zero);
  p.w_hr_t[d].pack();
  p.w_ih_t[d].pack();
  if (p.project_per_direction)
    step_product<T>(Mat<const T>::dense(p.x, T_ * B, I), p.w_ih_t[d], Mat<T>(p.xg + d * G, T_ * B, G, D * G), T(0));
  T* x_chunk = p.chunk ? p.x_chunk + d * p.chunk * B * I : nullptr;
  T* xg_chunk = p.chunk ? p.xg_chunk + d * p.chunk * B * G : nullptr;
  auto row_of = [&](int64_t s, int64_t b) { return time_index(int(d), s, p.len ? p.len[b] : T_) * B + b; };
  for (int64_t s = 0; s < T_; ++s) {
    if (p.chunk && s % p.chunk == 0) {
      // Gather the x rows of the next steps in this direction's own order, then project.
      const bool tail = s + p.chunk > T_;
      const int64_t steps = tail ? T_ - s : p.chunk;
      for (int64_t k = 0; k < steps; ++k)
        for (int64_t b = 0; b < B; ++b)
          std::memcpy(x_chunk + (k * B + b) * I, p.x + row_of(s + k, b) * I, I * sizeof(T));
      step_product<T>(Mat<const T>::dense(x_chunk, steps * B, I), p.w_ih_t[d], Mat<T>::dense(xg_chunk, steps * B, G),
                      T(0));
    }
    // From zeros (no h0), the first step's h W_hh^T is zero: 1/T of the recurrent
    // products spared. Only where the packing found W_hh finite: nn.LSTM multiplies
    // those zeros by it, and 0 * inf is NaN.
    if (s == 0 && p.h0_zero && w_hh_finite)
      std::memset(rec, 0, B * G * sizeof(T));
    else
      step_product<T>(Mat<const T>::dense(h, B, P), p.w_hh_t[d], Mat<T>::dense(rec, B, G), T(0));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = row_of(s, b);
      const bool active = s < (p.len ? p.len[b] : T_);
      T* hb = h + b * P;
      math_t<T>* cb = c + b * H;
      if (Training) {
        std::memcpy(p.h_prev + (d * T_ * B + row) * P, hb, P * sizeof(T));
        std::memcpy(p.c_prev + row * D * H + d * H, cb, H * sizeof(math_t<T>));
      }
      T* y = p.y + row * D * P + d * P;
      if (!active) {  // padding: zero output, state carried unchanged
        std::memset(y, 0, P * sizeof(T));
        if (proj) std::memset(h_raw + b * H, 0, H * sizeof(T));
        continue;
      }
      T* xg = p.chunk ? xg_chunk + ((s % p.chunk) * B + b) * G : p.xg + row * D * G + d * G;
      cell_forward_row<T, Training>(H, xg, rec + b * G, bias, cb, proj ? h_raw + b * H : hb);
      if (!proj) std::memcpy(y, hb, H * sizeof(T));
    }
    if (!proj) continue;
    // h = (o * tanh(c)) W_hr^T for the whole step, then out to the state and y.
    step_product<T>(Mat<const T>::dense(h_raw, B, H), p.w_hr_t[d], Mat<T>::dense(p.h_proj + d * B * P, B, P), T(0));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = row_of(s, b);
      if (Training) std::memcpy(p.h_raw_saved + (d * T_ * B + row) * H, h_raw + b * H, H * sizeof(T));
      if (s >= (p.len ? p.len[b] : T_)) continue;
      std::memcpy(h + b * P, h_proj + b * P, P * sizeof(T));
      std::memcpy(p.y + row * D * P + d * P, h_proj + b * P, P * sizeof(T));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_,
    const std::optional<at::Tensor>& b_hh_, const std::optional<at::Tensor>& w_hr_,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, bool training) {
  const BelowAutograd below_autograd;
  const LayerWeights wts = layer_weights("lstm_layer_forward", w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, w_ih_reverse,
                                         w_hh_reverse, b_ih_reverse, b_hh_reverse, w_hr_reverse);
  // In inference a bfloat16 x may come with float32 weights (autocast's rule for this op,
  // ops.py): the step products pack them, rounding to bfloat16 as they go, on every call
  // anyway, so the separate casts autocast would make (a copy of every weight, each call)
  // are left out.
  const LayerDims n = check_layer_forward(x_, lengths, h0, c0, wts, /*float32_weights=*/!training);
  if (float16::is(x_)) {
    using float16::widen, float16::narrow;
    auto [y, h_n, c_n, gates, c_prev, h_prev, h_raw] =
        lstm_layer_forward_cpu(widen(x_), lengths, widen(h0), widen(c0), widen(w_ih_), widen(w_hh_), widen(b_ih_),
                               widen(b_hh_), widen(w_hr_), widen(w_ih_reverse), widen(w_hh_reverse),
                               widen(b_ih_reverse), widen(b_hh_reverse), widen(w_hr_reverse), training);
    return {narrow(y), narrow(h_n), narrow(c_n), narrow(gates), c_prev, narrow(h_prev), narrow(h_raw)};
  }
  const at::Tensor len = checked_lengths("lstm_layer_forward", lengths, n.T, n.B);
  const auto [T_, B, I, H, P, D] = n;
  const bool proj = wts.proj();
  const at::Tensor x = contiguous(x_);
  // The module's own Parameters, read in place: no stacked copy per call (a copy costs
  // its time, and leaves the weights cold in the cache of the core that reads them).
  const Weights w_ih = weights(wts.w_ih), w_hh = weights(wts.w_hh), w_hr = weights(wts.w_hr);
  auto opt = x.options();
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  at::Tensor y = pooled_empty({T_, B, D * P}, opt);
  // The state the sweep carries, from h0 and c0 (zeros where they are None).
  at::Tensor h = h0 ? h0->clone(at::MemoryFormat::Contiguous) : pooled_zeros({D, B, P}, opt);
  at::Tensor c = c0 ? c0->to(mopt, /*non_blocking=*/false, /*copy=*/true).contiguous() : pooled_zeros({D, B, H}, mopt);
  // Steps per projection chunk in inference (dispatch_rules.h).
  const int64_t chunk =
      training ? 0
               : std::min<int64_t>(T_, std::max<int64_t>(1, cpu_rules::kInferenceChunkRows / std::max<int64_t>(B, 1)));
  // What backward needs, made only when training: in inference these four outputs stay
  // undefined (None in Python; four empty tensors cost about 1.8 us of a 9 us call at B 1, T 1).
  at::Tensor xg, c_prev, h_prev, h_raw;
  if (training) {
    xg = pooled_empty({T_, B, D * 4 * H}, opt);
    c_prev = pooled_empty({T_, B, D * H}, mopt);
    h_prev = pooled_empty({D, T_, B, P}, opt);
    h_raw = pooled_empty({D, proj ? T_ : 0, B, H}, opt);
  }
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_layer_forward_cpu", [&] {
      using T = scalar_t;
      FwdParams<T> p{};
      p.n = n;
      p.len = len.defined() ? len.data_ptr<int64_t>() : nullptr;
      p.x = x.data_ptr<T>();
      const at::ScalarType products = x.scalar_type();
      // In training, each direction projects its own input where one product over both
      // would be too small for oneDNN (dispatch_rules.h).
      p.project_per_direction = training && (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) &&
                                cpu_rules::project_per_direction(T_, B, D, H, I);
      for (int64_t d = 0; d < D; ++d) {
        if (!training || p.project_per_direction) p.w_ih_t[d] = StepWeight::transposed(w_ih[d], T_, B, products);
        p.w_hh_t[d] = StepWeight::transposed(w_hh[d], T_, B, products);
        if (proj) p.w_hr_t[d] = StepWeight::transposed(w_hr[d], T_, B, products);
      }
      // Scratch: b_ih + b_hh [D,4H], a step's h W_hh^T [D,B,4H], with a projection a
      // step's h_raw [D,B,H] and h_raw W_hr^T [D,B,P], in inference a chunk of x
      // [D,chunk*B,I] and its projection [D,chunk*B,4H]; the packed weights.
      Scratch scratch;
      const size_t at_bias = scratch.reserve<T>(D * 4 * H), at_rec = scratch.reserve<T>(D * B * 4 * H);
      const size_t at_raw = scratch.reserve<T>(proj ? D * B * H : 0);
      const size_t at_proj = scratch.reserve<T>(proj ? D * B * P : 0);
      const size_t at_x_chunk = scratch.reserve<T>(training ? 0 : D * chunk * B * I);
      const size_t at_xg_chunk = scratch.reserve<T>(training ? 0 : D * chunk * B * 4 * H);
      for (int64_t d = 0; d < D; ++d)
        for (StepWeight* w : {&p.w_ih_t[d], &p.w_hh_t[d], &p.w_hr_t[d]}) w->reserve(scratch);
      scratch.allocate();
      for (int64_t d = 0; d < D; ++d)
        for (StepWeight* w : {&p.w_ih_t[d], &p.w_hh_t[d], &p.w_hr_t[d]}) w->place(scratch);
      // b_ih + b_hh, summed here (zeros without a bias).
      T* bsum = scratch.get<T>(at_bias);
      for (int64_t d = 0; d < D; ++d) {
        if (!wts.bias()) {
          std::fill(bsum + d * 4 * H, bsum + (d + 1) * 4 * H, T(0));
          continue;
        }
        // Each bias in the storage type first, as a cast of float32 weights would leave it
        // (a conversion only for the float32 weights of bfloat16 inference).
        auto in_storage = [&](const at::Tensor& b) {
          return (b.scalar_type() == x.scalar_type() ? b : b.to(x.scalar_type())).contiguous();
        };
        const at::Tensor bi = in_storage(wts.b_ih[d]), bh = in_storage(wts.b_hh[d]);
        const T *pi = bi.data_ptr<T>(), *ph = bh.data_ptr<T>();
        for (int64_t g = 0; g < 4 * H; ++g) bsum[d * 4 * H + g] = T(math_t<T>(pi[g]) + math_t<T>(ph[g]));
      }
      if (training && !p.project_per_direction) {
        // Input projection of every step and direction: [T*B, I] x [D*4H, I]^T, with the
        // directions' W_ih side by side (a copy, small beside the training work).
        const at::Tensor w_ih_all = D == 1 ? w_ih[0] : pooled_empty({D * 4 * H, I}, opt);
        for (int64_t d = 0; d < D && D > 1; ++d) w_ih_all.narrow(0, d * 4 * H, 4 * H).copy_(w_ih[d]);
        matmul<T>(x.view({T_ * B, I}), w_ih_all.t(), xg.view({T_ * B, D * 4 * H}), T(0));
      } else if (!training) {
        p.chunk = chunk;
        p.x_chunk = scratch.get<T>(at_x_chunk);
        p.xg_chunk = scratch.get<T>(at_xg_chunk);
      }
      p.h0_zero = !h0;
      p.h = h.data_ptr<T>();
      p.rec = scratch.get<T>(at_rec);
      p.h_raw = proj ? scratch.get<T>(at_raw) : nullptr;
      p.h_proj = proj ? scratch.get<T>(at_proj) : nullptr;
      p.bias = bsum;
      p.xg = training ? xg.data_ptr<T>() : nullptr;
      p.y = y.data_ptr<T>();
      p.c = c.data_ptr<math_t<T>>();
      p.c_prev = training ? c_prev.data_ptr<math_t<T>>() : nullptr;
      p.h_prev = training ? h_prev.data_ptr<T>() : nullptr;
      p.h_raw_saved = training && proj ? h_raw.data_ptr<T>() : nullptr;
      for_each_direction(D, T_ * B * 4 * H * (I + P + (proj ? H : 0)), [&](int64_t d) {
        training ? forward_direction<T, true>(p, d) : forward_direction<T, false>(p, d);
      });
    });
  }
  // The gates saved for backward: xg, activated in place.
  return {y, h, c.to(x.scalar_type()), xg, c_prev, h_prev, h_raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CPU, m) { m.impl("lstm_layer_forward", &lstm_layer_forward_cpu); }

}  // namespace birnn
