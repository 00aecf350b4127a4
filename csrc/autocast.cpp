// Autocast of the forward ops, for the CPU and CUDA regions: the op's floating-point
// tensors on the region's device go to the region's dtype, then the op runs with autocast
// off. CUDA: float16 or bfloat16, which the kernels store (float32 math and cell state).
// CPU: bfloat16. A float16 region runs in float32: float16 on the CPU runs the float32
// kernels anyway (cpu/float16.h), so the casts would only add two roundings.
// The backward ops take what the forward saved, in the forward's dtypes: no rule.
//
// One exception, the CPU layer op in a bfloat16 region in inference: its float32 weights
// go as they are. The kernel rounds them to bfloat16 as it packs them for the step
// products, which it does on every call anyway (csrc/cpu/blas.h, StepWeight), so the ten
// casts (a copy of every weight, each call) are left out. In training they stay, so that
// the weights' gradients flow back through them.
//
// In C++ rather than Python: at batch 1 the Python rule (a call into Python from the
// dispatcher, a cast per argument, the op called again) took about 50 us of a 170 us
// layer call (B 1, T 28, H 128). ops.py keeps the same rule for the Python dispatcher,
// which torch.compile traces with.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace birnn {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op_handle(const char* name) {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return handle;
}

template <c10::DeviceType Dev>
at::ScalarType region_dtype() {
  const at::ScalarType t = at::autocast::get_autocast_dtype(Dev);
  if constexpr (Dev == c10::DeviceType::CPU) return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  return t;
}

template <c10::DeviceType Dev>
struct Cast {
  at::ScalarType to;
  bool applies(const at::Tensor& t) const { return t.defined() && t.is_floating_point() && t.device().type() == Dev; }
  at::Tensor operator()(const at::Tensor& t) const { return applies(t) ? t.to(to) : t; }
  OptTensor operator()(const OptTensor& t) const { return t ? OptTensor((*this)(*t)) : std::nullopt; }
};

bool requires_grad(const OptTensor& t) { return t && t->requires_grad(); }

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerForwardSig = LayerOutputs(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                     const OptTensor&, const OptTensor&, bool);
using CellOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CellForwardSig = CellOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, bool);

template <c10::DeviceType Dev>
LayerOutputs layer_forward(const at::Tensor& x, const OptTensor& lengths, const OptTensor& h0, const OptTensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                           const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& w_ih_r,
                           const OptTensor& w_hh_r, const OptTensor& b_ih_r, const OptTensor& b_hh_r,
                           const OptTensor& w_hr_r, bool training) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(Dev));
  const Cast<Dev> cast{region_dtype<Dev>()};
  const std::array<OptTensor, 10> w{w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r};
  bool keep = Dev == c10::DeviceType::CPU && cast.to == at::kBFloat16 && !training;
  if (keep) {
    bool grad = x.requires_grad() || requires_grad(h0) || requires_grad(c0);
    for (const OptTensor& t : w) {
      keep = keep && (!t || (t->scalar_type() == at::kFloat && t->device().type() == Dev));
      grad = grad || requires_grad(t);
    }
    keep = keep && !(grad && at::GradMode::is_enabled());
  }
  std::array<OptTensor, 10> wc;
  for (size_t i = 0; i < w.size(); ++i) wc[i] = keep ? w[i] : cast(w[i]);
  return op_handle<LayerForwardSig>("birnn_ext::lstm_layer_forward")
      .call(cast(x), lengths, cast(h0), cast(c0), *wc[0], *wc[1], wc[2], wc[3], wc[4], wc[5], wc[6], wc[7], wc[8],
            wc[9], training);
}

template <c10::DeviceType Dev>
CellOutputs cell_forward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const OptTensor& bias, bool training) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(Dev));
  const Cast<Dev> cast{region_dtype<Dev>()};
  return op_handle<CellForwardSig>("birnn_ext::lstm_cell_forward")
      .call(cast(x), cast(h), cast(c), cast(w_ih), cast(w_hh), cast(bias), training);
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, AutocastCPU, m) {
  m.impl("lstm_layer_forward", &layer_forward<c10::DeviceType::CPU>);
  m.impl("lstm_cell_forward", &cell_forward<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(birnn_ext, AutocastCUDA, m) {
  m.impl("lstm_layer_forward", &layer_forward<c10::DeviceType::CUDA>);
  m.impl("lstm_cell_forward", &cell_forward<c10::DeviceType::CUDA>);
}

}  // namespace birnn
