// See cell_rows.h.
#include "cell_rows.h"

#include <c10/util/BFloat16.h>

#include <cstring>

#include "../lstm_cell.h"
#include "cell_avx512.h"

namespace birnn {
namespace {

// The fused cell over one batch row (H elements). The loops are written to be
// vectorized: restrict pointers, no branches, and lstm_cell.h's float exp and tanh.
// Float and bfloat16 rows are compiled for AVX-512, AVX2 and baseline x86-64, chosen at
// load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define BIRNN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BIRNN_SIMD_CLONES
#endif

template <typename T, bool Training>
__attribute__((always_inline)) inline void cell_forward_row_impl(int64_t H, T* __restrict__ xg,
                                                                 const T* __restrict__ rec,
                                                                 const T* __restrict__ bias, math_t<T>* __restrict__ c,
                                                                 T* __restrict__ h) {
  using A = math_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    A pre[4];
    for (int k = 0; k < 4; ++k) pre[k] = load(xg[k * H + j]) + load(rec[k * H + j]) + load(bias[k * H + j]);
    const Gates<A> a = activate(pre[0], pre[1], pre[2], pre[3]);
    const A cn = cell_state(a, c[j]);
    const A hn = hidden_state(a, cn);
    if (Training) {
      xg[j] = store<T>(a.i);
      xg[H + j] = store<T>(a.f);
      xg[2 * H + j] = store<T>(a.g);
      xg[3 * H + j] = store<T>(a.o);
    }
    c[j] = cn;
    h[j] = store<T>(hn);
  }
}

template <typename T, bool HasDy>
__attribute__((always_inline)) inline void cell_backward_loop(int64_t H, const T* __restrict__ gates,
                                                              const math_t<T>* __restrict__ c_prev,
                                                              const T* __restrict__ dy, T* __restrict__ dh,
                                                              math_t<T>* __restrict__ dc, T* __restrict__ dg) {
  using A = math_t<T>;
  for (int64_t j = 0; j < H; ++j) {
    const Gates<A> a{load(gates[j]), load(gates[H + j]), load(gates[2 * H + j]), load(gates[3 * H + j])};
    A dh_total = load(dh[j]);
    if constexpr (HasDy) dh_total += load(dy[j]);
    const GateGrads<A> r = backward(a, c_prev[j], dh_total, dc[j]);
    dg[j] = store<T>(r.di);
    dg[H + j] = store<T>(r.df);
    dg[2 * H + j] = store<T>(r.dg);
    dg[3 * H + j] = store<T>(r.do_);
    dc[j] = r.dc_prev;
    dh[j] = store<T>(A(0));
  }
}

// The backward loop stays free of branches (dy's presence is decided outside it) and writes one
// output stream per gate: with dg_step written in it too, GCC no longer vectorizes it.
template <typename T>
__attribute__((always_inline)) inline void cell_backward_row_impl(int64_t H, const T* gates, const math_t<T>* c_prev,
                                                                  const T* dy, T* dh, math_t<T>* dc, T* dg,
                                                                  T* dg_step) {
  dy ? cell_backward_loop<T, true>(H, gates, c_prev, dy, dh, dc, dg)
     : cell_backward_loop<T, false>(H, gates, c_prev, dy, dh, dc, dg);
  if (dg_step) std::memcpy(dg_step, dg, 4 * H * sizeof(T));
}

// The forward row of cell_avx512.h (float32 and bfloat16), where the processor has
// AVX-512. It leaves the activated gates in xg in inference too, where xg is scratch.
template <typename T>
inline bool forward_row_avx512(int64_t, T*, const T*, const T*, math_t<T>*, T*) {
  return false;
}
template <>
inline bool forward_row_avx512<float>(int64_t H, float* xg, const float* rec, const float* bias, float* c, float* h) {
  if (!cell_avx512_supported()) return false;
  cell_forward_row_avx512(H, xg, rec, bias, c, h);
  return true;
}
template <>
inline bool forward_row_avx512<at::BFloat16>(int64_t H, at::BFloat16* xg, const at::BFloat16* rec,
                                             const at::BFloat16* bias, float* c, at::BFloat16* h) {
  if (!cell_avx512_supported()) return false;
  cell_forward_row_avx512(H, reinterpret_cast<uint16_t*>(xg), reinterpret_cast<const uint16_t*>(rec),
                          reinterpret_cast<const uint16_t*>(bias), c, reinterpret_cast<uint16_t*>(h));
  return true;
}

}  // namespace

