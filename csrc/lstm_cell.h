// The gate math of one LSTM element (one batch row, one hidden unit), forward and
// backward. This is the only copy: the CPU loops and the CUDA kernels both call it,
// so the two paths cannot drift apart. Plain C++ with no torch types, so nvcc, g++
// and the host emulator of csrc/emu/ all compile it.
//
// Gate order is nn.LSTM's: i, f, g, o. `A` is the math type: float for
// float/half/bfloat16 storage, double for double.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define BIRNN_HD __host__ __device__ __forceinline__
#else
#define BIRNN_HD inline
#endif

namespace birnn {

BIRNN_HD float exp_(float x) { return expf(x); }
BIRNN_HD double exp_(double x) { return exp(x); }
BIRNN_HD float tanh_(float x) { return tanhf(x); }
BIRNN_HD double tanh_(double x) { return tanh(x); }

// 1/(1+e^-x): saturates to exactly 0 or 1 at the ends and propagates NaN.
template <typename A>
BIRNN_HD A sigmoid(A x) {
  return A(1) / (A(1) + exp_(-x));
}

// Activated gates of one element.
template <typename A>
struct Gates {
  A i, f, g, o;
};

// Pre-activations (x W_ih^T + h W_hh^T + bias) -> activated gates.
template <typename A>
BIRNN_HD Gates<A> activate(A pi, A pf, A pg, A po) {
  return Gates<A>{sigmoid(pi), sigmoid(pf), tanh_(pg), sigmoid(po)};
}

// c_t = f * c_{t-1} + i * g. Backward recomputes c_t with this same function
// instead of saving it.
template <typename A>
BIRNN_HD A cell_state(const Gates<A>& a, A c_prev) {
  return a.f * c_prev + a.i * a.g;
}

// h_t = o * tanh(c_t)
template <typename A>
BIRNN_HD A hidden_state(const Gates<A>& a, A c) {
  return a.o * tanh_(c);
}

// Gradients with respect to the pre-activations of one element, and to c_{t-1}.
template <typename A>
struct GateGrads {
  A di, df, dg, do_, dc_prev;
};

// dh: total gradient reaching h_t (from the output and from step t+1);
// dc: gradient reaching c_t from step t+1 (or from c_n).
template <typename A>
BIRNN_HD GateGrads<A> backward(const Gates<A>& a, A c_prev, A dh, A dc) {
  const A tc = tanh_(cell_state(a, c_prev));
  const A dct = dc + dh * a.o * (A(1) - tc * tc);
  GateGrads<A> r;
  r.di = dct * a.g * a.i * (A(1) - a.i);
  r.df = dct * c_prev * a.f * (A(1) - a.f);
  r.dg = dct * a.i * (A(1) - a.g * a.g);
  r.do_ = dh * tc * a.o * (A(1) - a.o);
  r.dc_prev = dct * a.f;
  return r;
}

// Which time step direction `dir` of a sequence of length `len` handles at sweep
// step `s` (0 <= s < T). The forward direction reads t = s. The reverse direction
// reads len-1-s while s < len, so it starts at the sequence's own last step; steps
// s >= len are padding, mapped to t = s so that every (t, b) is visited exactly once.
BIRNN_HD long long time_index(int dir, long long s, long long len) {
  return (dir == 0 || s >= len) ? s : len - 1 - s;
}

}  // namespace birnn
