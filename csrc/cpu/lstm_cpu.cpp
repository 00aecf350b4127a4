// CPU kernels of the layer ops: one GEMM for the input projection of every step and
// both directions, then per step a recurrent GEMM and the fused cell of lstm_cell.h.
// The directions of a bidirectional layer are independent, so each runs its whole
// sweep on its own thread. BLAS is called directly into preallocated buffers: at
// small batch, a dispatcher call per step would cost more than the step itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../layer_checks.h"
#include "../lstm_cell.h"
#include "blas.h"

namespace birnn {
namespace {

// Runs fn(d) for each direction d, both at once on separate threads when the layer
// is bidirectional and there are threads to spare. Inside, BLAS runs single-threaded.
template <typename F>
void for_each_direction(int64_t D, const F& fn) {
  if (D > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) fn(d);
    });
  } else {
    for (int64_t d = 0; d < D; ++d) fn(d);
  }
}

// Pointers and sizes of one forward sweep. Shapes are given in elements, row-major.
template <typename T>
struct FwdParams {
  LayerDims n;
  const int64_t* len;  // [B] or nullptr: every sequence has T steps
  const T* w_hh;       // [D,4H,H]
  const T* bias;       // [D,4H] or nullptr
  T* xg;               // [T,B,D*4H] x W_ih^T on entry; activated gates on exit when training
  T* y;                // [T,B,D*H]
  T* h;                // [D,B,H] h0 on entry, h_n on exit
  T* c;                // [D,B,H] c0 on entry, c_n on exit
  T* c_prev;           // [T,B,D*H] saved when training
  T* h_prev;           // [T,B,D*H] saved when training
  T* rec;              // [D,B,4H] scratch: h W_hh^T of one step
};

template <typename T, bool Training>
void forward_direction(const FwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, D] = p.n;
  const int64_t G = 4 * H;
  const T* w_hh = p.w_hh + d * G * H;
  const T* bias = p.bias ? p.bias + d * G : nullptr;
  T* h = p.h + d * B * H;
  T* c = p.c + d * B * H;
  T* rec = p.rec + d * B * G;
  for (int64_t s = 0; s < T_; ++s) {
    gemm<T>(false, true, B, G, H, T(1), h, H, w_hh, H, T(0), rec, G);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = p.len ? p.len[b] : T_;
      const int64_t t = time_index(int(d), s, L);
      const int64_t row = t * B + b;
      T* y = p.y + row * D * H + d * H;
      T* hb = h + b * H;
      T* cb = c + b * H;
      if (Training) {
        std::memcpy(p.h_prev + row * D * H + d * H, hb, H * sizeof(T));
        std::memcpy(p.c_prev + row * D * H + d * H, cb, H * sizeof(T));
      }
      if (s >= L) {  // padding: zero output, state carried unchanged
        std::memset(y, 0, H * sizeof(T));
        continue;
      }
      T* xg = p.xg + row * D * G + d * G;
      const T* r = rec + b * G;
      for (int64_t j = 0; j < H; ++j) {
        T pre[4];
        for (int k = 0; k < 4; ++k) pre[k] = xg[k * H + j] + r[k * H + j] + (bias ? bias[k * H + j] : T(0));
        const Gates<T> a = activate(pre[0], pre[1], pre[2], pre[3]);
        const T cn = cell_state(a, cb[j]);
        const T hn = hidden_state(a, cn);
        if (Training) {
          xg[j] = a.i;
          xg[H + j] = a.f;
          xg[2 * H + j] = a.g;
          xg[3 * H + j] = a.o;
        }
        cb[j] = cn;
        hb[j] = hn;
        y[j] = hn;
      }
    }
  }
}

template <typename T>
struct BwdParams {
  LayerDims n;
  const int64_t* len;  // [B] or nullptr
  const T* w_hh;       // [D,4H,H]
  const T* gates;      // [T,B,D*4H] activated
  const T* c_prev;     // [T,B,D*H]
  const T* dy;         // [T,B,D*H] or nullptr
  T* dh;               // [D,B,H] grad of h_n on entry, of h0 on exit
  T* dc;               // [D,B,H] grad of c_n on entry, of c0 on exit
  T* dg;               // [T,B,D*4H] out: grads of the gate pre-activations, time-ordered
  T* dg_step;          // [D,B,4H] scratch: the same for one step, for the recurrent GEMM
};

