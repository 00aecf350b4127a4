// See cell_avx512.h. Compiled for AVX-512 function by function (the target pragma), so
// the library still loads on processors without it; callers check
// cell_avx512_supported() first.
#include "cell_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

namespace birnn {
namespace {

#define BIRNN_V inline __attribute__((always_inline))

BIRNN_V __m512 splat(float v) { return _mm512_set1_ps(v); }

// lstm_cell.h's exp_: x clamped to [-87, 88] (NaN passes: max and min return their
// second operand when either is NaN), x = n ln2 + r, the same degree-6 polynomial for
// e^r, and 2^n applied with scalef (exact, as n stays within the normal exponents).
BIRNN_V __m512 exp16(__m512 x) {
  x = _mm512_min_ps(splat(88.0f), _mm512_max_ps(splat(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, splat(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, splat(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, splat(-2.12194440e-4f), r);
  __m512 p = splat(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, splat(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, splat(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, splat(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, splat(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, splat(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), splat(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + e^-x)
BIRNN_V __m512 sigmoid16(__m512 x) {
  return _mm512_div_ps(splat(1.0f), _mm512_add_ps(splat(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// lstm_cell.h's tanh_: the odd polynomial for |x| < 0.625, 1 - 2 / (e^2x + 1) elsewhere.
BIRNN_V __m512 tanh16(__m512 x) {
  const __m512 s = _mm512_mul_ps(x, x);
  __m512 p = splat(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, s, splat(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, s, splat(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, s, splat(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, s, splat(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, s), x, x);
  const __m512 large =
      _mm512_sub_ps(splat(1.0f), _mm512_div_ps(splat(2.0f), _mm512_add_ps(exp16(_mm512_add_ps(x, x)), splat(1.0f))));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, splat(0.390625f), _CMP_LT_OQ), large, small);
}

BIRNN_V __mmask16 tail_mask(int64_t n) { return __mmask16((1u << n) - 1u); }

// xg[j] = act(xg[j] + rec[j] + bias[j]) for j < n: whole vectors, then one masked one.
template <bool Tanh>
BIRNN_V void activate_span(int64_t n, float* __restrict__ xg, const float* __restrict__ rec,
                           const float* __restrict__ bias) {
  auto act = [](__m512 v) { return Tanh ? tanh16(v) : sigmoid16(v); };
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 pre = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(xg + j), _mm512_loadu_ps(rec + j)),
                                     _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(xg + j, act(pre));
  }
  if (j < n) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 pre = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, xg + j), _mm512_maskz_loadu_ps(m, rec + j)),
                                     _mm512_maskz_loadu_ps(m, bias + j));
    _mm512_mask_storeu_ps(xg + j, m, act(pre));
  }
}

// c = f c + i g, h = o tanh(c) over the activated gates a of one vector of units.
BIRNN_V void state16(const float* a, int64_t H, int64_t j, __mmask16 m, float* c, float* h) {
  const __m512 i = _mm512_maskz_loadu_ps(m, a + j), f = _mm512_maskz_loadu_ps(m, a + H + j),
               g = _mm512_maskz_loadu_ps(m, a + 2 * H + j), o = _mm512_maskz_loadu_ps(m, a + 3 * H + j);
  const __m512 cn = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c + j), _mm512_mul_ps(i, g));
  _mm512_mask_storeu_ps(c + j, m, cn);
  _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(o, tanh16(cn)));
}

}  // namespace

void cell_forward_row_avx512(int64_t H, float* xg, const float* rec, const float* bias, float* c, float* h) {
  // Gate order i, f, g, o: sigmoid over i and f, tanh over g, sigmoid over o.
  activate_span<false>(2 * H, xg, rec, bias);
  activate_span<true>(H, xg + 2 * H, rec + 2 * H, bias + 2 * H);
  activate_span<false>(H, xg + 3 * H, rec + 3 * H, bias + 3 * H);
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) state16(xg, H, j, __mmask16(0xFFFF), c, h);
  if (j < H) state16(xg, H, j, tail_mask(H - j), c, h);
}

}  // namespace birnn

#pragma GCC pop_options

namespace birnn {
bool cell_avx512_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return supported;
}
}  // namespace birnn

#else

#include <cstdlib>

namespace birnn {
bool cell_avx512_supported() { return false; }
// Never called: callers check cell_avx512_supported() first.
void cell_forward_row_avx512(int64_t, float*, const float*, const float*, float*, float*) { std::abort(); }
}  // namespace birnn

#endif
