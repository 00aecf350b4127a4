// CPU kernels of the layer and cell ops. A layer sweep: the input projection of every
// step and direction (one GEMM in training; chunk by chunk per direction in inference),
// then per step a recurrent product and the fused cell of lstm_cell.h. The directions
// of a bidirectional layer are independent, so each runs its whole sweep on its own
// thread. Products are called directly into preallocated buffers (blas.h): the step
// products on small_gemm over weights packed once per call (float32), the large ones on
// oneDNN. Backward sweeps skip the steps no gradient has reached, and the weight
// gradients are computed in row blocks taken by whichever thread is free (BlockWork).
// Large buffers come from buffer_pool.h. Storage float32, float64 or bfloat16; the math
// and the cell state in math_t.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <thread>
#include <cstring>
#include <string>
#include <vector>

#include "../layer_checks.h"
#include "../lstm_cell.h"
#include "blas.h"
#include "buffer_pool.h"
#include "cell_avx512.h"

namespace birnn {
namespace {

// The math type: float for float and bfloat16 storage, double for double. The gate math,
// the cell state and the sums run in it.
template <typename T>
using math_t = at::opmath_type<T>;

// Entered first by every kernel: the tensors a kernel makes are its scratch and its
// outputs, never part of an autograd graph, so its own ATen calls (views, allocations,
// copies) skip the autograd and view-tracking layers. At batch 1 a layer call makes
// about forty of them, and each paid a microsecond or more for that bookkeeping.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

inline at::ScalarType math_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// Storage <-> math conversions for the row loops. c10::BFloat16's own conversions
// branch on NaN and do not vectorize; these compute the same bits (round to nearest
// even, NaN to the quiet NaN 0x7FC0) with shifts, adds and a select.
template <typename T>
inline math_t<T> load(T v) {
  return math_t<T>(v);
}
template <>
inline float load(at::BFloat16 v) {
  const uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T>
inline T store(math_t<T> v) {
  return T(v);
}
template <>
inline at::BFloat16 store<at::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  at::BFloat16 b;
  b.x = uint16_t(f != f ? 0x7FC0u : rounded);
  return b;
}

// The fused cell over one batch row (H elements). The loops are written to be
// vectorized: restrict pointers, no branches, and lstm_cell.h's float exp and tanh.
// Float and bfloat16 rows are compiled for AVX-512, AVX2 and baseline x86-64, chosen at
// load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define BIRNN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BIRNN_SIMD_CLONES
#endif

// xg [4H]: x W_ih^T on entry, the activated gates on exit when Training.
// rec [4H]: h W_hh^T; bias [4H]; c [H] the cell state, updated in place; h [H] out:
// o * tanh(c), the new hidden state (before the projection, where there is one).
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

// gates [4H] activated; c_prev [H]; dy [H] or nullptr; dh, dc [H]: the gradients
// reaching h_t and c_t on entry, dh zeroed (the caller adds dg W_hh) and dc that of
// c_{t-1} on exit; dg, dg_step [4H] out: the gradients of the pre-activations.
// The loop stays free of branches (dy's presence is decided outside it) and writes one
// output stream per gate: with dg_step written in it too, GCC no longer vectorizes it.
template <typename T>
__attribute__((always_inline)) inline void cell_backward_row_impl(int64_t H, const T* gates, const math_t<T>* c_prev,
                                                                  const T* dy, T* dh, math_t<T>* dc, T* dg,
                                                                  T* dg_step) {
  dy ? cell_backward_loop<T, true>(H, gates, c_prev, dy, dh, dc, dg)
     : cell_backward_loop<T, false>(H, gates, c_prev, dy, dh, dc, dg);
  std::memcpy(dg_step, dg, 4 * H * sizeof(T));
}

template <typename T, bool Training>
void cell_forward_row(int64_t H, T* xg, const T* rec, const T* bias, math_t<T>* c, T* h) {
  cell_forward_row_impl<T, Training>(H, xg, rec, bias, c, h);
}
template <typename T>
void cell_backward_row(int64_t H, const T* gates, const math_t<T>* c_prev, const T* dy, T* dh, math_t<T>* dc, T* dg,
                       T* dg_step) {
  cell_backward_row_impl<T>(H, gates, c_prev, dy, dh, dc, dg, dg_step);
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

// Per-CPU clones of the rows for the storage types that matter for speed.
#define BIRNN_ROW_CLONES(T, suffix)                                                                             \
  BIRNN_SIMD_CLONES void cell_forward_row_##suffix##_train(int64_t H, T* xg, const T* rec, const T* bias,       \
                                                           math_t<T>* c, T* h) {                                \
    cell_forward_row_impl<T, true>(H, xg, rec, bias, c, h);                                                     \
  }                                                                                                             \
  BIRNN_SIMD_CLONES void cell_forward_row_##suffix##_infer(int64_t H, T* xg, const T* rec, const T* bias,       \
                                                           math_t<T>* c, T* h) {                                \
    cell_forward_row_impl<T, false>(H, xg, rec, bias, c, h);                                                    \
  }                                                                                                             \
  BIRNN_SIMD_CLONES void cell_backward_row_##suffix(int64_t H, const T* gates, const math_t<T>* c_prev,         \
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

// acc[k] += row[k]; a loop of its own so that it vectorizes.
template <typename T>
void add_row(int64_t n, const T* __restrict__ row, math_t<T>* __restrict__ acc) {
  for (int64_t k = 0; k < n; ++k) acc[k] += load(row[k]);
}

// out[e] = parts[0][e] + parts[1][e] + ... (count parts of n values each, n apart;
// zeros when there are none), summed in part order: the same bits however the range
// is split between threads. A span of outputs at a time, in a buffer that stays in L1,
// one part after the other: loops that vectorize (one output at a time over the parts
// did not, and took 5.0 ms of a 133 ms forward+backward at bench_lstm.py's large size,
// against 1.7 now).
template <typename T>
void sum_parts(const T* parts, int64_t count, int64_t n, T* out) {
  if (count == 0) {
    std::fill(out, out + n, T(0));
    return;
  }
  constexpr int64_t kSpan = 1024;
  at::parallel_for(0, n, 4 * kSpan, [&](int64_t e0, int64_t e1) {
    math_t<T> acc[kSpan];
    for (int64_t s0 = e0; s0 < e1; s0 += kSpan) {
      const int64_t len = std::min(kSpan, e1 - s0);
      for (int64_t e = 0; e < len; ++e) acc[e] = load(parts[s0 + e]);
      for (int64_t i = 1; i < count; ++i) add_row(len, parts + i * n + s0, acc);
      for (int64_t e = 0; e < len; ++e) out[s0 + e] = store<T>(acc[e]);
    }
  });
}

// t itself when contiguous, else a contiguous copy in pooled memory.
at::Tensor contiguous(const at::Tensor& t) {
  return t.is_contiguous() ? t : pooled_empty(t.sizes(), t.options()).copy_(t);
}

// One kind of a layer's weights, per direction, each contiguous (undefined past D, or
// when absent).
using Weights = std::array<at::Tensor, 2>;
Weights weights(const Weights& kind) {
  Weights w;
  for (size_t d = 0; d < 2; ++d)
    if (kind[d].defined()) w[d] = contiguous(kind[d]);
  return w;
}

// Bit tests over storage values, in integer operations so that the loops vectorize.
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U kAbs = 0x7FFFFFFFu, kExp = 0x7F800000u;
};
template <>
struct Bits<double> {
  using U = uint64_t;
  static constexpr U kAbs = 0x7FFFFFFFFFFFFFFFull, kExp = 0x7FF0000000000000ull;
};
template <>
struct Bits<at::BFloat16> {
  using U = uint16_t;
  static constexpr U kAbs = 0x7FFF, kExp = 0x7F80;
};