template <typename T>
void backward_direction(const BwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, D] = p.n;
  const int64_t G = 4 * H;
  const T* w_hh = p.w_hh + d * G * H;
  T* dh = p.dh + d * B * H;
  T* dc = p.dc + d * B * H;
  T* dg_step = p.dg_step + d * B * G;
  for (int64_t s = T_ - 1; s >= 0; --s) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = p.len ? p.len[b] : T_;
      const int64_t row = time_index(int(d), s, L) * B + b;
      T* dg = p.dg + row * D * G + d * G;
      T* dgs = dg_step + b * G;
      if (s >= L) {  // padding: the state's gradient passes through unchanged
        std::memset(dg, 0, G * sizeof(T));
        std::memset(dgs, 0, G * sizeof(T));
        continue;
      }
      const T* a = p.gates + row * D * G + d * G;
      const T* cp = p.c_prev + row * D * H + d * H;
      const T* dy = p.dy ? p.dy + row * D * H + d * H : nullptr;
      T* dhb = dh + b * H;
      T* dcb = dc + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const Gates<T> g{a[j], a[H + j], a[2 * H + j], a[3 * H + j]};
        const GateGrads<T> r = backward(g, cp[j], dhb[j] + (dy ? dy[j] : T(0)), dcb[j]);
        dgs[j] = dg[j] = r.di;
        dgs[H + j] = dg[H + j] = r.df;
        dgs[2 * H + j] = dg[2 * H + j] = r.dg;
        dgs[3 * H + j] = dg[3 * H + j] = r.do_;
        dcb[j] = r.dc_prev;
        dhb[j] = T(0);  // refilled with dg W_hh below
      }
    }
    // dh_{t-1} = dg W_hh for the sequences that stepped; padded rows of dg_step are
    // zero, so their carried gradient is left as it was.
    gemm<T>(false, false, B, H, G, T(1), dg_step, G, w_hh, H, T(1), dh, H);
  }
}

