// The CPU kernels of lstm_cell_forward and lstm_cell_backward: one step, its products
// in orders fixed by the shapes (fixed_order.h), the cell rows of cell_rows.h.
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
#include "cell_avx512.h"
#include "small_gemm.h"

namespace birnn {
namespace {

// row(b) for each batch row b < B of a cell of H units, the rows split between threads:
// each row is independent of the others, so the results are the same for any split.
// Chunks of at least 16K gate values, so that a small batch stays on one thread.
template <typename Row>
void for_rows(int64_t B, int64_t H, const Row& row) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row(b);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(const at::Tensor& x_, const at::Tensor& h_,
                                                                     const at::Tensor& c, const at::Tensor& w_ih_,
                                                                     const at::Tensor& w_hh_,
                                                                     const std::optional<at::Tensor>& bias_,
                                                                     bool training) {
  const BelowAutograd below_autograd;
  const auto [B, I, H] = check_cell("lstm_cell_forward", x_, h_, c, w_ih_, w_hh_, bias_);
  if (float16::is(x_)) {
    using float16::widen, float16::narrow;
    auto [h_new, c_new, gates] =
        lstm_cell_forward_cpu(widen(x_), widen(h_), widen(c), widen(w_ih_), widen(w_hh_), widen(bias_), training);
    return {narrow(h_new), narrow(c_new), narrow(gates)};
  }
  const at::Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : pooled_zeros({4 * H}, x.options());
  at::Tensor pre = pooled_empty({B, 4 * H}, x.options());
  at::Tensor h_new = pooled_empty({B, H}, x.options());
  at::Tensor c_new = c.to(x.options().dtype(math_dtype(x.scalar_type())), false, true).contiguous();
  on_this_thread_if(B * 4 * H * (I + H) < cpu_rules::kCellMinMacsForThreads, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_cell_cpu", [&] {
      using T = scalar_t;
      at::Tensor rec = pooled_empty({B, 4 * H}, x.options());
      CellProducts<T> products;
      products.product(x, w_ih.t(), pre);
      products.product(h, w_hh.t(), rec);
      products.run();
      for_rows(B, H, [&](int64_t b) {
        T* g = pre.data_ptr<T>() + b * 4 * H;
        const T* r = rec.data_ptr<T>() + b * 4 * H;
        math_t<T>* cb = c_new.data_ptr<math_t<T>>() + b * H;
        T* hb = h_new.data_ptr<T>() + b * H;
        training ? cell_forward_row<T, true>(H, g, r, bias.data_ptr<T>(), cb, hb)
                 : cell_forward_row<T, false>(H, g, r, bias.data_ptr<T>(), cb, hb);
      });
    });
  });
  return {h_new, c_new.to(c.scalar_type()), training ? pre : at::Tensor()};  // no gates in inference
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cpu(
    const std::optional<at::Tensor>& grad_h_new, const std::optional<at::Tensor>& grad_c_new, const at::Tensor& x_,
    const at::Tensor& h_, const at::Tensor& c_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const at::Tensor& gates_, bool input_grad, bool weight_grads) {
  const BelowAutograd below_autograd;
  const auto [B, I, H] = check_cell_backward(grad_h_new, grad_c_new, x_, h_, c_, w_ih_, w_hh_, gates_);
  if (float16::is(x_)) {
    using float16::widen, float16::narrow;
    auto [dx, dh, dc, dw_ih, dw_hh, dbias] = lstm_cell_backward_cpu(widen(grad_h_new), widen(grad_c_new), widen(x_),
                                                                    widen(h_), widen(c_), widen(w_ih_), widen(w_hh_),
                                                                    widen(gates_), input_grad, weight_grads);
    return {narrow(dx), narrow(dh), narrow(dc), narrow(dw_ih), narrow(dw_hh), narrow(dbias)};
  }
  const at::Tensor x = x_.contiguous(), h = h_.contiguous();
  const at::Tensor c = c_.to(math_dtype(x_.scalar_type())).contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous(), gates = gates_.contiguous();
  auto opt = x.options();
  at::Tensor dh = grad_h_new ? grad_h_new->clone(at::MemoryFormat::Contiguous) : pooled_zeros({B, H}, opt);
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  at::Tensor dc = grad_c_new ? grad_c_new->to(mopt, false, true).contiguous() : pooled_zeros({B, H}, mopt);
  at::Tensor dg = pooled_empty({B, 4 * H}, opt);
  at::Tensor dx = input_grad ? pooled_empty({B, I}, opt) : pooled_empty({0}, opt);
  // The weight matrices' gradients: empty when not asked (the op's weight_grad).
  at::Tensor dw_ih = pooled_empty(weight_grads ? at::IntArrayRef{4 * H, I} : at::IntArrayRef{0}, opt);
  at::Tensor dw_hh = pooled_empty(weight_grads ? at::IntArrayRef{4 * H, H} : at::IntArrayRef{0}, opt);
  at::Tensor dbias = pooled_empty({4 * H}, opt);
  on_this_thread_if(B * 4 * H * (I + H) < cpu_rules::kCellMinMacsForThreads, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_cell_cpu", [&] {
      using T = scalar_t;
      for_rows(B, H, [&](int64_t b) {
        cell_backward_row<T>(H, gates.data_ptr<T>() + b * 4 * H, c.data_ptr<math_t<T>>() + b * H, nullptr,
                             dh.data_ptr<T>() + b * H, dc.data_ptr<math_t<T>>() + b * H, dg.data_ptr<T>() + b * 4 * H,
                             nullptr);
      });
      CellProducts<T> products;
      if (input_grad) products.product(dg, w_ih, dx);
      products.product(dg, w_hh, dh);
      if (weight_grads) {
        products.weight_grad(dg, x, dw_ih);
        products.weight_grad(dg, h, dw_hh);
      }
      products.run();
      column_sums(dg.data_ptr<T>(), B, 4 * H, dbias.data_ptr<T>());
    });
  });
  if (B == 0) dw_ih.zero_(), dw_hh.zero_(), dbias.zero_();
  return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CPU, m) {
  m.impl("lstm_cell_forward", &lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

// Takes no tensor, so there is no backend to dispatch on.
TORCH_LIBRARY_IMPL(birnn_ext, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_builds", [] {
    return std::vector<std::string>{small_gemm_build(), small_gemm_bf16_build(),
                                    cell_avx512_supported() ? "avx512" : "generic"};
  });
}

}  // namespace birnn