// True when every one of the n values is +0 or -0.
template <typename T>
bool all_zero(const T* p, int64_t n) {
  using U = typename Bits<T>::U;
  U acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof u);
    acc |= u;
  }
  return (acc & Bits<T>::kAbs) == 0;
}

// True when none of the n values is NaN or infinite.
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using U = typename Bits<T>::U;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= (u & Bits<T>::kExp) == Bits<T>::kExp;
  }
  return !bad;
}

// Runs fn(d) for each direction d, both at once on separate threads when the layer
// is bidirectional and there are threads to spare. Inside, the GEMM engines run
// single-threaded.
template <typename F>
void for_each_direction(int64_t D, const F& fn) {
  if (D > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) fn(d);
    });
  } else {
    for (int64_t d = 0; d < D; ++d) fn(d);
  }
}

// Pointers and sizes of one forward sweep. Shapes are in elements, row-major; P is the
// size of h (proj_size, or H without a projection).
template <typename T>
struct FwdParams {
  LayerDims n;
  const int64_t* len;  // [B] or nullptr: every sequence has T steps
  // Per-direction GEMM operands, made on the calling thread: OpenMP workers do not
  // carry its autograd state, so no view is created inside the parallel region.
  std::array<StepWeight, 2> w_hh_t;  // [P,4H] = W_hh[d]^T
  std::array<StepWeight, 2> w_hr_t;  // [H,P] = W_hr[d]^T, empty without a projection
  std::array<at::Tensor, 2> h;       // [B,P] h0 on entry, h_n on exit
  std::array<at::Tensor, 2> rec;     // [B,4H] scratch: h W_hh^T of one step
  std::array<at::Tensor, 2> h_raw;   // [B,H] scratch with a projection: o * tanh(c) of one step
  std::array<at::Tensor, 2> h_proj;  // [B,P] scratch with a projection: h_raw W_hr^T
  const T* bias;                     // [D,4H], zeros when the layer has none
  T* xg;                             // [T,B,D*4H] x W_ih^T on entry; activated gates on exit when training;
                                     // nullptr when the projection is made chunk by chunk (inference)
  // Inference: x W_ih^T made per direction for `chunk` steps at a time, into a buffer
  // that stays in cache, instead of for all steps at once (T*B*D*4H floats, mapped
  // fresh from the OS and page-faulted in on every call).
  int64_t chunk = 0;
  const T* x = nullptr;                   // [T,B,I]
  std::array<StepWeight, 2> w_ih_t;       // [I,4H] = W_ih[d]^T
  std::array<at::Tensor, 2> x_chunk;      // [chunk*B, I] the rows of x this direction reads next
  std::array<at::Tensor, 2> xg_chunk;     // [chunk*B, 4H]
  std::array<at::Tensor, 2> x_tail;       // the same two for the last, shorter chunk
  std::array<at::Tensor, 2> xg_tail;
  // Training, a short sweep (float32): each direction projects all of x on its own
  // thread, over its W_ih^T (w_ih_t), into its columns of xg.
  at::Tensor x_rows;                   // [T*B, I]
  std::array<at::Tensor, 2> xg_cols;   // [T*B, 4H] columns d*4H.. of xg viewed as [T*B, D*4H]
  T* y;                              // [T,B,D*P]
  math_t<T>* c;                      // [D,B,H] c0 on entry, c_n on exit
  math_t<T>* c_prev;                 // [T,B,D*H] saved when training
  T* h_prev;                         // [D,T,B,P] saved when training, direction-major for the dW_hh GEMM
  T* h_raw_saved;                    // [D,T,B,H] saved when training with a projection, for dW_hr
};

template <typename T, bool Training>
void forward_direction(const FwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr_t[d].view.defined();
  const T* bias = p.bias + d * G;
  T* h = p.h[d].template data_ptr<T>();
  math_t<T>* c = p.c + d * B * H;
  T* rec = p.rec[d].template data_ptr<T>();
  T* h_raw = proj ? p.h_raw[d].template data_ptr<T>() : nullptr;
  const T* h_proj = proj ? p.h_proj[d].template data_ptr<T>() : nullptr;
  p.w_hh_t[d].pack();
  p.w_hr_t[d].pack();
  p.w_ih_t[d].pack();
  if (p.x_rows.defined()) step_product<T>(p.x_rows, p.w_ih_t[d], p.xg_cols[d], T(0));
  auto row_of = [&](int64_t s, int64_t b) { return time_index(int(d), s, p.len ? p.len[b] : T_) * B + b; };
  for (int64_t s = 0; s < T_; ++s) {
    if (p.chunk && s % p.chunk == 0) {
      // Gather the x rows of the next steps in this direction's own order, then project.
      const bool tail = s + p.chunk > T_;
      const int64_t steps = tail ? T_ - s : p.chunk;
      T* xc = p.x_chunk[d].template data_ptr<T>();
      for (int64_t k = 0; k < steps; ++k)
        for (int64_t b = 0; b < B; ++b) std::memcpy(xc + (k * B + b) * I, p.x + row_of(s + k, b) * I, I * sizeof(T));
      step_product<T>(tail ? p.x_tail[d] : p.x_chunk[d], p.w_ih_t[d], tail ? p.xg_tail[d] : p.xg_chunk[d], T(0));
    }
    step_product<T>(p.h[d], p.w_hh_t[d], p.rec[d], T(0));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = row_of(s, b);
      const bool active = s < (p.len ? p.len[b] : T_);
      T* hb = h + b * P;
      math_t<T>* cb = c + b * H;
      if (Training) {
        std::memcpy(p.h_prev + (d * T_ * B + row) * P, hb, P * sizeof(T));
        std::memcpy(p.c_prev + row * D * H + d * H, cb, H * sizeof(math_t<T>));
      }
      T* y = p.y + row * D * P + d * P;
      if (!active) {  // padding: zero output, state carried unchanged
        std::memset(y, 0, P * sizeof(T));
        if (proj) std::memset(h_raw + b * H, 0, H * sizeof(T));
        continue;
      }
      T* xg = p.chunk ? p.xg_chunk[d].template data_ptr<T>() + ((s % p.chunk) * B + b) * G : p.xg + row * D * G + d * G;
      cell_forward_row<T, Training>(H, xg, rec + b * G, bias, cb, proj ? h_raw + b * H : hb);
      if (!proj) std::memcpy(y, hb, H * sizeof(T));
    }
    if (!proj) continue;
    // h = (o * tanh(c)) W_hr^T for the whole step, then out to the state and y.
    step_product<T>(p.h_raw[d], p.w_hr_t[d], p.h_proj[d], T(0));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = row_of(s, b);
      if (Training) std::memcpy(p.h_raw_saved + (d * T_ * B + row) * H, h_raw + b * H, H * sizeof(T));
      if (s >= (p.len ? p.len[b] : T_)) continue;
      std::memcpy(h + b * P, h_proj + b * P, P * sizeof(T));
      std::memcpy(p.y + row * D * P + d * P, h_proj + b * P, P * sizeof(T));
    }
  }
}

