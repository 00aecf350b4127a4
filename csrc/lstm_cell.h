// The gate math of one LSTM element (one batch row, one hidden unit), forward and
// backward. This is the only copy: the CPU loops and the CUDA kernels both call it,
// so the two paths cannot drift apart. Plain C++ with no torch types, so nvcc, g++
// and the host emulator of csrc/emu/ all compile it.
//
// Gate order is nn.LSTM's: i, f, g, o. `A` is the math type: float for
// float/half/bfloat16 storage, double for double.
#pragma once

#include <math.h>
#include <string.h>

// Always inlined: the CPU row loops vectorize only when these bodies sit in them
// (GCC outlined backward() on its own, which left the backward cell scalar).
#if defined(__CUDACC__)
#define BIRNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define BIRNN_HD inline __attribute__((always_inline))
#else
#define BIRNN_HD inline
#endif

namespace birnn {

BIRNN_HD float bits_to_float(unsigned int u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
BIRNN_HD unsigned int float_to_bits(float f) {
  unsigned int u;
  memcpy(&u, &f, sizeof u);
  return u;
}

// e^x in float without branches or calls, so that a loop over it vectorizes (libm's
// expf does not): x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, and
// 2^n put together from its bits. Within 2 ulp of e^x on [-87, 88]; outside that x
// is clamped, which a sigmoid or tanh of it cannot tell. NaN compares false in the
// clamps and comes out NaN.
BIRNN_HD float exp_(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Adding 1.5 * 2^23 rounds x/ln2 to an integer n held in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for exactness
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const unsigned int two_n = (float_to_bits(shifted) - 0x4B400000u + 127u) << 23;
  return p * bits_to_float(two_n);
}
BIRNN_HD double exp_(double x) { return exp(x); }

// tanh in float, branch-free like exp_: an odd polynomial near 0, where
// 1 - 2/(e^2x + 1) would lose the low bits, and that formula elsewhere.
BIRNN_HD float tanh_(float x) {
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  const float large = 1.0f - 2.0f / (exp_(2.0f * x) + 1.0f);
  return s < 0.390625f ? small : large;  // |x| < 0.625
}
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
