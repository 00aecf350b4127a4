// Argument checks of the layer ops, shared by every backend. Each message names the
// argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>

namespace birnn {

// P is the size of h: proj_size with a projection, else H.
struct LayerDims {
  int64_t T, B, I, H, P, D;
};

// `suffix` completes `name` in a message ("_reverse"): messages are formatted only when a
// check fails, so a call that passes builds no string.
inline void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name,
                       const char* suffix = "") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, suffix, " must have the dtype of x (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, suffix, " must be on the device of x (", ref.device(),
              "), got ", t.device());
}

// A weight's dtype and device: x's device, and `dtype`, which is x's dtype except where
// a forward op takes float32 weights with a bfloat16 x (see check_layer_forward).
inline void check_weight(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name,
                         at::ScalarType dtype, const char* suffix = "") {
  if (dtype == x.scalar_type()) return check_same(op, x, t, name, suffix);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, suffix, " must have the dtype of x (", x.scalar_type(),
              ") or, in inference, be float32 like every other weight of the layer, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, suffix, " must be on the device of x (", x.device(),
              "), got ", t.device());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef want,
                        const char* layout, const char* suffix = "") {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, suffix, " must have shape ", layout, " = ", want, ", got ",
              t.sizes());
}

// A layer's weights per direction, as the layer ops take them (nn.LSTM's Parameters,
// the reverse direction's under *_reverse). Absent ones are undefined.
struct LayerWeights {
  int64_t D = 1;
  std::array<at::Tensor, 2> w_ih, w_hh, b_ih, b_hh, w_hr;
  bool bias() const { return b_ih[0].defined(); }
  bool proj() const { return w_hr[0].defined(); }
  // The D tensors of one kind, or none when that kind is absent.
  at::TensorList of(const std::array<at::Tensor, 2>& kind) const {
    return kind[0].defined() ? at::TensorList(kind.data(), D) : at::TensorList();
  }
};

// Gathers the weight arguments of a layer op. The reverse direction is there when
// w_ih_reverse and w_hh_reverse are; an optional weight must then be given for both
// directions or for neither, and b_ih and b_hh come together.
inline LayerWeights layer_weights(const char* op, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                  const std::optional<at::Tensor>& w_hr,
                                  const std::optional<at::Tensor>& w_ih_reverse,
                                  const std::optional<at::Tensor>& w_hh_reverse,
                                  const std::optional<at::Tensor>& b_ih_reverse,
                                  const std::optional<at::Tensor>& b_hh_reverse,
                                  const std::optional<at::Tensor>& w_hr_reverse) {
  TORCH_CHECK(w_ih_reverse.has_value() == w_hh_reverse.has_value(), op,
              ": w_ih_reverse and w_hh_reverse must be given together (a bidirectional layer) or not at all, got ",
              w_ih_reverse ? "w_ih_reverse" : "w_hh_reverse", " alone");
  LayerWeights w;
  w.D = w_hh_reverse ? 2 : 1;
  auto pair = [&](std::array<at::Tensor, 2>& kind, const std::optional<at::Tensor>& fwd,
                  const std::optional<at::Tensor>& rev, const char* name) {
    if (w.D == 2) {
      TORCH_CHECK(fwd.has_value() == rev.has_value(), op, ": ", name, " and ", name,
                  "_reverse must both be given or both be None, got ", fwd ? name : c10::str(name, "_reverse"),
                  " alone");
    } else {
      TORCH_CHECK(!rev, op, ": ", name, "_reverse was given without the reverse direction's w_ih_reverse and ",
                  "w_hh_reverse");
    }
    if (fwd) kind[0] = *fwd;
    if (rev) kind[1] = *rev;
  };
  w.w_ih = {w_ih, w.D == 2 ? *w_ih_reverse : at::Tensor()};
  w.w_hh = {w_hh, w.D == 2 ? *w_hh_reverse : at::Tensor()};
  pair(w.b_ih, b_ih, b_ih_reverse, "b_ih");
  pair(w.b_hh, b_hh, b_hh_reverse, "b_hh");
  pair(w.w_hr, w_hr, w_hr_reverse, "w_hr");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op, ": b_ih and b_hh must both be given or both be None, got ",
              b_ih ? "b_ih" : "b_hh", " alone");
  return w;
}