// The rows of one direction's dg, cut into blocks for the weight-gradient GEMMs. The cut
// depends on the row range alone, so each block's product, and the order in which the
// blocks are summed, are the same for any thread count: the same bits come out.
// Blocks of at least 1024 rows: each block's share of dW is a partial sum written out
// and added back, and smaller blocks cost more in that traffic than they win by
// starting earlier (the demo's training step, 2800 rows, ran about 5% faster than with
// 512-row blocks; with 2048 rows or a single block it ran slower).
struct RowBlocks {
  static constexpr int64_t kMinRows = 1024, kMaxBlocks = 16;
  int64_t begin = 0, end = 0, size = 1, count = 0;
  static RowBlocks over(int64_t begin, int64_t end) {
    RowBlocks r;
    r.begin = begin;
    r.end = std::max(begin, end);
    const int64_t K = r.end - r.begin;
    if (K == 0) return r;
    r.size = std::max(kMinRows, (K + kMaxBlocks - 1) / kMaxBlocks);
    r.count = (K + r.size - 1) / r.size;
    return r;
  }
  static int64_t max_count(int64_t rows) { return std::min(kMaxBlocks, (rows + kMinRows - 1) / kMinRows); }
  int64_t first(int64_t i) const { return begin + i * size; }
  int64_t last(int64_t i) const { return std::min(end, first(i) + size); }  // one past
};

// What the threads of one layer backward share. Each direction's sweep publishes its
// row blocks once it knows which rows it will write (at its first live step), then how
// far it has come; every thread whose own sweep is done takes the blocks whose dg rows
// are final. So the weight gradients of a direction are computed while its sweep still
// runs, on a core that would otherwise wait: in a many-to-one model's top layer, the
// reverse direction has almost nothing to sweep.
struct BlockWork {
  struct Direction {
    std::atomic<bool> planned{false};  // blocks and dx_here are set
    std::atomic<int64_t> progress{0};  // every sweep step >= progress is done
    RowBlocks blocks;
    bool dx_here = false;  // every row is live: the blocks also write their rows of dg W_ih (see below)
    std::array<std::atomic<bool>, RowBlocks::kMaxBlocks> taken;
  };
  std::array<Direction, 2> dir;
  std::atomic<bool> failed{false};  // a worker threw: the others stop waiting for it
  BlockWork() {
    for (auto& d : dir)
      for (auto& t : d.taken) t.store(false, std::memory_order_relaxed);
  }
};

template <typename T>
struct BwdParams {
  LayerDims n;
  const int64_t* len;                 // [B] or nullptr
  std::array<StepWeight, 2> w_hh;     // [4H,P] per direction, ready for the step products
  std::array<StepWeight, 2> w_hr;     // [P,H] per direction, empty without a projection
  std::array<at::Tensor, 2> dh;       // [B,P] grad of h_n on entry, of h0 on exit
  std::array<at::Tensor, 2> dg_step;  // [B,4H] scratch: dg of one step, for the recurrent GEMM
  std::array<at::Tensor, 2> dh_proj;  // [B,P] scratch with a projection: total grad of h at one step
  std::array<at::Tensor, 2> dh_raw;   // [B,H] scratch with a projection: dh_proj W_hr
  const T* gates;                     // [T,B,D*4H] activated
  const math_t<T>* c_prev;            // [T,B,D*H]
  const T* dy;                        // [T,B,D*P] or nullptr
  math_t<T>* dc;                      // [D,B,H] grad of c_n on entry, of c0 on exit
  T* dg;                              // [D,T,B,4H] out: grads of the gate pre-activations, time-ordered
  T* dh_proj_saved;                   // [D,T,B,P] out with a projection, for dW_hr
  T* dbias;                           // [D,4H] out: the sum of every step's dg rows
  // For the skip of steps with zero gradients (backward_direction): the values that
  // nn.LSTM would multiply by those zeros, which must be finite for the products to be zero.
  const T* x;                         // [T,B,I] the layer's input
  const T* h_prev;                    // [D,T,B,P]
  const T* h_raw;                     // [D,T,B,H] with a projection, else nullptr
  std::array<const T*, 2> w_ih;       // [4H,I] per direction
  BlockWork* work;                    // shared with the threads that take the weight-gradient blocks
  bool input_grad;                    // dx wanted
};

// A step of the backward sweep whose gradients are all zero: the carried dh and dc
// are zero, and so is dy at every row the step reads. Its dg is then zero too, and
// its dh_{t-1} and dc_{t-1} stay zero, provided that the saved gates and cell states
// it would multiply by those zeros are finite (0 * NaN is NaN, as nn.LSTM computes it).
template <typename T>
bool step_has_zero_grads(const BwdParams<T>& p, int64_t d, int64_t s) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = p.len ? p.len[b] : T_;
    if (s >= L) continue;  // padding: nothing flows through it
    const int64_t row = time_index(int(d), s, L) * B + b;
    if (p.dy && !all_zero(p.dy + row * D * P + d * P, P)) return false;
    if (!all_finite(p.gates + row * D * G + d * G, G) || !all_finite(p.c_prev + row * D * H + d * H, H)) return false;
  }
  return true;
}


