// Autograd of the forward ops, in C++ and for every backend: registered at the Autograd
// key, it saves what the backward op needs and calls it when gradients flow back.
//
// In C++ rather than through torch.library.register_autograd: at batch 1 a layer call
// is about 0.1 ms of work, and the Python autograd path (an autograd.Function's apply
// and setup_context, then a Python backward that unpacks the saved tensors and calls
// the backward op through torch.ops) added about 40 us to each forward+backward, 10 of
// them in the forward. torch.compile traces through this kernel like any other: the forward
// op (through its fake kernel) and the backward op appear in its graphs.
//
// Three cases go to the same math in ATen ops instead (reference.h), slow but
// differentiable any number of times and in both modes: a backward whose gradients must
// be differentiable themselves (create_graph=True: grad mode is on inside the backward),
// a call that a torch.func transform differentiates or that needs a gradient under one
// (vmap included), where a C++ autograd function refuses to run, and forward-mode AD (a
// tangent on an input). nn.LSTM does all three on the CPU, with its own ATen ops.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "reference.h"

namespace birnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor value_or_undefined(const OptTensor& t) { return t ? *t : at::Tensor(); }
OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// What save_for_backward may keep of `ts`: autograd refuses to save a tensor made under
// torch.inference_mode (features from a frozen front end, say), which nn.LSTM trains on
// in some layouts. Such a tensor cannot require a gradient, so a copy serves backward
// as well; every other tensor is saved as it is.
std::vector<at::Tensor> saveable(std::vector<at::Tensor> ts) {
  for (at::Tensor& t : ts)
    if (t.defined() && t.is_inference()) t = t.clone();
  return ts;
}

// The op `name`, typed with its C++ signature Sig, for calls through the dispatcher;
// looked up on the first call. Each signature below belongs to one op only, so one
// handle per Sig.
template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op_handle(const char* name) {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return handle;
}

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// The gradients of `outputs` (each with its incoming gradient; those without one are
// left out) with respect to the forward arguments `args` (an undefined tensor where an
// optional one was absent) that need one, differentiable themselves: out[i] for args[i].
variable_list differentiable_grads(AutogradContext* ctx, const std::vector<std::pair<at::Tensor, at::Tensor>>& outputs,
                                   const std::vector<const at::Tensor*>& args) {
  variable_list out(args.size()), ys, gys, inputs;
  std::vector<size_t> slot;
  for (const auto& [y, gy] : outputs)
    if (gy.defined()) ys.push_back(y), gys.push_back(gy);
  // The node has an edge for each tensor argument that was given, in order.
  for (size_t i = 0, edge = 0; i < args.size(); ++i) {
    if (!args[i]->defined()) continue;
    if (args[i]->requires_grad() && ctx->needs_input_grad(edge)) inputs.push_back(*args[i]), slot.push_back(i);
    ++edge;
  }
  if (ys.empty() || inputs.empty()) return out;
  const variable_list g = torch::autograd::grad(ys, inputs, gys, /*retain_graph=*/std::nullopt,
                                                /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < g.size(); ++k) out[slot[k]] = g[k];
  return out;
}

// ---------------------------------------------------------------- layer

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerForwardSig = LayerOutputs(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, bool);
using LayerBackwardSig = LayerOutputs(const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                      const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                      const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool);

// Whether the backward running now asks a gradient of any of the forward arguments
// marked in `pick`, out of `args` (an undefined tensor where an optional one was absent;
// the node has an edge for each argument that was given, in order, as in
// differentiable_grads): false when none of them requires one, and when the caller asked
// torch.autograd.grad for the gradients of other inputs only.
bool needs_any(AutogradContext* ctx, const std::vector<const at::Tensor*>& args, std::initializer_list<bool> pick) {
  size_t edge = 0;
  auto marked = pick.begin();
  for (const at::Tensor* t : args) {
    if (t->defined() && *marked && ctx->needs_input_grad(edge)) return true;
    edge += t->defined();
    ++marked;
  }
  return false;
}

}  // namespace

