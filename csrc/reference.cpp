// The layer and the cell in ATen ops (reference.h).
#include "reference.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <vector>

namespace birnn::reference {
namespace {

// float32 for the 16-bit types, as the fused kernels compute; else the type itself.
at::ScalarType math_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

at::Tensor to_math(const at::Tensor& t) { return t.to(math_type(t.scalar_type())); }

// The activated gates' cell update from the pre-activations z [B,4H] (i, f, g, o) and c
// [B,H]: returns h_raw = o * tanh(c') and c'.
std::tuple<at::Tensor, at::Tensor> cell_update(const at::Tensor& z, const at::Tensor& c) {
  const std::vector<at::Tensor> g = z.chunk(4, 1);
  const at::Tensor c_new = g[1].sigmoid() * c + g[0].sigmoid() * g[2].tanh();
  return {g[3].sigmoid() * c_new.tanh(), c_new};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer(const at::Tensor& x_, const OptTensor& lengths,
                                                          const OptTensor& h0, const OptTensor& c0,
                                                          const Direction* dirs, int64_t D) {
  const at::Tensor x = to_math(x_);
  const int64_t T = x.size(0), B = x.size(1), H = dirs[0].w_hh.size(0) / 4, P = dirs[0].w_hh.size(1);
  const auto opts = x.options();
  // mask [T,B,1]: whether step s is inside row b's sequence. rev [T,B]: the time the reverse
  // direction reads at its step s, len-1-s inside the sequence and s past its end; its
  // own inverse, so the same gather puts the reverse outputs back in time order.
  at::Tensor mask, rev;
  const at::Tensor steps = at::arange(T, opts.dtype(at::kLong)).unsqueeze(1);  // [T,1]
  if (lengths) {
    const at::Tensor len = lengths->to(x.device()).unsqueeze(0);  // [1,B]
    const at::Tensor inside = steps < len;
    mask = inside.unsqueeze(2);
    rev = at::where(inside, len - 1 - steps, steps);
  } else {
    rev = (T - 1 - steps).expand({T, B});
  }
  auto in_time = [&](const at::Tensor& t) {  // [T,B,F] at the reverse direction's steps
    return t.gather(0, rev.unsqueeze(2).expand({T, B, t.size(2)}));
  };
  std::vector<at::Tensor> ys, hs, cs;
  for (int64_t d = 0; d < D; ++d) {
    const Direction& w = dirs[d];
    at::Tensor xd = d == 0 ? x : in_time(x);
    if (lengths) xd = at::where(mask, xd, at::zeros({}, opts));  // nothing read past a sequence's end
    at::Tensor xg = at::matmul(xd, to_math(w.w_ih).t());  // [T,B,4H]
    if (w.b_ih) xg = xg + to_math(*w.b_ih) + to_math(*w.b_hh);
    const at::Tensor w_hh_t = to_math(w.w_hh).t(), w_hr_t = w.w_hr ? to_math(*w.w_hr).t() : at::Tensor();
    at::Tensor h = h0 ? to_math((*h0)[d]) : at::zeros({B, P}, opts);
    at::Tensor c = c0 ? to_math((*c0)[d]) : at::zeros({B, H}, opts);
    std::vector<at::Tensor> y(T);
    for (int64_t s = 0; s < T; ++s) {
      auto [h_new, c_new] = cell_update(xg[s] + at::matmul(h, w_hh_t), c);
      if (w.w_hr) h_new = at::matmul(h_new, w_hr_t);
      if (lengths) {  // past the end: the state carried unchanged, a zero output
        h = at::where(mask[s], h_new, h), c = at::where(mask[s], c_new, c);
        y[s] = at::where(mask[s], h_new, at::zeros({}, opts));
      } else {
        h = h_new, c = c_new, y[s] = h_new;
      }
    }
    at::Tensor yd = at::stack(y);
    ys.push_back(d == 0 ? yd : in_time(yd));
    hs.push_back(h), cs.push_back(c);
  }
  const at::ScalarType t = x_.scalar_type();
  return {at::cat(ys, 2).to(t), at::stack(hs).to(t), at::stack(cs).to(t)};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                             const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& bias) {
  at::Tensor z = at::matmul(to_math(x), to_math(w_ih).t()) + at::matmul(to_math(h), to_math(w_hh).t());
  if (bias) z = z + to_math(*bias);
  auto [h_new, c_new] = cell_update(z, to_math(c));
  return {h_new.to(x.scalar_type()), c_new.to(x.scalar_type())};
}

bool needed(std::initializer_list<const at::Tensor*> tensors, bool needs_grad) {
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->key_set().has(c10::DispatchKey::FuncTorchGradWrapper)) return true;
  // A transform includes functorch's two dynamic-layer keys in the thread's dispatch keys
  // until it ends (torch._C._are_functorch_transforms_active reads the same).
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  if (needs_grad && (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
                     included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)))
    return true;
  // One look at whether the dual level is open before thirteen at the tensors' tangents
  // (each takes a lock): 0.3 us of a 13.5 us call at batch 1 otherwise. (try_get_by_idx
  // rather than has_any_level, which torch 2.13 and older lack.)
  if (!torch::autograd::ForwardADLevel::try_get_by_idx(0)) return false;
  for (const at::Tensor* t : tensors)  // level 0: torch.autograd.forward_ad's dual level
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  return false;
}

}  // namespace birnn::reference
