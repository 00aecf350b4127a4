// Argument checks of the layer ops, shared by every backend. Each message names the
// argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

namespace birnn {

// P is the size of h: proj_size with a projection, else H.
struct LayerDims {
  int64_t T, B, I, H, P, D;
};

inline void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of x (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of x (", ref.device(),
              "), got ", t.device());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef want,
                        const char* layout) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", layout, " = ", want, ", got ",
              t.sizes());
}

// Checks the shapes, dtypes and devices of the forward op's arguments and returns the sizes.
inline LayerDims check_layer_forward(const at::Tensor& x, const std::optional<at::Tensor>& lengths,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& w_hr) {
  const char* op = "lstm_layer_forward";
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D [T, B, I], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(w_hh.dim() == 3, op, ": w_hh must be 3-D [D, 4H, P], got ", w_hh.sizes());
  TORCH_CHECK(w_hh.size(1) > 0 && w_hh.size(1) % 4 == 0, op, ": w_hh.size(1) must be 4H > 0, got ", w_hh.size(1));
  LayerDims d{x.size(0), x.size(1), x.size(2), w_hh.size(1) / 4, w_hh.size(2), w_hh.size(0)};
  TORCH_CHECK(d.D == 1 || d.D == 2, op, ": w_hh.size(0) is the number of directions, 1 or 2, got ", d.D);
  TORCH_CHECK(d.T > 0, op, ": x must have at least one time step, got T = 0");
  if (w_hr) {
    check_shape(op, *w_hr, "w_hr", {d.D, d.P, d.H}, "[D, P, H]");
    check_same(op, x, *w_hr, "w_hr");
  } else {
    TORCH_CHECK(d.P == d.H, op, ": without w_hr, w_hh must be [D, 4H, H], got ", w_hh.sizes());
  }
  check_shape(op, w_ih, "w_ih", {d.D, 4 * d.H, d.I}, "[D, 4H, I]");
  check_shape(op, h0, "h0", {d.D, d.B, d.P}, w_hr ? "[D, B, P]" : "[D, B, H]");
  check_shape(op, c0, "c0", {d.D, d.B, d.H}, "[D, B, H]");
  for (auto [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}})
    check_same(op, x, *t, name);
  if (bias) {
    check_shape(op, *bias, "bias", {d.D, 4 * d.H}, "[D, 4H]");
    check_same(op, x, *bias, "bias");
  }
  return d;
}

struct CellDims {
  int64_t B, I, H;
};

// Checks the arguments of the cell ops and returns the sizes.
inline CellDims check_cell(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& bias = std::nullopt) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, I], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == 4 * w_hh.size(1), op,
              ": w_hh must be [4H, H], got ", w_hh.sizes());
  CellDims d{x.size(0), x.size(1), w_hh.size(1)};
  check_shape(op, w_ih, "w_ih", {4 * d.H, d.I}, "[4H, I]");
  check_shape(op, h, "h", {d.B, d.H}, "[B, H]");
  check_shape(op, c, "c", {d.B, d.H}, "[B, H]");
  for (auto [t, name] : {std::pair{&h, "h"}, {&c, "c"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}}) check_same(op, x, *t, name);
  if (bias) {
    check_shape(op, *bias, "bias", {4 * d.H}, "[4H]");
    check_same(op, x, *bias, "bias");
  }
  return d;
}

// Checks the arguments of lstm_cell_backward and returns the sizes.
inline CellDims check_cell_backward(const std::optional<at::Tensor>& grad_h_new,
                                    const std::optional<at::Tensor>& grad_c_new, const at::Tensor& x,
                                    const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const at::Tensor& gates) {
  const char* op = "lstm_cell_backward";
  const CellDims d = check_cell(op, x, h, c, w_ih, w_hh);
  TORCH_CHECK(gates.size(0) == d.B, op,
              ": nothing was saved for backward; the forward must run with training=True (gates has ",
              gates.size(0), " rows, x has ", d.B, ")");
  check_shape(op, gates, "gates", {d.B, 4 * d.H}, "[B, 4H]");
  if (grad_h_new) check_shape(op, *grad_h_new, "grad_h_new", {d.B, d.H}, "[B, H]");
  if (grad_c_new) check_shape(op, *grad_c_new, "grad_c_new", {d.B, d.H}, "[B, H]");
  return d;
}

// Checks the arguments of lstm_layer_backward and returns the sizes.
inline LayerDims check_layer_backward(const std::optional<at::Tensor>& grad_y,
                                      const std::optional<at::Tensor>& grad_h_n,
                                      const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                                      const at::Tensor& c_prev, const at::Tensor& h_prev, const at::Tensor& h_raw) {
  const char* op = "lstm_layer_backward";
  TORCH_CHECK(x.dim() == 3 && w_hh.dim() == 3, op, ": x must be [T,B,I] and w_hh [D,4H,P], got ", x.sizes(),
              " and ", w_hh.sizes());
  const LayerDims n{x.size(0), x.size(1), x.size(2), w_hh.size(1) / 4, w_hh.size(2), w_hh.size(0)};
  const auto [T, B, I, H, P, D] = n;
  TORCH_CHECK(gates.size(0) == T, op,
              ": nothing was saved for backward; the forward must run with training=True (gates has ",
              gates.size(0), " steps, x has ", T, ")");
  check_shape(op, w_ih, "w_ih", {D, 4 * H, I}, "[D, 4H, I]");
  if (w_hr) {
    check_shape(op, *w_hr, "w_hr", {D, P, H}, "[D, P, H]");
    check_shape(op, h_raw, "h_raw", {D, T, B, H}, "[D, T, B, H]");
  }
  check_shape(op, gates, "gates", {T, B, D * 4 * H}, "[T, B, D*4H]");
  check_shape(op, c_prev, "c_prev", {T, B, D * H}, "[T, B, D*H]");
  check_shape(op, h_prev, "h_prev", {D, T, B, P}, "[D, T, B, P]");
  if (grad_y) check_shape(op, *grad_y, "grad_y", {T, B, D * P}, "[T, B, D*P]");
  if (grad_h_n) check_shape(op, *grad_h_n, "grad_h_n", {D, B, P}, "[D, B, P]");
  if (grad_c_n) check_shape(op, *grad_c_n, "grad_c_n", {D, B, H}, "[D, B, H]");
  return n;
}

// Validates lengths against x [T, B, ...] and returns them as a contiguous int64 CPU
// tensor (undefined when absent).
inline at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t T,
                                  int64_t B) {
  if (!lengths) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.scalar_type() == at::kLong, op, ": lengths must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, op, ": lengths must be 1-D with one entry per batch row (",
              B, "), got shape ", l.sizes());
  at::Tensor c = l.to(at::kCPU).contiguous();
  if (B > 0) {
    const int64_t lo = c.min().item<int64_t>(), hi = c.max().item<int64_t>();
    TORCH_CHECK(lo >= 1 && hi <= T, op, ": lengths must lie in [1, T = ", T, "], got values from ", lo,
                " to ", hi);
  }
  return c;
}

}  // namespace birnn
