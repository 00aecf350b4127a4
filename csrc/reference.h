// The layer and the cell of csrc/ops.cpp written in ATen ops, step by step: slow, but
// differentiable any number of times and by every torch.func transform. The fused ops'
// autograd (csrc/autograd.cpp) turns to them where the fused backward cannot serve:
//   - gradients that must themselves be differentiable (backward with create_graph=True:
//     gradient penalties, Hessian-vector products, second-order meta-learning), which
//     the fused backward op, a kernel without a derivative of its own, cannot record;
//   - torch.func's grad, vjp and jvp transforms, which take no C++ autograd function;
//   - forward-mode AD (torch.autograd.forward_ad), which the fused ops have no formula for.
// Same arguments and outputs as lstm_layer_forward and lstm_cell_forward (less the
// saved activations), same math in the same math type (float32 for the 16-bit types).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace birnn::reference {

using OptTensor = std::optional<at::Tensor>;

// One direction's parameters, nn.LSTM's names: w_ih [4H,I], w_hh [4H,P], b_ih and b_hh
// [4H] (both or neither), w_hr [P,H] or none.
struct Direction {
  at::Tensor w_ih, w_hh;
  OptTensor b_ih, b_hh, w_hr;
};

// x [T,B,I]; lengths [B] (1 <= len <= T) or none; h0 [D,B,P], c0 [D,B,H] or none for
// zeros; dirs[0] forward, dirs[1] (D = 2) reverse. Returns y [T,B,D*P] (zero where t >=
// len), h_n [D,B,P], c_n [D,B,H] at each sequence's end.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer(const at::Tensor& x, const OptTensor& lengths,
                                                          const OptTensor& h0, const OptTensor& c0,
                                                          const Direction* dirs, int64_t D);

// x [B,I]; h, c [B,H]; w_ih [4H,I]; w_hh [4H,H]; bias [4H] or none. Returns h', c'.
std::tuple<at::Tensor, at::Tensor> lstm_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                             const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& bias);

// Whether a call must take the ATen-op layer: where a torch.func transform differentiates
// one of `tensors` (grad, vjp, jvp wrap what they differentiate), where a gradient is
// needed (`needs_grad`) under any torch.func transform, vmap included (a C++ autograd
// function refuses to run there), or where one of `tensors` carries a forward-mode
// tangent (torch.autograd.forward_ad), which the fused ops have no formula for: below
// autograd they would drop it and return no tangent. Elsewhere the fused kernels serve,
// under vmap too (ops.py batches the vmapped dimension into the batch rows).
bool needed(std::initializer_list<const at::Tensor*> tensors, bool needs_grad);

}  // namespace birnn::reference
