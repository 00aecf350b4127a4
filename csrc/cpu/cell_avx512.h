// The forward cell over one batch row, written with AVX-512 intrinsics (float32 and
// bfloat16 storage). The
// generic row loop of cell_rows.cpp computes one hidden unit per iteration through the
// whole chain (four activations, then c, then tanh(c)); each iteration is a long
// dependent chain and the core overlaps few of them, so a 16-unit vector took about 115
// cycles. Here the activations are computed gate by gate in short independent loops
// first, then c and h: about 76 cycles per vector on this machine's Zen 5, where the
// two FMA pipes are the limit. The math is lstm_cell.h's (same exp polynomial, same
// tanh split at |x| < 0.625, true divisions), so the results agree with the generic row
// to within rounding.
#pragma once

#include <cstdint>

namespace birnn {

// True when the processor runs the rows below (AVX-512 F, DQ, BW and VL).
bool cell_avx512_supported();

// xg [4H]: x W_ih^T on entry, the activated gates (i, f, g, o) on exit. rec [4H]:
// h W_hh^T; bias [4H]; c [H] the cell state, updated in place; h [H] out: o * tanh(c).
void cell_forward_row_avx512(int64_t H, float* xg, const float* rec, const float* bias, float* c, float* h);
// The same with bfloat16 storage (its bits as uint16_t): the math and c in float32,
// each stored value rounded to nearest even.
void cell_forward_row_avx512(int64_t H, uint16_t* xg, const uint16_t* rec, const uint16_t* bias, float* c,
                             uint16_t* h);

}  // namespace birnn