// One kind of weight, each direction's of shape `want`, with x's dtype and device.
// Errors name the tensor: "w_hh_reverse".
inline void check_weights(const char* op, const at::Tensor& x, at::TensorList list, const char* name, int64_t D,
                          at::IntArrayRef want, const char* layout, at::ScalarType dtype) {
  for (int64_t d = 0; d < D; ++d) {
    const char* suffix = d == 0 ? "" : "_reverse";
    check_shape(op, list[d], name, want, layout, suffix);
    check_weight(op, x, list[d], name, dtype, suffix);
  }
}
inline void check_weights(const char* op, const at::Tensor& x, at::TensorList list, const char* name, int64_t D,
                          at::IntArrayRef want, const char* layout) {
  check_weights(op, x, list, name, D, want, layout, x.scalar_type());
}

// The dtype a forward op's weights must have: x's, or float32 where `float32_weights`
// allows it (the CPU kernel in inference, bfloat16 x: it rounds the weights to bfloat16
// as it packs them, which it does on every call anyway, so autocast need not cast them
// first) and w_hh is float32.
inline at::ScalarType weight_dtype(const at::Tensor& x, const LayerWeights& w, bool float32_weights) {
  const bool f32 = float32_weights && x.scalar_type() == at::kBFloat16 && w.w_hh[0].scalar_type() == at::kFloat;
  return f32 ? at::kFloat : x.scalar_type();
}

// The sizes of a layer, read from x [T,B,I] and w_hh [4H,P].
inline LayerDims layer_dims(const char* op, const at::Tensor& x, const LayerWeights& w) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D [T, B, I], got ", x.dim(), "-D ", x.sizes());
  const at::Tensor& w_hh = w.w_hh[0];
  TORCH_CHECK(w_hh.dim() == 2, op, ": w_hh must be 2-D [4H, P], got ", w_hh.dim(), "-D ", w_hh.sizes());
  TORCH_CHECK(w_hh.size(0) > 0 && w_hh.size(0) % 4 == 0, op, ": w_hh.size(0) must be 4H > 0, got ", w_hh.size(0));
  return LayerDims{x.size(0), x.size(1), x.size(2), w_hh.size(0) / 4, w_hh.size(1), w.D};
}

