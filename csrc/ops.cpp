// Every birnn_ext op schema, in one place. Backends register their kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/, the forward ops' autograd in
// csrc/autograd.cpp; fake (meta) kernels and autocast rules are registered from Python
// in birnn_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(birnn_ext, m) {
  // One LSTM layer, every time step, D = 1 or 2 directions in one sweep.
  //   x [T,B,I]; lengths [B] int64 (1 <= len <= T) or None for all T; h0 [D,B,P] and
  //   c0 [D,B,H], each None for zeros (nn.LSTM's default state, made in the kernel:
  //   a tensor of zeros made by the caller cost 1.5 us a call at batch 1).
  //   The weights are the module's own Parameters, under nn.LSTM's names, read in place
  //   (no stacked copy): w_ih [4H,I]; w_hh [4H,P]; b_ih, b_hh [4H], both or neither;
  //   w_hr [P,H] (LSTM with projections, h = (o * tanh(c)) W_hr^T) or None, and then
  //   P = H. The *_reverse ones are the reverse direction's: given (w_ih_reverse and
  //   w_hh_reverse, and the others as for the forward direction), D = 2.
  //   Separate tensors rather than lists: a Tensor[] argument sends every autograd call
  //   through pytree flattening in Python, tens of microseconds per call.
  // Returns y [T,B,D*P] (zero where t >= len), h_n [D,B,P] and c_n [D,B,H] taken at
  // each sequence's own end, and what backward needs when `training` (else undefined,
  // None in Python, as torch's own ops leave an output nobody asked for):
  //   gates [T,B,D*4H] activated i,f,g,o; c_prev [T,B,D*H] and h_prev [D,T,B,P], the
  //   state each step started from; h_raw [D,T,B,H], o * tanh(c) (with w_hr only).
  //   The cell state is kept in the math type: c_prev is float32 for float16 and
  //   bfloat16 storage (float64 for float64).
  // Where an input requires a gradient, the op's autograd saves these whatever
  // `training` says (csrc/autograd.cpp): the flag only says whether they come back.
  m.def(
      "lstm_layer_forward(Tensor x, Tensor? lengths, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? w_ih_reverse, Tensor? w_hh_reverse, "
      "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, bool training) -> "
      "(Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor c_prev, Tensor h_prev, Tensor h_raw)");
  // Gradients of lstm_layer_forward. An absent grad_* counts as zeros. Returns
  // grad_x [T,B,I] (empty, [0], when not input_grad: the input of a first layer is
  // data, and its gradient a GEMM as large as the input projection), grad_h0 [D,B,P],
  // grad_c0 [D,B,H], and the weights' gradients stacked over directions:
  // grad_w_ih [D,4H,I], grad_w_hh [D,4H,P], grad_bias [D,4H] (the gradient of b_ih and
  // of b_hh alike), grad_w_hr [D,P,H] (empty without w_hr). grad_w_ih, grad_w_hh and
  // grad_w_hr are empty, [0], when not weight_grad (frozen weight matrices, or a
  // gradient asked of the input alone: two or three GEMMs as large as the input
  // projection left out); grad_bias, a sum of rows the sweep writes anyway, always comes.
  m.def(
      "lstm_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor? lengths, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? w_ih_reverse, Tensor? w_hh_reverse, Tensor? w_hr_reverse, "
      "Tensor gates, Tensor c_prev, Tensor h_prev, Tensor h_raw, bool input_grad=True, bool weight_grad=True) -> "
      "(Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");

  // One LSTM step, for FusedLSTMCell and hand-written loops over time.
  //   x [B,I]; h, c [B,H]; w_ih [4H,I]; w_hh [4H,H]; bias [4H] (b_ih + b_hh) or None.
  // Returns h', c' [B,H], and the activated gates [B,4H] when `training` (else undefined:
  // None in Python; saved for backward all the same where an input requires a gradient).
  m.def(
      "lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "bool training) -> (Tensor h_new, Tensor c_new, Tensor gates)");
  // Gradients of lstm_cell_forward. An absent grad_* counts as zeros. grad_x [B,I] is
  // empty, [0], when not input_grad (x is data: its gradient is a product as large as
  // x W_ih^T, a quarter of the backward's); grad_w_ih and grad_w_hh are empty when not
  // weight_grad (half the backward's products); grad_bias [4H] is that of b_ih and b_hh
  // alike, and always comes.
  m.def(
      "lstm_cell_backward(Tensor? grad_h_new, Tensor? grad_c_new, Tensor x, Tensor h, Tensor c, "
      "Tensor w_ih, Tensor w_hh, Tensor gates, bool input_grad=True, bool weight_grad=True) -> "
      "(Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");

  // The CPU buffer pool (csrc/cpu/buffer_pool.h): [cached_bytes, limit_bytes, hits,
  // misses], and the release of every kept block (returns the bytes freed).
  m.def("cpu_cache_stats() -> int[]");
  m.def("empty_cpu_cache() -> int");
  // The builds of the CPU kernels picked at load time: [the float32 step products
  // (avx512 | avx2 | baseline), the bfloat16 ones (avx512bf16 | widen), the forward cell
  // row (avx512 | generic)].
  m.def("cpu_kernel_builds() -> str[]");
}