// Called by a direction's sweep at its first live step (or at its end, when every step
// was skipped): steps past last_live will never be written. Decides the rows the
// weight-gradient GEMMs read, zeroes the skipped rows among them, and publishes the
// blocks.
template <typename T>
void plan_blocks(const BwdParams<T>& p, int64_t d, int64_t last_live) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr[d].view.defined();
  // The times [t0, t1) that hold every row a live step wrote; dead rows inside are
  // zeroed below. (time_index maps steps to times, and times back to steps.)
  auto length = [&](int64_t b) { return p.len ? p.len[b] : T_; };
  int64_t t0 = T_, t1 = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s <= last_live; ++s) {
      const int64_t t = time_index(int(d), s, length(b));
      t0 = std::min(t0, t), t1 = std::max(t1, t + 1);
    }
  // Rows outside [t0, t1) are left out of the GEMMs. nn.LSTM multiplies their zero dg
  // by x, h_prev (and h_raw): where one of those is not finite, the product is NaN, so
  // the GEMMs then read every row.
  auto outside_finite = [&](const T* m, int64_t width) {
    return all_finite(m, t0 >= t1 ? T_ * B * width : t0 * B * width) &&
           (t0 >= t1 || all_finite(m + t1 * B * width, (T_ - t1) * B * width));
  };
  if (!outside_finite(p.x, I) || !outside_finite(p.h_prev + d * T_ * B * P, P) ||
      (proj && !outside_finite(p.h_raw + d * T_ * B * H, H)))
    t0 = 0, t1 = T_;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t b = 0; b < B; ++b) {
      if (time_index(int(d), t, length(b)) <= last_live) continue;
      std::memset(p.dg + (d * T_ * B + t * B + b) * G, 0, G * sizeof(T));
      if (proj) std::memset(p.dh_proj_saved + (d * T_ * B + t * B + b) * P, 0, P * sizeof(T));
    }
  BlockWork::Direction& work = p.work->dir[d];
  work.blocks = t0 < t1 ? RowBlocks::over(t0 * B, t1 * B) : RowBlocks::over(0, 0);
  work.dx_here = p.input_grad && t0 == 0 && t1 == T_;
  work.progress.store(last_live + 1, std::memory_order_relaxed);
  work.planned.store(true, std::memory_order_release);
}

template <typename T>
void backward_direction(const BwdParams<T>& p, int64_t d) {
  const auto [T_, B, I, H, P, D] = p.n;
  const int64_t G = 4 * H;
  const bool proj = p.w_hr[d].view.defined();
  T* dh = p.dh[d].template data_ptr<T>();
  math_t<T>* dc = p.dc + d * B * H;
  T* dg_step = p.dg_step[d].template data_ptr<T>();
  std::vector<math_t<T>> dbias(G, 0);
  T* dh_proj = proj ? p.dh_proj[d].template data_ptr<T>() : nullptr;
  T* dh_raw = proj ? p.dh_raw[d].template data_ptr<T>() : nullptr;
  p.w_hh[d].pack();
  p.w_hr[d].pack();
  // The sweep starts with the last step. Where no loss term reaches the first steps it
  // meets (the reverse direction of a many-to-one model's top layer gets a gradient
  // only at its own first step, the sweep's last), those steps are skipped: no cell, no
  // GEMM, their dg rows not even written. Only while every weight is finite: each
  // skipped product with them would be zero times a weight.
  bool zeros_so_far = all_zero(dh, B * P) && all_zero(dc, B * H) && all_finite(p.w_ih[d], G * I) &&
                      all_finite(p.w_hh[d].view.template data_ptr<T>(), G * P) &&
                      (!proj || all_finite(p.w_hr[d].view.template data_ptr<T>(), P * H));
  int64_t last_live = T_ - 1;  // steps past it were skipped
  BlockWork::Direction& work = p.work->dir[d];
  for (int64_t s = T_ - 1; s >= 0; --s) {
    if (zeros_so_far) {
      if (step_has_zero_grads(p, d, s)) {
        last_live = s - 1;
        continue;
      }
      zeros_so_far = false;
    }
    if (!work.planned.load(std::memory_order_relaxed)) plan_blocks(p, d, last_live);
    if (proj) {
      // The total gradient of this step's h (carried + output), then through W_hr.
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = p.len ? p.len[b] : T_;
        const int64_t row = time_index(int(d), s, L) * B + b;
        T* out = p.dh_proj_saved + (d * T_ * B + row) * P;
        if (s >= L) {
          std::memset(dh_proj + b * P, 0, P * sizeof(T));
          std::memset(out, 0, P * sizeof(T));
          continue;
        }
        const T* dy = p.dy ? p.dy + row * D * P + d * P : nullptr;
        for (int64_t k = 0; k < P; ++k) {
          dh_proj[b * P + k] = T(math_t<T>(dh[b * P + k]) + (dy ? math_t<T>(dy[k]) : math_t<T>(0)));
          dh[b * P + k] = T(0);  // refilled with dg W_hh below
        }
        std::memcpy(out, dh_proj + b * P, P * sizeof(T));
      }
      step_product<T>(p.dh_proj[d], p.w_hr[d], p.dh_raw[d], T(0));
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = p.len ? p.len[b] : T_;
      const int64_t row = time_index(int(d), s, L) * B + b;
      T* dg = p.dg + (d * T_ * B + row) * G;
      if (s >= L) {  // padding: the state's gradient passes through unchanged
        std::memset(dg, 0, G * sizeof(T));
        std::memset(dg_step + b * G, 0, G * sizeof(T));
        continue;
      }
      const T* gates = p.gates + row * D * G + d * G;
      const math_t<T>* c_prev = p.c_prev + row * D * H + d * H;
      if (proj)
        cell_backward_row<T>(H, gates, c_prev, nullptr, dh_raw + b * H, dc + b * H, dg, dg_step + b * G);
      else
        cell_backward_row<T>(H, gates, c_prev, p.dy ? p.dy + row * D * H + d * H : nullptr, dh + b * H, dc + b * H,
                             dg, dg_step + b * G);
    }
    work.progress.store(s, std::memory_order_release);  // this step's dg rows are final
    // dh_{t-1} = dg W_hh for the sequences that stepped; padded rows of dg_step are
    // zero, so their carried gradient is left as it was.
    step_product<T>(p.dg_step[d], p.w_hh[d], p.dh[d], T(1));
    // The bias gradient, while the step's rows are in cache: in a fixed order (steps
    // descending, rows ascending), so the same bits for any thread count.
    for (int64_t b = 0; b < B; ++b) add_row(G, dg_step + b * G, dbias.data());
  }
  for (int64_t k = 0; k < G; ++k) p.dbias[d * G + k] = T(dbias[k]);

  if (!work.planned.load(std::memory_order_relaxed)) plan_blocks(p, d, last_live);  // every step was skipped
}

// The longest sum (rows of a and b in a^T b) that a weight gradient takes to
// small_gemm_in_place rather than to a GEMM engine: a small batch over a few steps.
constexpr int64_t kMaxRowsInPlace = 64;

