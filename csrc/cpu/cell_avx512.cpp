// See cell_avx512.h. Compiled for AVX-512 function by function (the target pragma), so
// the library still loads on processors without it; callers check
// cell_avx512_supported() first.
#include "cell_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstdlib>
#include <string>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")

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

// 16 storage values as float32 lanes (masked lanes zero), and back. bfloat16 (its bits
// as uint16_t) widens exactly; it narrows to nearest even with NaN to the quiet NaN
// 0x7FC0, in integer operations: the same bits as bf16_bits.h's float_to_bf16(), and no need
// for AVX512_BF16.
BIRNN_V __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
BIRNN_V __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
BIRNN_V void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
BIRNN_V void store16(uint16_t* p, __mmask16 m, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// out[j] = act(xg[j] + rec[j] + bias[j]) for j < n: whole vectors, then one masked one.
// out may be xg itself.
template <bool Tanh, typename S>
BIRNN_V void activate_span(int64_t n, const S* xg, const S* __restrict__ rec, const S* __restrict__ bias,
                           float* out) {
  auto act = [](__m512 v) { return Tanh ? tanh16(v) : sigmoid16(v); };
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : tail_mask(n - j);
    const __m512 pre = _mm512_add_ps(_mm512_add_ps(load16(xg + j, m), load16(rec + j, m)), load16(bias + j, m));
    store16(out + j, m, act(pre));
  }
}

// c = f c + i g, h = o tanh(c) over the activated gates a of one vector of units.
template <typename S>
BIRNN_V void state16(const float* a, int64_t H, int64_t j, __mmask16 m, float* c, S* h) {
  const __m512 i = load16(a + j, m), f = load16(a + H + j, m), g = load16(a + 2 * H + j, m),
               o = load16(a + 3 * H + j, m);
  const __m512 cn = _mm512_fmadd_ps(f, load16(c + j, m), _mm512_mul_ps(i, g));
  store16(c + j, m, cn);
  store16(h + j, m, _mm512_mul_ps(o, tanh16(cn)));
}

// The row: activations into act [4H] (float32), then c and h.
template <typename S>
BIRNN_V void forward_row(int64_t H, const S* xg, const S* rec, const S* bias, float* act, float* c, S* h) {
  // Gate order i, f, g, o: sigmoid over i and f, tanh over g, sigmoid over o.
  activate_span<false>(2 * H, xg, rec, bias, act);
  activate_span<true>(H, xg + 2 * H, rec + 2 * H, bias + 2 * H, act + 2 * H);
  activate_span<false>(H, xg + 3 * H, rec + 3 * H, bias + 3 * H, act + 3 * H);
  for (int64_t j = 0; j < H; j += 16) state16(act, H, j, H - j >= 16 ? __mmask16(0xFFFF) : tail_mask(H - j), c, h);
}

}  // namespace

void cell_forward_row_avx512(int64_t H, float* xg, const float* rec, const float* bias, float* c, float* h) {
  forward_row(H, xg, rec, bias, xg, c, h);  // the activations in place
}

void cell_forward_row_avx512(int64_t H, uint16_t* xg, const uint16_t* rec, const uint16_t* bias, float* c,
                             uint16_t* h) {
  // The activations in float32 beside the row (c and h are computed from them, as the
  // generic row does), then rounded into xg.
  thread_local std::vector<float> act;
  act.resize(size_t(4 * H));
  forward_row(H, xg, rec, bias, act.data(), c, h);
  for (int64_t j = 0; j < 4 * H; j += 16) {
    const __mmask16 m = 4 * H - j >= 16 ? __mmask16(0xFFFF) : tail_mask(4 * H - j);
    store16(xg + j, m, load16(act.data() + j, m));
  }
}

}  // namespace birnn

#pragma GCC pop_options

namespace birnn {
bool cell_avx512_supported() {
  // BIRNN_EXT_CELL=generic takes the generic rows of cell_rows.cpp (the tests run both).
  static const bool supported = [] {
    const char* env = std::getenv("BIRNN_EXT_CELL");
    if (env && std::string(env) == "generic") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return supported;
}
}  // namespace birnn

#else

#include <cstdlib>

namespace birnn {
bool cell_avx512_supported() { return false; }
// Never called: callers check cell_avx512_supported() first.
void cell_forward_row_avx512(int64_t, float*, const float*, const float*, float*, float*) { std::abort(); }
void cell_forward_row_avx512(int64_t, uint16_t*, const uint16_t*, const uint16_t*, float*, uint16_t*) { std::abort(); }
}  // namespace birnn

#endif