// Outside the anonymous namespace so that the graph node reads
// CppNode<birnn::LstmLayer> in grad_fn.name() and in profiles.
class LstmLayer : public torch::autograd::Function<LstmLayer> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& lengths,
                               const OptTensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& w_ih_r, const OptTensor& w_hh_r,
                               const OptTensor& b_ih_r, const OptTensor& b_hh_r, const OptTensor& w_hr_r) {
    // What backward needs is saved whatever the op's `training` says, which only says
    // whether the caller wants it back too (lstm_layer_forward_autograd drops it if not):
    // a module traced by torch.jit.trace for inference records training=False as a
    // constant, and may still be trained.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto& op = op_handle<LayerForwardSig>("birnn_ext::lstm_layer_forward");
    auto [y, h_n, c_n, gates, c_prev, h_prev, h_raw] = op.call(
        x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, /*training=*/true);
    ctx->set_materialize_grads(false);  // an unused output costs no zero tensor
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->saved_data["has_h0"] = h0.has_value();
    ctx->saved_data["has_c0"] = c0.has_value();
    // The states and biases for differentiable_backward; with them the saved tensors
    // stand for every forward argument (forward_args).
    ctx->save_for_backward(saveable({x, value_or_undefined(lengths), w_ih, w_hh, value_or_undefined(w_hr),
                                     value_or_undefined(w_ih_r), value_or_undefined(w_hh_r), value_or_undefined(w_hr_r),
                                     gates, c_prev, h_prev, h_raw, value_or_undefined(h0), value_or_undefined(c0),
                                     value_or_undefined(b_ih), value_or_undefined(b_hh), value_or_undefined(b_ih_r),
                                     value_or_undefined(b_hh_r)}));
    ctx->mark_non_differentiable({gates, c_prev, h_prev, h_raw});
    return {y, h_n, c_n, gates, c_prev, h_prev, h_raw};
  }

  // With create_graph=True: the layer again in ATen ops from the saved arguments, and
  // autograd's gradients of it, which record their own graph.
  static variable_list differentiable_backward(AutogradContext* ctx, const variable_list& grads,
                                               const variable_list& s) {
    const reference::Direction dirs[2] = {
        {s[2], s[3], defined_or_none(s[14]), defined_or_none(s[15]), defined_or_none(s[4])},
        {s[5], s[6], defined_or_none(s[16]), defined_or_none(s[17]), defined_or_none(s[7])}};
    auto [y, h_n, c_n] = reference::lstm_layer(s[0], defined_or_none(s[1]), defined_or_none(s[12]),
                                               defined_or_none(s[13]), dirs, s[6].defined() ? 2 : 1);
    return differentiable_grads(ctx, {{y, grads[0]}, {h_n, grads[1]}, {c_n, grads[2]}}, forward_args(s));
  }

  // The saved tensors in the order of the forward's arguments (undefined where one was
  // absent): x, lengths, h0, c0, then w_ih, w_hh, b_ih, b_hh, w_hr of each direction.
  static std::vector<const at::Tensor*> forward_args(const variable_list& s) {
    return {&s[0], &s[1], &s[12], &s[13], &s[2], &s[3], &s[14], &s[15], &s[4], &s[5], &s[6], &s[16], &s[17], &s[7]};
  }

  // One gradient per forward argument (14), undefined where an argument is absent.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(14);
    const at::Tensor &grad_y = grads[0], &grad_h_n = grads[1], &grad_c_n = grads[2];
    if (!grad_y.defined() && !grad_h_n.defined() && !grad_c_n.defined()) return out;
    const variable_list s = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grads, s);
    const at::Tensor &x = s[0], &w_ih = s[2], &w_hh = s[3], &w_hr = s[4], &w_ih_r = s[5], &w_hh_r = s[6],
                     &w_hr_r = s[7];
    const bool input_grad = ctx->needs_input_grad(0);
    // The weight matrices' gradients only where one is asked (w_ih, w_hh, w_hr of each direction).
    const bool weight_grad = needs_any(ctx, forward_args(s), {false, false, false, false, true, true, false, false,
                                                              true, true, true, false, false, true});
    const auto& op = op_handle<LayerBackwardSig>("birnn_ext::lstm_layer_backward");
    auto [dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr] = op.call(
        defined_or_none(grad_y), defined_or_none(grad_h_n), defined_or_none(grad_c_n), x, defined_or_none(s[1]),
        w_ih, w_hh, defined_or_none(w_hr), defined_or_none(w_ih_r), defined_or_none(w_hh_r),
        defined_or_none(w_hr_r), s[8], s[9], s[10], s[11], input_grad, weight_grad);
    // The op stacks the weights' gradients over directions; each Parameter gets its
    // row. b_ih and b_hh enter the gates as a sum: both get the same gradient.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t D = w_hh_r.defined() ? 2 : 1;
    if (input_grad) out[0] = dx;
    // No gradient for a state the caller left out (None: zeros made in the kernel).
    if (ctx->saved_data["has_h0"].toBool()) out[2] = dh0;
    if (ctx->saved_data["has_c0"].toBool()) out[3] = dc0;
    for (int64_t d = 0; d < D; ++d) {
      const size_t k = 4 + 5 * d;  // w_ih, w_hh, b_ih, b_hh, w_hr of direction d
      if (weight_grad) out[k] = dw_ih[d], out[k + 1] = dw_hh[d];
      if (has_bias) out[k + 2] = out[k + 3] = dbias[d];
      if (weight_grad && w_hr.defined()) out[k + 4] = dw_hr[d];
    }
    return out;
  }
};