// One block's share of a weight gradient: c[M,N] = a[K,M]^T b[K,N], a and b rows of dg
// and of the layer's input or h (contiguous rows). A short block (a small batch over few
// steps) of a wide weight goes to small_gemm_in_place, which reads both where they lie:
// at batch 1, T 28, H 128, dW_hh (512 x 28 x 128) takes 17 us there against 35 us in BLAS
// (benchmarks/bench_step_gemm.py). Narrower ones (dW_ih at a small input size) stay on
// matmul: with a few columns the in-place kernel's tiles hold too few accumulators.
template <typename T>
void weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  constexpr int64_t kMinColsInPlace = 64;
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (K <= kMaxRowsInPlace && N >= kMinColsInPlace && a.stride(1) == 1 && b.stride(1) == 1 && c.is_contiguous()) {
      small_gemm_in_place(M, N, K, a.data_ptr<float>(), 1, a.stride(0), b.data_ptr<float>(), b.stride(0), 1, 0.f,
                          c.data_ptr<float>(), N);
      return;
    }
  }
  matmul<T>(a.t(), b, c, T(0));
}

// small_gemm_in_place's C[M,N] = A B with the rows of A (and C) split between threads:
// each output is one pass in k order, the same bits for any thread count. In quads of
// rows: the kernel takes rows four at a time, then one at a time, and those two paths
// may round differently, so a split must not move a row between them. A split takes at
// least 64K multiply-adds, so a tiny product stays on the calling thread.
void in_place_rows_split(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                         const float* b, int64_t b_row, int64_t b_col, float* c) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, N * K));
  at::parallel_for(0, (M + 3) / 4, grain, [&](int64_t q0, int64_t q1) {
    const int64_t m0 = 4 * q0, m1 = std::min(M, 4 * q1);
    small_gemm_in_place(m1 - m0, N, K, a + m0 * a_row, a_row, a_col, b, b_row, b_col, 0.f, c + m0 * N, N);
  });
}

// c[M,N] = a[K,M]^T b[K,N] (a, b contiguous), summed over the K rows in blocks fixed by K
// alone: each block is one product computed on one thread, and the blocks' partial
// sums are added in block order. A multi-threaded GEMM may split a long K differently
// for different thread counts; this gives the same bits for any thread count. There are
// always at least two blocks, so that the products run inside a parallel region, where
// the GEMM engines stay single-threaded, and an even number, so two threads share them.
//
// A float32 product over a few rows (a cell's batch) goes to in_place_rows_split
// instead: no partial sums (at batch 1, a [2, 4H, H] buffer zeroed and summed per call).
template <typename T>
void matmul_tn_fixed_order(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  constexpr int64_t kMaxRows = 1024;
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (K <= kMaxRowsInPlace && small_gemm_in_place_fits(K, M, N, 1)) {  // A(r, k) = a[k*M + r]
      in_place_rows_split(M, N, K, a.data_ptr<float>(), 1, M, b.data_ptr<float>(), N, 1, c.data_ptr<float>());
      return;
    }
  }
  int64_t blocks = std::max<int64_t>(2, (K + kMaxRows - 1) / kMaxRows);
  blocks += blocks % 2;
  const int64_t rows = (K + blocks - 1) / blocks;
  at::Tensor partial = pooled_zeros({blocks, M, N}, c.options());
  std::vector<std::array<at::Tensor, 3>> operands;  // views made here, not on the workers
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t k0 = i * rows, k = std::min(rows, K - k0);
    if (k > 0) operands.push_back({a.narrow(0, k0, k).t(), b.narrow(0, k0, k), partial[i]});
  }
  at::parallel_for(0, int64_t(operands.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) matmul<T>(operands[i][0], operands[i][1], operands[i][2], T(0));
  });
  sum_parts(partial.data_ptr<T>(), blocks, M * N, c.data_ptr<T>());
}

// c[M,N] = a[M,K] b[K,N] (a contiguous), a's rows in blocks fixed by M alone, each
// block's product on one thread inside a parallel region, where the GEMM engines stay
// single-threaded: the same bits for any thread count (a BLAS call of its own threads
// may compute the same product differently for different thread counts). At least two
// tasks, so that even one block runs inside the region.
template <typename T>
void matmul_rows_fixed_order(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  constexpr int64_t kRows = 64;
  const int64_t M = a.size(0);
  const int64_t blocks = std::max<int64_t>(1, (M + kRows - 1) / kRows), rows = (M + blocks - 1) / blocks;
  std::vector<std::array<at::Tensor, 3>> operands;  // views made here, not on the workers
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t m0 = i * rows, k = std::min(rows, M - m0);
    if (k > 0) operands.push_back({a.narrow(0, m0, k), b, c.narrow(0, m0, k)});
  }
  const int64_t n = int64_t(operands.size());
  at::parallel_for(0, std::max<int64_t>(2, n), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, n); ++i) matmul<T>(operands[i][0], operands[i][1], operands[i][2], T(0));
  });
}

// c[M,N] = a[M,K] b[K,N] for a cell step, the same bits for any thread count: float32
// products that small_gemm_in_place takes through in_place_rows_split, the rest through
// matmul_rows_fixed_order.
template <typename T>
void cell_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (a.is_contiguous() && c.is_contiguous() && small_gemm_in_place_fits(K, 1, b.stride(0), b.stride(1))) {
      in_place_rows_split(M, N, K, a.data_ptr<float>(), K, 1, b.data_ptr<float>(), b.stride(0), b.stride(1),
                          c.data_ptr<float>());
      return;
    }
  }
  matmul_rows_fixed_order<T>(a, b, c);
}