// Checks the shapes, dtypes and devices of the forward op's arguments and returns the sizes.
// `float32_weights`: whether this kernel takes float32 weights with a bfloat16 x (see
// weight_dtype).
inline LayerDims check_layer_forward(const at::Tensor& x, const std::optional<at::Tensor>& lengths,
                                     const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                                     const LayerWeights& w, bool float32_weights = false) {
  const char* op = "lstm_layer_forward";
  const LayerDims d = layer_dims(op, x, w);
  TORCH_CHECK(d.T > 0, op, ": x must have at least one time step, got T = 0");
  const bool proj = w.proj();
  const at::ScalarType wt = weight_dtype(x, w, float32_weights);
  if (proj) {
    check_weights(op, x, w.of(w.w_hr), "w_hr", d.D, {d.P, d.H}, "[P, H]", wt);
  } else {
    TORCH_CHECK(d.P == d.H, op, ": without w_hr, w_hh must be [4H, H], got ", w.w_hh[0].sizes());
  }
  check_weights(op, x, w.of(w.w_ih), "w_ih", d.D, {4 * d.H, d.I}, "[4H, I]", wt);
  check_weights(op, x, w.of(w.w_hh), "w_hh", d.D, {4 * d.H, d.P}, proj ? "[4H, P]" : "[4H, H]", wt);
  if (w.bias()) {
    check_weights(op, x, w.of(w.b_ih), "b_ih", d.D, {4 * d.H}, "[4H]", wt);
    check_weights(op, x, w.of(w.b_hh), "b_hh", d.D, {4 * d.H}, "[4H]", wt);
  }
  if (h0) {
    check_shape(op, *h0, "h0", {d.D, d.B, d.P}, proj ? "[D, B, P]" : "[D, B, H]");
    check_same(op, x, *h0, "h0");
  }
  if (c0) {
    check_shape(op, *c0, "c0", {d.D, d.B, d.H}, "[D, B, H]");
    check_same(op, x, *c0, "c0");
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
  // A forward without training leaves gates undefined (None).
  TORCH_CHECK(gates.defined(), op,
              ": nothing was saved for backward; the forward must run with training=True (gates is None)");
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
                                      const LayerWeights& w, const at::Tensor& gates, const at::Tensor& c_prev,
                                      const at::Tensor& h_prev, const at::Tensor& h_raw) {
  const char* op = "lstm_layer_backward";
  const LayerDims n = layer_dims(op, x, w);
  const auto [T, B, I, H, P, D] = n;
  TORCH_CHECK(T > 0, op, ": x must have at least one time step, got T = 0");
  // A forward without training leaves what backward needs undefined (None).
  TORCH_CHECK(gates.defined() && c_prev.defined() && h_prev.defined() && h_raw.defined(), op,
              ": nothing was saved for backward; the forward must run with training=True (gates, c_prev, h_prev "
              "or h_raw is None)");
  TORCH_CHECK(gates.size(0) == T, op,
              ": nothing was saved for backward; the forward must run with training=True (gates has ",
              gates.size(0), " steps, x has ", T, ")");
  check_weights(op, x, w.of(w.w_ih), "w_ih", D, {4 * H, I}, "[4H, I]");
  check_weights(op, x, w.of(w.w_hh), "w_hh", D, {4 * H, P}, "[4H, P]");
  if (w.proj()) {
    check_weights(op, x, w.of(w.w_hr), "w_hr", D, {P, H}, "[P, H]");
    check_shape(op, h_raw, "h_raw", {D, T, B, H}, "[D, T, B, H]");
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr, w_hh must be [4H, H], got ", w.w_hh[0].sizes());
  }
  check_shape(op, gates, "gates", {T, B, D * 4 * H}, "[T, B, D*4H]");
  check_shape(op, c_prev, "c_prev", {T, B, D * H}, "[T, B, D*H]");
  check_shape(op, h_prev, "h_prev", {D, T, B, P}, "[D, T, B, P]");
  if (grad_y) check_shape(op, *grad_y, "grad_y", {T, B, D * P}, "[T, B, D*P]");
  if (grad_h_n) check_shape(op, *grad_h_n, "grad_h_n", {D, B, P}, "[D, B, P]");
  if (grad_c_n) check_shape(op, *grad_c_n, "grad_c_n", {D, B, H}, "[D, B, H]");
  return n;
}

// lengths' dtype and shape, read from the tensor's metadata alone.
inline void check_lengths_shape(const char* op, const at::Tensor& l, int64_t B) {
  TORCH_CHECK(l.scalar_type() == at::kLong, op, ": lengths must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, op, ": lengths must be 1-D with one entry per batch row (",
              B, "), got shape ", l.sizes());
}

// Validates lengths against x [T, B, ...] and returns them as a contiguous int64 CPU
// tensor (undefined when absent).
inline at::Tensor checked_lengths(const char* op, const std::optional<at::Tensor>& lengths, int64_t T,
                                  int64_t B) {
  if (!lengths) return at::Tensor();
  check_lengths_shape(op, *lengths, B);
  at::Tensor c = lengths->to(at::kCPU).contiguous();
  if (B > 0) {
    const int64_t lo = c.min().item<int64_t>(), hi = c.max().item<int64_t>();
    TORCH_CHECK(lo >= 1 && hi <= T, op, ": lengths must lie in [1, T = ", T, "], got values from ", lo,
                " to ", hi);
  }
  return c;
}

// lengths ready for kernels on `device`: checked as above and copied there, or, when they
// are on that device already (a GPU), checked there without a host sync: their range by
// an asynchronous device-side assert, so that a CUDA graph can hold the op and a training
// loop never waits on it.
inline at::Tensor checked_lengths_on(const char* op, const std::optional<at::Tensor>& lengths, int64_t T,
                                     int64_t B, const at::Device& device) {
  if (!lengths || lengths->device() != device || device.is_cpu()) {
    const at::Tensor c = checked_lengths(op, lengths, T, B);
    return c.defined() ? c.to(device) : c;
  }
  const at::Tensor& l = *lengths;
  check_lengths_shape(op, l, B);
  if (B > 0)
    at::_assert_async(at::logical_and(l.ge(1), l.le(T)).all(),
                      std::string(op) + ": lengths must lie in [1, T = " + std::to_string(T) + "]");
  return l.contiguous();
}

}  // namespace birnn