namespace {

LayerOutputs lstm_layer_forward_autograd(const at::Tensor& x, const OptTensor& lengths, const OptTensor& h0,
                                         const OptTensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                                         const OptTensor& w_ih_r, const OptTensor& w_hh_r, const OptTensor& b_ih_r,
                                         const OptTensor& b_hh_r, const OptTensor& w_hr_r, bool training) {
  const at::Tensor none;
  auto opt = [&](const OptTensor& t) { return t ? &*t : &none; };
  const std::initializer_list<const at::Tensor*> tensors = {
      &x, opt(h0), opt(c0), &w_ih, &w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(w_ih_r), opt(w_hh_r), opt(b_ih_r),
      opt(b_hh_r), opt(w_hr_r)};
  const bool needs_grad = at::GradMode::is_enabled() && any_requires_grad(tensors);
  if (reference::needed(tensors, needs_grad)) {  // the ATen-op layer (reference.h); nothing saved
    const reference::Direction dirs[2] = {
        {w_ih, w_hh, b_ih, b_hh, w_hr},
        {value_or_undefined(w_ih_r), value_or_undefined(w_hh_r), b_ih_r, b_hh_r, w_hr_r}};
    auto [y, h_n, c_n] = reference::lstm_layer(x, lengths, h0, c0, dirs, w_hh_r ? 2 : 1);
    return {y, h_n, c_n, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
  if (!needs_grad) {  // nothing to record: straight to the backend
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto& op = op_handle<LayerForwardSig>("birnn_ext::lstm_layer_forward");
    return op.call(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, training);
  }
  variable_list r =
      LstmLayer::apply(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r);
  if (!training) return {r[0], r[1], r[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

// ---------------------------------------------------------------- cell

using CellOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CellForwardSig = CellOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, bool);
using CellBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, bool, bool);

}  // namespace

class LstmCell : public torch::autograd::Function<LstmCell> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& bias) {
    // The gates are saved whatever the op's `training` says, as in LstmLayer::forward.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto& op = op_handle<CellForwardSig>("birnn_ext::lstm_cell_forward");
    auto [h_new, c_new, gates] = op.call(x, h, c, w_ih, w_hh, bias, /*training=*/true);
    ctx->set_materialize_grads(false);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward(saveable({x, h, c, w_ih, w_hh, gates, value_or_undefined(bias)}));
    ctx->mark_non_differentiable({gates});
    return {h_new, c_new, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);  // one a forward argument
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const variable_list s = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {  // create_graph=True: see LstmLayer::differentiable_backward
      auto [h_new, c_new] = reference::lstm_cell(s[0], s[1], s[2], s[3], s[4], defined_or_none(s[6]));
      return differentiable_grads(ctx, {{h_new, grads[0]}, {c_new, grads[1]}},
                                  {&s[0], &s[1], &s[2], &s[3], &s[4], &s[6]});
    }
    const auto& op = op_handle<CellBackwardSig>("birnn_ext::lstm_cell_backward");
    const bool input_grad = ctx->needs_input_grad(0);
    const bool weight_grad = ctx->needs_input_grad(3) || ctx->needs_input_grad(4);  // w_ih, w_hh
    auto [dx, dh, dc, dw_ih, dw_hh, dbias] = op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), s[0], s[1],
                                                     s[2], s[3], s[4], s[5], input_grad, weight_grad);
    if (input_grad) out[0] = dx;
    out[1] = dh, out[2] = dc;
    if (weight_grad) out[3] = dw_ih, out[4] = dw_hh;
    if (ctx->saved_data["has_bias"].toBool()) out[5] = dbias;
    return out;
  }
};

namespace {

CellOutputs lstm_cell_forward_autograd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& bias,
                                       bool training) {
  const at::Tensor none;
  const std::initializer_list<const at::Tensor*> tensors = {&x, &h, &c, &w_ih, &w_hh, bias ? &*bias : &none};
  const bool needs_grad = at::GradMode::is_enabled() && any_requires_grad(tensors);
  if (reference::needed(tensors, needs_grad)) {  // as in lstm_layer_forward_autograd
    auto [h_new, c_new] = reference::lstm_cell(x, h, c, w_ih, w_hh, bias);
    return {h_new, c_new, at::Tensor()};
  }
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto& op = op_handle<CellForwardSig>("birnn_ext::lstm_cell_forward");
    return op.call(x, h, c, w_ih, w_hh, bias, training);
  }
  variable_list r = LstmCell::apply(x, h, c, w_ih, w_hh, bias);
  return {r[0], r[1], training ? r[2] : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
  m.impl("lstm_cell_forward", &lstm_cell_forward_autograd);
}

}  // namespace birnn