// Column sums of a [rows, cols] matrix in row order: the same bits for any thread count.
template <typename T>
void column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    std::vector<math_t<T>> acc(c1 - c0, 0);
    for (int64_t r = 0; r < rows; ++r) add_row(c1 - c0, m + r * cols + c0, acc.data());
    for (int64_t c = c0; c < c1; ++c) out[c] = T(acc[c - c0]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& lengths, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih_, const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_,
    const std::optional<at::Tensor>& b_hh_, const std::optional<at::Tensor>& w_hr_,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, bool training) {
  const BelowAutograd below_autograd;
  const LayerWeights wts = layer_weights("lstm_layer_forward", w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, w_ih_reverse,
                                         w_hh_reverse, b_ih_reverse, b_hh_reverse, w_hr_reverse);
  const LayerDims n = check_layer_forward(x_, lengths, h0, c0, wts);
  const at::Tensor len = checked_lengths("lstm_layer_forward", lengths, n.T, n.B);
  const auto [T_, B, I, H, P, D] = n;
  const bool proj = wts.proj();
  const at::Tensor x = contiguous(x_);
  // The module's own Parameters, read in place: no stacked copy per call (a copy costs
  // its time, and leaves the weights cold in the cache of the core that reads them).
  const Weights w_ih = weights(wts.w_ih), w_hh = weights(wts.w_hh), w_hr = weights(wts.w_hr);
  auto opt = x.options();
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  const int64_t saved = training ? T_ : 0;
  at::Tensor y = pooled_empty({T_, B, D * P}, opt);
  at::Tensor h = h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c = c0.to(mopt, /*non_blocking=*/false, /*copy=*/true).contiguous();
  // Rows of x per projection chunk in inference: large enough for an efficient GEMM.
  constexpr int64_t kChunkRows = 256;
  const int64_t chunk = training ? 0 : std::min<int64_t>(T_, std::max<int64_t>(1, kChunkRows / std::max<int64_t>(B, 1)));
  at::Tensor xg = pooled_empty({training ? T_ : 0, B, D * 4 * H}, opt);
  at::Tensor c_prev = pooled_empty({saved, B, D * H}, mopt);
  at::Tensor h_prev = pooled_empty({D, saved, B, P}, opt);
  at::Tensor h_raw = pooled_empty({D, proj ? saved : 0, B, H}, opt);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_layer_forward_cpu", [&] {
      using T = scalar_t;
      // b_ih + b_hh, summed here (zeros without a bias).
      at::Tensor bias = pooled_empty({D, 4 * H}, opt);
      T* bsum = bias.data_ptr<T>();
      for (int64_t d = 0; d < D; ++d) {
        if (!wts.bias()) {
          std::fill(bsum + d * 4 * H, bsum + (d + 1) * 4 * H, T(0));
          continue;
        }
        const at::Tensor bi = wts.b_ih[d].contiguous(), bh = wts.b_hh[d].contiguous();
        const T *pi = bi.data_ptr<T>(), *ph = bh.data_ptr<T>();
        for (int64_t g = 0; g < 4 * H; ++g) bsum[d * 4 * H + g] = T(math_t<T>(pi[g]) + math_t<T>(ph[g]));
      }
      at::Tensor rec = pooled_empty({D, B, 4 * H}, opt);
      at::Tensor raw_step = pooled_empty({D, proj ? B : 0, H}, opt), proj_step = pooled_empty({D, proj ? B : 0, P}, opt);
      FwdParams<T> p{};
      p.n = n;
      p.len = len.defined() ? len.data_ptr<int64_t>() : nullptr;
      at::Tensor x_chunk, xg_chunk;
      // A projection too small for oneDNN: below that, a BLAS call over both directions
      // (their W_ih copied side by side) cost more than each direction's own product on
      // its thread (the layer op at batch 1, T 28, H 128: 91 us before, 77 after).
      const bool project_per_direction =
          (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) && T_ * B * D * 4 * H * I < kOnednnMinWork;
      if (training && project_per_direction) {
        p.x_rows = x.view({T_ * B, I});
        for (int64_t d = 0; d < D; ++d) {
          p.w_ih_t[d] = StepWeight::of(w_ih[d].t(), T_ * B);
          p.xg_cols[d] = xg.view({T_ * B, D * 4 * H}).narrow(1, d * 4 * H, 4 * H);
        }
      } else if (training) {
        // Input projection of every step and direction: [T*B, I] x [D*4H, I]^T, with the
        // directions' W_ih side by side (a copy, small beside the training work).
        const at::Tensor w_ih_all = D == 1 ? w_ih[0] : pooled_empty({D * 4 * H, I}, opt);
        for (int64_t d = 0; d < D && D > 1; ++d) w_ih_all.narrow(0, d * 4 * H, 4 * H).copy_(w_ih[d]);
        matmul<T>(x.view({T_ * B, I}), w_ih_all.t(), xg.view({T_ * B, D * 4 * H}), T(0));
      } else {
        const int64_t tail = T_ % chunk;
        x_chunk = pooled_empty({D, chunk * B, I}, opt);
        xg_chunk = pooled_empty({D, chunk * B, 4 * H}, opt);
        p.chunk = chunk;
        p.x = x.data_ptr<T>();
        for (int64_t d = 0; d < D; ++d) {
          p.w_ih_t[d] = StepWeight::of(w_ih[d].t(), T_ * B);
          p.x_chunk[d] = x_chunk[d];
          p.xg_chunk[d] = xg_chunk[d];
          p.x_tail[d] = x_chunk[d].narrow(0, 0, tail * B);
          p.xg_tail[d] = xg_chunk[d].narrow(0, 0, tail * B);
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        p.w_hh_t[d] = StepWeight::of(w_hh[d].t(), T_ * B);
        p.h[d] = h[d];
        p.rec[d] = rec[d];
        if (proj) {
          p.w_hr_t[d] = StepWeight::of(w_hr[d].t(), T_ * B);
          p.h_raw[d] = raw_step[d];
          p.h_proj[d] = proj_step[d];
        }
      }
      p.bias = bias.data_ptr<T>();
      p.xg = training ? xg.data_ptr<T>() : nullptr;
      p.y = y.data_ptr<T>();
      p.c = c.data_ptr<math_t<T>>();
      p.c_prev = training ? c_prev.data_ptr<math_t<T>>() : nullptr;
      p.h_prev = training ? h_prev.data_ptr<T>() : nullptr;
      p.h_raw_saved = training && proj ? h_raw.data_ptr<T>() : nullptr;
      for_each_direction(D, [&](int64_t d) {
        training ? forward_direction<T, true>(p, d) : forward_direction<T, false>(p, d);
      });
    });
  }
  at::Tensor gates = training ? xg : pooled_empty({0, B, D * 4 * H}, opt);
  return {y, h, c.to(c0.scalar_type()), gates, c_prev, h_prev, h_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
                        const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x_,
                        const std::optional<at::Tensor>& lengths, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                        const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& w_ih_reverse,
                        const std::optional<at::Tensor>& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
                        const at::Tensor& gates_, const at::Tensor& c_prev_,
                        const at::Tensor& h_prev_, const at::Tensor& h_raw_, bool input_grad) {
  const BelowAutograd below_autograd;
  const LayerWeights wts = layer_weights("lstm_layer_backward", w_ih_, w_hh_, std::nullopt, std::nullopt, w_hr_,
                                         w_ih_reverse, w_hh_reverse, std::nullopt, std::nullopt, w_hr_reverse);
  const LayerDims n = check_layer_backward(grad_y, grad_h_n, grad_c_n, x_, wts, gates_, c_prev_, h_prev_, h_raw_);
  const auto [T_, B, I, H, P, D] = n;
  const bool proj = wts.proj();
  const at::Tensor len = checked_lengths("lstm_layer_backward", lengths, T_, B);

  const at::Tensor x = contiguous(x_), h_raw = proj ? contiguous(h_raw_) : at::Tensor();
  const Weights w_ih = weights(wts.w_ih), w_hh = weights(wts.w_hh), w_hr = weights(wts.w_hr);
  const at::Tensor gates = contiguous(gates_), c_prev = contiguous(c_prev_), h_prev = contiguous(h_prev_);
  // grad_y is often a view (a transpose for batch_first, a gradient scattered into zeros).
  const at::Tensor dy = grad_y ? contiguous(*grad_y) : at::Tensor();
  auto opt = x.options();
  at::Tensor dh = grad_h_n ? grad_h_n->clone(at::MemoryFormat::Contiguous) : pooled_zeros({D, B, P}, opt);
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  at::Tensor dc = grad_c_n ? grad_c_n->to(mopt, false, true).contiguous() : pooled_zeros({D, B, H}, mopt);
  at::Tensor dx = input_grad ? pooled_empty({T_, B, I}, opt) : pooled_empty({0}, opt);
  at::Tensor dw_ih = pooled_empty({D, 4 * H, I}, opt);
  at::Tensor dw_hh = pooled_empty({D, 4 * H, P}, opt);
  at::Tensor dbias = pooled_empty({D, 4 * H}, opt);
  at::Tensor dw_hr = pooled_empty({proj ? D : 0, P, H}, opt);
  if (B == 0) {
    dw_ih.zero_(), dw_hh.zero_(), dbias.zero_(), dw_hr.zero_();
    return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias, dw_hr};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t G = 4 * H, rows = T_ * B;
    at::Tensor dg = pooled_empty({D, rows, G}, opt);
    at::Tensor dg_step = pooled_empty({D, B, G}, opt);
    at::Tensor dh_proj_saved = pooled_empty({D, proj ? rows : 0, P}, opt);
    at::Tensor dh_proj = pooled_empty({D, proj ? B : 0, P}, opt), dh_raw = pooled_empty({D, proj ? B : 0, H}, opt);
    BwdParams<T> p{};
    p.n = n;
    p.len = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      p.w_hh[d] = StepWeight::of(w_hh[d], T_ * B);
      p.dh[d] = dh[d];
      p.dg_step[d] = dg_step[d];
      if (proj) {
        p.w_hr[d] = StepWeight::of(w_hr[d], T_ * B);
        p.dh_proj[d] = dh_proj[d];
        p.dh_raw[d] = dh_raw[d];
      }
    }
    p.gates = gates.data_ptr<T>();
    p.c_prev = c_prev.data_ptr<math_t<T>>();
    p.dy = dy.defined() ? dy.data_ptr<T>() : nullptr;
    p.dc = dc.data_ptr<math_t<T>>();
    p.dg = dg.data_ptr<T>();
    p.dh_proj_saved = proj ? dh_proj_saved.data_ptr<T>() : nullptr;
    p.dbias = dbias.data_ptr<T>();
    p.x = x.data_ptr<T>();
    p.h_prev = h_prev.data_ptr<T>();
    p.h_raw = proj ? h_raw.data_ptr<T>() : nullptr;
    for (int64_t d = 0; d < D; ++d) p.w_ih[d] = w_ih[d].data_ptr<T>();
    BlockWork work;
    p.work = &work;
    p.input_grad = input_grad;
    // Per direction and block, the block's share of dW_ih, dW_hh (and dW_hr).
    const int64_t max_blocks = RowBlocks::max_count(rows);
    at::Tensor part_ih = pooled_empty({D, max_blocks, G, I}, opt), part_hh = pooled_empty({D, max_blocks, G, P}, opt);
    at::Tensor part_hr = pooled_empty({D, proj ? max_blocks : 0, P, H}, opt);
    // The reverse direction's share of dx, dg[1] W_ih[1], where its blocks write it.
    at::Tensor dx_reverse = pooled_empty({input_grad && D == 2 ? rows : 0, I}, opt);
    const at::Tensor x2 = x.view({rows, I}), dx2 = input_grad ? dx.view({rows, I}) : at::Tensor();
    const at::Tensor h_prev2 = h_prev.view({D, rows, P});
    const at::Tensor h_raw2 = proj ? h_raw.view({D, rows, H}) : at::Tensor();

    auto run_block = [&](int64_t d, int64_t i) {
      const BlockWork::Direction& w = work.dir[d];
      const int64_t r0 = w.blocks.first(i), k = w.blocks.last(i) - r0;
      const at::Tensor dg_rows = dg[d].narrow(0, r0, k);
      // A direction's only block writes its dW directly: there is nothing to sum.
      const bool only = w.blocks.count == 1;
      weight_grad<T>(dg_rows, x2.narrow(0, r0, k), only ? dw_ih[d] : part_ih[d][i]);
      weight_grad<T>(dg_rows, h_prev2[d].narrow(0, r0, k), only ? dw_hh[d] : part_hh[d][i]);
      if (proj)
        weight_grad<T>(dh_proj_saved[d].narrow(0, r0, k), h_raw2[d].narrow(0, r0, k), only ? dw_hr[d] : part_hr[d][i]);
      if (w.dx_here) matmul<T>(dg_rows, w_ih[d], (d == 0 ? dx2 : dx_reverse).narrow(0, r0, k), T(0));
    };
    // A block is ready once the sweep has written all of its rows. The forward direction
    // writes time s at step s; the reverse one time T-1-s, or, with lengths, a time that
    // differs per sequence: its blocks wait for the end of the sweep.
    auto ready = [&](int64_t d, int64_t i) {
      const BlockWork::Direction& w = work.dir[d];
      const int64_t done = w.progress.load(std::memory_order_acquire);
      if (done == 0) return true;
      if (d == 1 && p.len) return false;
      const int64_t t_first = w.blocks.first(i) / B, t_last = (w.blocks.last(i) - 1) / B;
      return d == 0 ? t_first >= done : T_ - 1 - t_last >= done;
    };
    // Takes ready blocks until every direction has published its blocks and all are taken.
    auto take_blocks = [&]() {
      while (!work.failed.load(std::memory_order_relaxed)) {
        bool left = false, ran = false;
        for (int64_t d = 0; d < D; ++d) {
          BlockWork::Direction& w = work.dir[d];
          if (!w.planned.load(std::memory_order_acquire)) {
            left = true;
            continue;
          }
          for (int64_t i = 0; i < w.blocks.count; ++i) {
            if (w.taken[i].load(std::memory_order_relaxed)) continue;
            if (!ready(d, i) || w.taken[i].exchange(true, std::memory_order_acq_rel)) {
              left = true;
              continue;
            }
            run_block(d, i);
            ran = true;
          }
        }
        if (!left) return;
        if (!ran) std::this_thread::yield();
      }
    };
    // One worker per direction sweeps it, then takes blocks; further threads only take
    // blocks. A thread given several workers (a single thread, or a nested call) runs
    // all its sweeps first, so it never waits on a sweep queued behind it.
    const int64_t workers = std::max<int64_t>(D, std::min<int64_t>(at::get_num_threads(), D * (1 + max_blocks)));
    const at::ThreadLocalState caller_state;  // views are made on the workers: give them the caller's state
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      at::ThreadLocalStateGuard guard(caller_state);
      try {
        for (int64_t w = w0; w < std::min(w1, D); ++w) backward_direction<T>(p, w);
        take_blocks();
      } catch (...) {
        work.failed.store(true);
        throw;  // at::parallel_for rethrows it on the caller
      }
    });

    // dW = the blocks' shares summed in block order (a single block wrote dW itself).
    auto sum_blocks = [&](const at::Tensor& parts, const at::Tensor& out) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t count = work.dir[d].blocks.count, n = out[d].numel();
        if (count == 1) continue;
        sum_parts(parts[d].template data_ptr<T>(), count, n, out[d].template data_ptr<T>());
      }
    };
    sum_blocks(part_ih, dw_ih);
    sum_blocks(part_hh, dw_hh);
    if (proj) sum_blocks(part_hr, dw_hr);
    // dx = dg[0] W_ih[0] + dg[1] W_ih[1]. When every row of a direction was live, its
    // blocks wrote its product, the forward direction's into dx and the reverse one's
    // into dx_reverse, on the threads that took them. The rest is computed here, over
    // the direction's rows (onto zeros where the forward direction wrote nothing).
    if (input_grad) {
      const bool wrote_forward = work.dir[0].dx_here;
      if (!wrote_forward) dx.zero_();
      for (int64_t d = wrote_forward ? 1 : 0; d < D; ++d) {
        if (d == 1 && work.dir[1].dx_here) {
          T* out = dx.data_ptr<T>();
          const T* rev = dx_reverse.data_ptr<T>();
          at::parallel_for(0, rows * I, 4096, [&](int64_t e0, int64_t e1) {
            for (int64_t e = e0; e < e1; ++e) out[e] = T(math_t<T>(out[e]) + math_t<T>(rev[e]));
          });
          continue;
        }
        const RowBlocks& r = work.dir[d].blocks;
        const int64_t k = r.end - r.begin;
        matmul<T>(dg[d].narrow(0, r.begin, k), w_ih[d], dx2.narrow(0, r.begin, k), T(1));
      }
    }
  });
  return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias, dw_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(const at::Tensor& x_, const at::Tensor& h_,
                                                                     const at::Tensor& c, const at::Tensor& w_ih_,
                                                                     const at::Tensor& w_hh_,
                                                                     const std::optional<at::Tensor>& bias_,
                                                                     bool training) {
  const BelowAutograd below_autograd;
  const auto [B, I, H] = check_cell("lstm_cell_forward", x_, h_, c, w_ih_, w_hh_, bias_);
  const at::Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : pooled_zeros({4 * H}, x.options());
  at::Tensor pre = pooled_empty({B, 4 * H}, x.options());
  at::Tensor h_new = pooled_empty({B, H}, x.options());
  at::Tensor c_new = c.to(x.options().dtype(math_dtype(x.scalar_type())), false, true).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_cell_cpu", [&] {
    using T = scalar_t;
    at::Tensor rec = pooled_empty({B, 4 * H}, x.options());
    cell_product<T>(x, w_ih.t(), pre);
    cell_product<T>(h, w_hh.t(), rec);
    for (int64_t b = 0; b < B; ++b) {
      T* g = pre.data_ptr<T>() + b * 4 * H;
      const T* r = rec.data_ptr<T>() + b * 4 * H;
      math_t<T>* cb = c_new.data_ptr<math_t<T>>() + b * H;
      T* hb = h_new.data_ptr<T>() + b * H;
      training ? cell_forward_row<T, true>(H, g, r, bias.data_ptr<T>(), cb, hb)
               : cell_forward_row<T, false>(H, g, r, bias.data_ptr<T>(), cb, hb);
    }
  });
  return {h_new, c_new.to(c.scalar_type()), training ? pre : pooled_empty({0, 4 * H}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cpu(
    const std::optional<at::Tensor>& grad_h_new, const std::optional<at::Tensor>& grad_c_new, const at::Tensor& x_,
    const at::Tensor& h_, const at::Tensor& c_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const at::Tensor& gates_) {
  const BelowAutograd below_autograd;
  const auto [B, I, H] = check_cell_backward(grad_h_new, grad_c_new, x_, h_, c_, w_ih_, w_hh_, gates_);
  const at::Tensor x = x_.contiguous(), h = h_.contiguous();
  const at::Tensor c = c_.to(math_dtype(x_.scalar_type())).contiguous();
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous(), gates = gates_.contiguous();
  auto opt = x.options();
  at::Tensor dh = grad_h_new ? grad_h_new->clone(at::MemoryFormat::Contiguous) : pooled_zeros({B, H}, opt);
  auto mopt = opt.dtype(math_dtype(x.scalar_type()));
  at::Tensor dc = grad_c_new ? grad_c_new->to(mopt, false, true).contiguous() : pooled_zeros({B, H}, mopt);
  at::Tensor dg = pooled_empty({B, 4 * H}, opt);
  at::Tensor dx = pooled_empty({B, I}, opt), dw_ih = pooled_empty({4 * H, I}, opt), dw_hh = pooled_empty({4 * H, H}, opt);
  at::Tensor dbias = pooled_empty({4 * H}, opt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lstm_cell_cpu", [&] {
    using T = scalar_t;
    at::Tensor scratch = pooled_empty({4 * H}, opt);  // the row kernel's per-step copy of dg, unused here
    for (int64_t b = 0; b < B; ++b)
      cell_backward_row<T>(H, gates.data_ptr<T>() + b * 4 * H, c.data_ptr<math_t<T>>() + b * H, nullptr,
                           dh.data_ptr<T>() + b * H, dc.data_ptr<math_t<T>>() + b * H, dg.data_ptr<T>() + b * 4 * H,
                           scratch.data_ptr<T>());
    cell_product<T>(dg, w_ih, dx);
    cell_product<T>(dg, w_hh, dh);
    matmul_tn_fixed_order<T>(dg, x, dw_ih);
    matmul_tn_fixed_order<T>(dg, h, dw_hh);
    column_sums(dg.data_ptr<T>(), B, 4 * H, dbias.data_ptr<T>());
  });
  if (B == 0) dw_ih.zero_(), dw_hh.zero_(), dbias.zero_();
  return {dx, dh, dc.to(x.scalar_type()), dw_ih, dw_hh, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
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