// Column sums of a [rows, cols] matrix in row order: the same bits for any thread count.
template <typename T>
void column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) out[c] = T(0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c1; ++c) out[c] += m[r * cols + c];
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& lengths, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const std::optional<at::Tensor>& bias_, bool training) {
  const LayerDims n = check_layer_forward(x_, lengths, h0, c0, w_ih_, w_hh_, bias_);
  const at::Tensor len = checked_lengths("lstm_layer_forward", lengths, n.T, n.B);
  const auto [T_, B, I, H, D] = n;
  const at::Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  auto opt = x.options();
  at::Tensor y = at::empty({T_, B, D * H}, opt);
  at::Tensor h = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c = c0.clone(at::MemoryFormat::Contiguous);
  at::Tensor xg = at::empty({T_, B, D * 4 * H}, opt);
  at::Tensor c_prev = at::empty({training ? T_ : 0, B, D * H}, opt);
  at::Tensor h_prev = at::empty({training ? T_ : 0, B, D * H}, opt);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
      using T = scalar_t;
      at::Tensor rec = at::empty({D, B, 4 * H}, opt);
      // Input projection of every step and direction: [T*B, I] x [D*4H, I]^T.
      gemm<T>(false, true, T_ * B, D * 4 * H, I, T(1), x.data_ptr<T>(), I, w_ih.data_ptr<T>(), I, T(0),
              xg.data_ptr<T>(), D * 4 * H);
      FwdParams<T> p{n,
                     len.defined() ? len.data_ptr<int64_t>() : nullptr,
                     w_hh.data_ptr<T>(),
                     bias.defined() ? bias.data_ptr<T>() : nullptr,
                     xg.data_ptr<T>(),
                     y.data_ptr<T>(),
                     h.data_ptr<T>(),
                     c.data_ptr<T>(),
                     training ? c_prev.data_ptr<T>() : nullptr,
                     training ? h_prev.data_ptr<T>() : nullptr,
                     rec.data_ptr<T>()};
      for_each_direction(D, [&](int64_t d) {
        training ? forward_direction<T, true>(p, d) : forward_direction<T, false>(p, d);
      });
    });
  }
  at::Tensor gates = training ? xg : at::empty({0, B, D * 4 * H}, opt);
  return {y, h, c, gates, c_prev, h_prev};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_cpu(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x_, const std::optional<at::Tensor>& lengths,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& gates_, const at::Tensor& c_prev_,
    const at::Tensor& h_prev_) {
  const char* op = "lstm_layer_backward";
  TORCH_CHECK(x_.dim() == 3 && w_hh_.dim() == 3, op, ": x must be [T,B,I] and w_hh [D,4H,H], got ", x_.sizes(),
              " and ", w_hh_.sizes());
  const LayerDims n{x_.size(0), x_.size(1), x_.size(2), w_hh_.size(2), w_hh_.size(0)};
  const auto [T_, B, I, H, D] = n;
  TORCH_CHECK(gates_.size(0) == T_, op,
              ": nothing was saved for backward; the forward must run with training=True (gates has ",
              gates_.size(0), " steps, x has ", T_, ")");
  check_shape(op, w_ih_, "w_ih", {D, 4 * H, I}, "[D, 4H, I]");
  check_shape(op, gates_, "gates", {T_, B, D * 4 * H}, "[T, B, D*4H]");
  check_shape(op, c_prev_, "c_prev", {T_, B, D * H}, "[T, B, D*H]");
  check_shape(op, h_prev_, "h_prev", {T_, B, D * H}, "[T, B, D*H]");
  if (grad_y) check_shape(op, *grad_y, "grad_y", {T_, B, D * H}, "[T, B, D*H]");
  if (grad_h_n) check_shape(op, *grad_h_n, "grad_h_n", {D, B, H}, "[D, B, H]");
  if (grad_c_n) check_shape(op, *grad_c_n, "grad_c_n", {D, B, H}, "[D, B, H]");
  const at::Tensor len = checked_lengths(op, lengths, T_, B);

  const at::Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor gates = gates_.contiguous(), c_prev = c_prev_.contiguous(), h_prev = h_prev_.contiguous();
  const at::Tensor dy = grad_y ? grad_y->contiguous() : at::Tensor();
  auto opt = x.options();
  at::Tensor dh = grad_h_n ? grad_h_n->clone(at::MemoryFormat::Contiguous) : at::zeros({D, B, H}, opt);
  at::Tensor dc = grad_c_n ? grad_c_n->clone(at::MemoryFormat::Contiguous) : at::zeros({D, B, H}, opt);
  at::Tensor dx = at::empty({T_, B, I}, opt);
  at::Tensor dw_ih = at::empty({D, 4 * H, I}, opt);
  at::Tensor dw_hh = at::empty({D, 4 * H, H}, opt);
  at::Tensor dbias = at::empty({D, 4 * H}, opt);
  if (B == 0) {
    dw_ih.zero_(), dw_hh.zero_(), dbias.zero_();
    return {dx, dh, dc, dw_ih, dw_hh, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t G = 4 * H, rows = T_ * B;
    at::Tensor dg = at::empty({T_, B, D * G}, opt);
    at::Tensor dg_step = at::empty({D, B, G}, opt);
    BwdParams<T> p{n,
                   len.defined() ? len.data_ptr<int64_t>() : nullptr,
                   w_hh.data_ptr<T>(),
                   gates.data_ptr<T>(),
                   c_prev.data_ptr<T>(),
                   dy.defined() ? dy.data_ptr<T>() : nullptr,
                   dh.data_ptr<T>(),
                   dc.data_ptr<T>(),
                   dg.data_ptr<T>(),
                   dg_step.data_ptr<T>()};
    for_each_direction(D, [&](int64_t d) { backward_direction<T>(p, d); });
    // What does not recur is done for all steps at once, in a few large GEMMs.
    const T* dgp = dg.data_ptr<T>();
    gemm<T>(false, false, rows, I, D * G, T(1), dgp, D * G, w_ih.data_ptr<T>(), I, T(0), dx.data_ptr<T>(), I);
    gemm<T>(true, false, D * G, I, rows, T(1), dgp, D * G, x.data_ptr<T>(), I, T(0), dw_ih.data_ptr<T>(), I);
    for (int64_t d = 0; d < D; ++d)
      gemm<T>(true, false, G, H, rows, T(1), dgp + d * G, D * G, h_prev.data_ptr<T>() + d * H, D * H, T(0),
              dw_hh.data_ptr<T>() + d * G * H, H);
    column_sums(dgp, rows, D * G, dbias.data_ptr<T>());
  });
  return {dx, dh, dc, dw_ih, dw_hh, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace birnn