// Per-CPU clones of the rows for the storage types that matter for speed.
#define BIRNN_ROW_CLONES(T, suffix)                                                                             \
  BIRNN_SIMD_CLONES static void cell_forward_row_##suffix##_train(int64_t H, T* xg, const T* rec, const T* bias,       \
                                                           math_t<T>* c, T* h) {                                \
    cell_forward_row_impl<T, true>(H, xg, rec, bias, c, h);                                                     \
  }                                                                                                             \
  BIRNN_SIMD_CLONES static void cell_forward_row_##suffix##_infer(int64_t H, T* xg, const T* rec, const T* bias,       \
                                                           math_t<T>* c, T* h) {                                \
    cell_forward_row_impl<T, false>(H, xg, rec, bias, c, h);                                                    \
  }                                                                                                             \
  BIRNN_SIMD_CLONES static void cell_backward_row_##suffix(int64_t H, const T* gates, const math_t<T>* c_prev,         \
                                                    const T* dy, T* dh, math_t<T>* dc, T* dg, T* dg_step) {     \
    cell_backward_row_impl<T>(H, gates, c_prev, dy, dh, dc, dg, dg_step);                                       \
  }                                                                                                             \
  template <>                                                                                                   \
  void cell_forward_row<T, true>(int64_t H, T * xg, const T* rec, const T* bias, math_t<T>* c, T* h) {          \
    if (!forward_row_avx512<T>(H, xg, rec, bias, c, h)) cell_forward_row_##suffix##_train(H, xg, rec, bias, c, h); \
  }                                                                                                             \
  template <>                                                                                                   \
  void cell_forward_row<T, false>(int64_t H, T * xg, const T* rec, const T* bias, math_t<T>* c, T* h) {         \
    if (!forward_row_avx512<T>(H, xg, rec, bias, c, h)) cell_forward_row_##suffix##_infer(H, xg, rec, bias, c, h); \
  }                                                                                                             \
  template <>                                                                                                   \
  void cell_backward_row<T>(int64_t H, const T* gates, const math_t<T>* c_prev, const T* dy, T* dh,             \
                            math_t<T>* dc, T* dg, T* dg_step) {                                                 \
    cell_backward_row_##suffix(H, gates, c_prev, dy, dh, dc, dg, dg_step);                                      \
  }
BIRNN_ROW_CLONES(float, f32)
BIRNN_ROW_CLONES(at::BFloat16, bf16)
#undef BIRNN_ROW_CLONES

// float64: the generic loops, compiled once.
template <>
void cell_forward_row<double, true>(int64_t H, double* xg, const double* rec, const double* bias, double* c,
                                    double* h) {
  cell_forward_row_impl<double, true>(H, xg, rec, bias, c, h);
}
template <>
void cell_forward_row<double, false>(int64_t H, double* xg, const double* rec, const double* bias, double* c,
                                     double* h) {
  cell_forward_row_impl<double, false>(H, xg, rec, bias, c, h);
}
template <>
void cell_backward_row<double>(int64_t H, const double* gates, const double* c_prev, const double* dy, double* dh,
                               double* dc, double* dg, double* dg_step) {
  cell_backward_row_impl<double>(H, gates, c_prev, dy, dh, dc, dg, dg_step);
}

}  // namespace birnn
