// The fused cell over one batch row (csrc/lstm_cell.h's math, vectorized), forward
// and backward, for each storage type: cell_rows.cpp holds the loops, compiled for
// AVX-512, AVX2 and baseline x86-64 and chosen at load time, and the AVX-512 forward row
// of cell_avx512.h where the processor has it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "kernel_util.h"

namespace birnn {

// xg [4H]: x W_ih^T on entry, the activated gates on exit when Training (scratch in
// inference). rec [4H]: h W_hh^T; bias [4H]; c [H] the cell state, updated in place;
// h [H] out: o * tanh(c), the new hidden state (before the projection, where there is one).
template <typename T, bool Training>
void cell_forward_row(int64_t H, T* xg, const T* rec, const T* bias, math_t<T>* c, T* h);

// gates [4H] activated; c_prev [H]; dy [H] or nullptr; dh, dc [H]: the gradients
// reaching h_t and c_t on entry, dh zeroed (the caller adds dg W_hh) and dc that of
// c_{t-1} on exit; dg [4H] out: the gradients of the pre-activations; dg_step [4H] out:
// a copy of dg (a sweep's per-step copy), or nullptr for none.
template <typename T>
void cell_backward_row(int64_t H, const T* gates, const math_t<T>* c_prev, const T* dy, T* dh, math_t<T>* dc, T* dg,
                       T* dg_step);

// Defined in cell_rows.cpp for these storage types.
#define BIRNN_CELL_ROWS(T)                                                                                        \
  template <>                                                                                                     \
  void cell_forward_row<T, true>(int64_t H, T * xg, const T* rec, const T* bias, math_t<T>* c, T* h);            \
  template <>                                                                                                     \
  void cell_forward_row<T, false>(int64_t H, T * xg, const T* rec, const T* bias, math_t<T>* c, T* h);           \
  template <>                                                                                                     \
  void cell_backward_row<T>(int64_t H, const T* gates, const math_t<T>* c_prev, const T* dy, T* dh,               \
                            math_t<T>* dc, T* dg, T* dg_step);
BIRNN_CELL_ROWS(float)
BIRNN_CELL_ROWS(double)
BIRNN_CELL_ROWS(at::BFloat16)
#undef BIRNN_CELL_ROWS

}  // namespace birnn
