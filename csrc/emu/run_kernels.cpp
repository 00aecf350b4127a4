// Runs the CUDA kernels of csrc/cuda/*.cu on the host, through the emulator,
// the way csrc/cuda/lstm_cuda.cpp drives them on a GPU: host GEMMs stand in for
// cuBLAS, the pointwise work is the device code itself. tests/test_emulated_kernels.py
// writes the inputs, runs this under AddressSanitizer and UndefinedBehaviorSanitizer,
// and compares what it writes back with the CPU path.
//
// Usage: run_kernels plan fwd|bwd H B D ELEM_BYTES MATH_BYTES MAX_BLOCKS MAX_SHARED prints
// the sweep plan choose_sweep_plan makes ("units blocks batch_tile lanes shared_bytes rows
// kdim stride", or "none"). run_kernels IN OUT [sweep UNITS BATCH_TILE] runs the kernels. With "sweep", a
// layer without a projection runs its forward and its backward through the sweep kernels
// (cut into blocks of UNITS hidden units and batch tiles of BATCH_TILE rows) instead of the
// per-step GEMMs and cell kernels, as lstm_cuda.cpp launches them: every step in one
// launch, cooperative with the grid barrier between the steps where a direction has
// several blocks, a plain one where UNITS >= H (a block per direction, whose step barrier
// is its own); "per-step" after it launches one step (backward phase) at a time instead.
// "sweep-cluster CLUSTER BATCH_TILE" runs both as the cluster sweeps (clusters of at most
// CLUSTER blocks, a direction each, every step in one launch). After those, "mma" gives
// any of them tensor-core step products
// (TF32 for float32, bf16 and f16 for those; UNITS then as the plans round them, to fours),
// with the weight fragments in registers where the plan allows; "mma-smem" the same with
// every fragment loaded from shared memory; "regs" the SIMT products with the weights in
// registers where the plan allows (SweepPlan::registers); "groups=N" cuts the batch into N
// groups of rows (SweepPlan::groups), each with blocks (clusters) of its own.
// "run_kernels plan-mma ..." and "plan-regs ..." print the plan choose_sweep_plan makes
// with those products (also "registers slice batch_lanes" after the rest); "run_kernels plan-cluster
// ..." the cluster sweeps' plan, with batch groups.
//
// IN: 14 int64 (mode 0 layer / 1 cell, dtype 0 f32 / 1 f64 / 2 f16 / 3 bf16, T, B, I, H,
// P, D, has_lengths, has_bias, has_proj, has_grad_y, has_grad_h, has_grad_c), then
// lengths as int64 [B] if any, then float64 arrays:
// x [T,B,I], h0 [D,B,P], c0 [D,B,H], w_ih [D,4H,I], w_hh [D,4H,P], bias [D,4H] if any,
// w_hr [D,P,H] if any, grad_y [T,B,D*P], grad_h_n [D,B,P], grad_c_n [D,B,H] if any.
// OUT: float64 arrays y, h_n, c_n, dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr (if any).
// The cell mode uses T = D = 1, P = H and writes h', c', dx, dh, dc, dw_ih, dw_hh, dbias.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/lstm_kernels.h"
#include "../cuda/mma.cuh"
#include "../cuda/sweep_kernels.h"

namespace {

using namespace birnn::cuda;

double as_double(float v) { return v; }
double as_double(double v) { return v; }
double as_double(__half v) { return __half2float(v); }
double as_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}

template <typename T>
std::vector<T> convert(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_double<T>(v[i]);
  return out;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = as_double(v[i]);
  return out;
}

// Row-major C[M,N] = beta C + op(A) op(B), A and B read through as_double: the role of
// cuBLAS (whose float accumulation this double accumulation bounds from above).
template <typename TA, typename TB, typename TC>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const TA* A, int64_t lda, const TB* B, int64_t ldb,
          double beta, TC* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += as_double(ta ? A[k * lda + m] : A[m * lda + k]) * as_double(tb ? B[n * ldb + k] : B[k * ldb + n]);
      C[m * ldc + n] = from_double<TC>(beta * (beta == 0 ? 0 : as_double(C[m * ldc + n])) + acc);
    }
}

void check(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error("launch failed");
}

struct SweepOption {
  bool on = false;
  bool per_step = false;  // the grid sweeps one step (phase) per launch, not all in one
  int64_t cluster = 0;   // the cluster sweeps, clusters of this many blocks at most (units follow)
  int64_t units = 0, batch_tile = 0;
  bool mma = false;        // tensor-core step products
  bool registers = false;  // the weights in registers where the plan allows (mma: unless mma-smem; SIMT: regs)
  int64_t groups = 1;    // the batch in this many groups of rows
} sweep_option;

// A run that asks for the weights in registers ("mma", "regs") tests that path only if its
// plan takes it: one that does not fit is an error, not a quiet run of the other path.
void require_registers(const SweepPlan& pl) {
  if (sweep_option.registers && !pl.registers)
    throw std::runtime_error("the weights in registers asked for, but the plan keeps them in shared memory");
}

// The mma K of storage type T (SweepPlan::mma_k); float64 has none.
template <typename T>
int64_t mma_k_of() {
  if constexpr (std::is_same_v<T, double>) throw std::runtime_error("no tensor-core products in float64");
  else return birnn::cuda::mma::Traits<birnn::cuda::mma::KindOf<T>::value>::kK;
}

struct Reader {
  FILE* f;
  std::vector<double> doubles(size_t n) {
    std::vector<double> v(n);
    if (n && std::fread(v.data(), sizeof(double), n, f) != n) throw std::runtime_error("short input");
    return v;
  }
};

struct Writer {
  FILE* f;
  void put(const std::vector<double>& v) { std::fwrite(v.data(), sizeof(double), v.size(), f); }
};

// Direction d's block of a [D, n] array, or nullptr past its directions.
template <typename T>
const T* per_direction(const std::vector<T>& v, int64_t d, int64_t n) {
  return size_t((d + 1) * n) <= v.size() ? v.data() + d * n : nullptr;
}

template <typename T>
void run_layer(const int64_t* hd, Reader& in, Writer& out) {
  using A = math_t<T>;
  const int64_t T_ = hd[2], B = hd[3], I = hd[4], H = hd[5], P = hd[6], D = hd[7], G = 4 * H, rows = T_ * B;
  const bool has_len = hd[8], has_bias = hd[9], proj = hd[10], has_gy = hd[11], has_gh = hd[12], has_gc = hd[13];
  std::vector<int64_t> len(B);
  if (has_len && std::fread(len.data(), sizeof(int64_t), B, in.f) != size_t(B)) throw std::runtime_error("short");
  auto x = convert<T>(in.doubles(rows * I));
  auto h = convert<T>(in.doubles(D * B * P));
  auto c = convert<A>(in.doubles(D * B * H));
  auto w_ih = convert<T>(in.doubles(D * G * I));
  auto w_hh = convert<T>(in.doubles(D * G * P));
  auto bias = has_bias ? convert<T>(in.doubles(D * G)) : std::vector<T>();
  auto w_hr = proj ? convert<T>(in.doubles(D * P * H)) : std::vector<T>();
  auto dy = has_gy ? convert<T>(in.doubles(rows * D * P)) : std::vector<T>();
  auto dh = convert<A>(has_gh ? in.doubles(D * B * P) : std::vector<double>(D * B * P));
  auto dc = convert<A>(has_gc ? in.doubles(D * B * H) : std::vector<double>(D * B * H));
  const int64_t* lp = has_len ? len.data() : nullptr;
  // The units per block: given, or from the cluster size, as choose_cluster_sweep_plan sets
  // them; in fours with tensor-core products, as the plans round them.
  const int64_t mma_k = sweep_option.mma ? mma_k_of<T>() : 0;
  const int64_t units = mma_units(sweep_option.cluster ? (H + sweep_option.cluster - 1) / sweep_option.cluster
                                                       : sweep_option.units, H, mma_k);

  // Forward, as lstm_cuda.cpp runs it.
  std::vector<T> xg(rows * D * G), y(rows * D * P), h_raw(proj ? D * B * H : 0), h_proj(proj ? D * B * P : 0);
  std::vector<A> rec(D * B * G), c_prev(rows * D * H);
  std::vector<T> h_prev(D * rows * P), h_raw_saved(proj ? D * rows * H : 0);
  gemm(false, true, rows, D * G, I, x.data(), I, w_ih.data(), I, 0.0, xg.data(), D * G);
  const bool sweep = sweep_option.on && !proj;
  if (sweep) {
    SweepPlan pl = sweep_plan(false, H, B, D, units, sweep_option.batch_tile, sizeof(T), sizeof(A),
                              Products{mma_k, sweep_option.registers}, sweep_option.groups);
    require_registers(pl);
    if (sweep_option.cluster) {
      pl.own_offset = pl.shared_bytes;
      pl.shared_bytes += sweep_align(2 * pl.group_rows * pl.units * int64_t(sizeof(T)));
    }
    std::vector<T> hs(2 * D * B * H), h_n(D * B * H);
    // The sweep takes each direction's weights where they lie, and b_ih and b_hh apart: the
    // test's bias as b_ih, zeros as b_hh.
    const std::vector<T> zeros(D * G, from_double<T>(0));
    const int64_t step = sweep_option.per_step ? 1 : T_;
    const bool cooperative = !sweep_option.per_step && sweep_is_cooperative(pl, D);  // as launch_rules.cpp has it
    for (int64_t s = 0; s < T_; s += step) {
      SweepFwd<T> sw{T_, B, H, D, s, s + step, pl, lp,
                     {per_direction(w_hh, 0, G * H), per_direction(w_hh, 1, G * H)},
                     {has_bias ? per_direction(bias, 0, G) : nullptr, has_bias ? per_direction(bias, 1, G) : nullptr},
                     {has_bias ? per_direction(zeros, 0, G) : nullptr, has_bias ? per_direction(zeros, 1, G) : nullptr},
                     xg.data(), c.data(), h.data(), hs.data(), h_n.data(), y.data(), c_prev.data(), h_prev.data()};
      check(sweep_option.cluster ? launch_sweep_fwd_cluster(sw, nullptr) : launch_sweep_fwd(sw, cooperative, nullptr));
    }
    h = h_n;
  }
  for (int64_t s = 0; s < (sweep ? 0 : T_); ++s) {
    for (int64_t d = 0; d < D; ++d)
      gemm(false, true, B, G, P, h.data() + d * B * P, P, w_hh.data() + d * G * P, P, 0.0, rec.data() + d * B * G, G);
    FwdStep<T> f{T_, B, H, P, D, s, lp, rec.data(), has_bias ? bias.data() : nullptr, xg.data(), c.data(), h.data(),
                 proj ? h_raw.data() : nullptr, y.data(), c_prev.data(), h_prev.data()};
    check(launch_fwd_step(f, nullptr));
    if (proj) {
      for (int64_t d = 0; d < D; ++d)
        gemm(false, true, B, P, H, h_raw.data() + d * B * H, H, w_hr.data() + d * P * H, H, 0.0,
             h_proj.data() + d * B * P, P);
      ProjOut<T> po{T_, B, H, P, D, s, lp, h_proj.data(), h_raw.data(), h.data(), y.data(), h_raw_saved.data()};
      check(launch_proj_out(po, nullptr));
    }
  }
  out.put(widen(y));
  out.put(widen(h));
  out.put(widen(c));

  // Backward.
  std::vector<T> dg(D * rows * G), dg_step(D * B * G), dh_proj(proj ? D * B * P : 0),
      dh_proj_saved(proj ? D * rows * P : 0);
  std::vector<A> dh_raw(proj ? D * B * H : 0);
  if (sweep) {
    SweepPlan pl = sweep_plan(true, H, B, D, units, sweep_option.batch_tile, sizeof(T), sizeof(A),
                              Products{mma_k, sweep_option.registers}, sweep_option.groups);
    require_registers(pl);
    if (sweep_option.cluster) {
      pl.own_offset = pl.shared_bytes;
      pl.shared_bytes += sweep_align(2 * pl.group_rows * 4 * pl.units * int64_t(sizeof(T)));
    }
    std::vector<T> dgs(2 * D * B * G);
    const int64_t phases = sweep_option.per_step ? 1 : T_ + 1;
    const bool cooperative = !sweep_option.per_step && sweep_is_cooperative(pl, D);
    for (int64_t q = 0; q <= T_; q += phases) {
      SweepBwd<T> sw{T_, B, H, D, q, q + phases, pl, lp, {per_direction(w_hh, 0, G * H), per_direction(w_hh, 1, G * H)},
                     xg.data(), c_prev.data(), has_gy ? dy.data() : nullptr, dh.data(), dc.data(), dg.data(),
                     dgs.data()};
      check(sweep_option.cluster ? launch_sweep_bwd_cluster(sw, nullptr) : launch_sweep_bwd(sw, cooperative, nullptr));
    }
  }
  for (int64_t s = sweep ? -1 : T_ - 1; s >= 0; --s) {
    if (proj) {
      ProjBwd<T> pb{T_, B, P, D, s, lp, has_gy ? dy.data() : nullptr, dh.data(), dh_proj.data(), dh_proj_saved.data()};
      check(launch_proj_bwd(pb, nullptr));
      for (int64_t d = 0; d < D; ++d)
        gemm(false, false, B, H, P, dh_proj.data() + d * B * P, P, w_hr.data() + d * P * H, H, 0.0,
             dh_raw.data() + d * B * H, H);
    }
    BwdStep<T> bs{T_, B, H, P, D, s, lp, xg.data(), c_prev.data(), has_gy ? dy.data() : nullptr,
                  proj ? dh_raw.data() : nullptr, dh.data(), dc.data(), dg.data(), dg_step.data()};
    check(launch_bwd_step(bs, nullptr));
    for (int64_t d = 0; d < D; ++d)
      gemm(false, false, B, P, G, dg_step.data() + d * B * G, G, w_hh.data() + d * G * P, P, 1.0,
           dh.data() + d * B * P, P);
  }
  std::vector<T> dx(rows * I), dw_ih(D * G * I), dw_hh(D * G * P), dbias(D * G), dw_hr(proj ? D * P * H : 0);
  for (int64_t d = 0; d < D; ++d) {
    gemm(false, false, rows, I, G, dg.data() + d * rows * G, G, w_ih.data() + d * G * I, I, d == 0 ? 0.0 : 1.0,
         dx.data(), I);
    gemm(true, false, G, I, rows, dg.data() + d * rows * G, G, x.data(), I, 0.0, dw_ih.data() + d * G * I, I);
    gemm(true, false, G, P, rows, dg.data() + d * rows * G, G, h_prev.data() + d * rows * P, P, 0.0,
         dw_hh.data() + d * G * P, P);
    if (proj)
      gemm(true, false, P, H, rows, dh_proj_saved.data() + d * rows * P, P, h_raw_saved.data() + d * rows * H, H, 0.0,
           dw_hr.data() + d * P * H, H);
    // The bias gradient: a host sum stands in for the ATen reduction lstm_cuda.cpp calls.
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0;
      for (int64_t r = 0; r < rows; ++r) acc += as_double(dg[(d * rows + r) * G + g]);
      dbias[d * G + g] = from_double<T>(acc);
    }
  }
  for (auto* v : {&dx}) out.put(widen(*v));
  out.put(widen(dh));
  out.put(widen(dc));
  out.put(widen(dw_ih));
  out.put(widen(dw_hh));
  out.put(widen(dbias));
  if (proj) out.put(widen(dw_hr));
}

template <typename T>
void run_cell(const int64_t* hd, Reader& in, Writer& out) {
  using A = math_t<T>;
  const int64_t B = hd[3], I = hd[4], H = hd[5], G = 4 * H;
  const bool has_bias = hd[9], has_gh = hd[12], has_gc = hd[13];
  auto x = convert<T>(in.doubles(B * I));
  auto h = convert<T>(in.doubles(B * H));
  auto c = convert<A>(in.doubles(B * H));
  auto w_ih = convert<T>(in.doubles(G * I));
  auto w_hh = convert<T>(in.doubles(G * H));
  auto bias = has_bias ? convert<T>(in.doubles(G)) : std::vector<T>();
  auto dh = convert<A>(has_gh ? in.doubles(B * H) : std::vector<double>(B * H));
  auto dc = convert<A>(has_gc ? in.doubles(B * H) : std::vector<double>(B * H));
  std::vector<T> xg(B * G), h_new(B * H);
  std::vector<A> rec(B * G), c_new = c;
  gemm(false, true, B, G, I, x.data(), I, w_ih.data(), I, 0.0, xg.data(), G);
  gemm(false, true, B, G, H, h.data(), H, w_hh.data(), H, 0.0, rec.data(), G);
  FwdStep<T> f{1, B, H, H, 1, 0, nullptr, rec.data(), has_bias ? bias.data() : nullptr, xg.data(), c_new.data(),
               h_new.data(), nullptr, h_new.data(), nullptr, nullptr};
  check(launch_cell_fwd(f, true, nullptr));
  out.put(widen(h_new));
  out.put(widen(c_new));
  std::vector<T> dg(B * G), dg_step(B * G);
  BwdStep<T> bs{1, B, H, H, 1, 0, nullptr, xg.data(), c.data(), nullptr, nullptr, dh.data(), dc.data(), dg.data(),
                dg_step.data()};
  check(launch_bwd_step(bs, nullptr));
  std::vector<T> dx(B * I), dh_in(B * H), dw_ih(G * I), dw_hh(G * H), dbias(G);
  gemm(false, false, B, I, G, dg.data(), G, w_ih.data(), I, 0.0, dx.data(), I);
  gemm(false, false, B, H, G, dg.data(), G, w_hh.data(), H, 0.0, dh_in.data(), H);
  gemm(true, false, G, I, B, dg.data(), G, x.data(), I, 0.0, dw_ih.data(), I);
  gemm(true, false, G, H, B, dg.data(), G, h.data(), H, 0.0, dw_hh.data(), H);
  ColumnSums<T> cs{B, G, dg.data(), dbias.data()};
  check(launch_column_sums(cs, nullptr));
  for (auto* v : {&dx, &dh_in}) out.put(widen(*v));
  out.put(widen(dc));
  for (auto* v : {&dw_ih, &dw_hh, &dbias}) out.put(widen(*v));
}

template <typename T>
void run(const int64_t* hd, Reader& in, Writer& out) {
  hd[0] == 0 ? run_layer<T>(hd, in, out) : run_cell<T>(hd, in, out);
}

#if defined(BIRNN_BREAK_LEAK)
// Deliberately leaked, for the test that LeakSanitizer watches these runs.
__attribute__((noinline)) void leak_on_purpose() {
  char* volatile p = new char[4096];
  p[0] = 1;
  p = nullptr;
}
#endif

}  // namespace

// ---------------------------------------------------------------- warp collectives

namespace birnn::cuda {
namespace {

// One warp per 16 x 8 tile of c = a b (a [16 tm][kdim] row-major, b given by its columns:
// bt [8 tn][kdim]), the tile at (blockIdx.y, blockIdx.x * warps + warp).
template <mma::Kind K, typename T>
__global__ void mma_tiles_kernel(const T* a, const T* bt, int kdim, int tn, float* c) {
  const int warp = int(threadIdx.x / 32), col_tile = int(blockIdx.x * (blockDim.x / 32)) + warp;
  const int row_tile = int(blockIdx.y);
  if (col_tile >= tn) return;  // the whole warp
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma::warp_tile_product<K>(acc, a + row_tile * 16 * kdim, kdim, bt + col_tile * 8 * kdim, kdim, kdim);
  mma::store_c(acc, c + row_tile * 16 * (8 * tn) + col_tile * 8, 8 * tn, 1);
}

// Every shuffle, per lane of each warp: out[t][0] the warp's sum by xor butterfly,
// [1] lane 5's value broadcast, [2] the sum of lanes lane..lane+3 within segments of 8
// (down), [3] the inclusive prefix sum (up).
__global__ void shuffles_kernel(const int* in, int* out) {
  const int t = int(blockIdx.x * blockDim.x + threadIdx.x), v = in[t];
  int sum = v;
  for (int m = 16; m >= 1; m /= 2) {
#if defined(BIRNN_BREAK_SHUFFLE_DIVERGENCE)
    // Deliberately wrong: one lane skips a step of the butterfly that the others take.
    if (threadIdx.x % 32 == 3 && m == 4) continue;
#endif
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, m);
  }
  const int five = __shfl_sync(0xFFFFFFFFu, v, 5);
  int down = v;
  for (unsigned k = 1; k < 4; k *= 2) {
    const int from = __shfl_down_sync(0xFFFFFFFFu, down, k, 8);  // its own value past the segment's end
    if (threadIdx.x % 8 + k < 8) down += from;
  }
  int scan = v;
  for (unsigned k = 1; k < 32; k *= 2) {
    const int from = __shfl_up_sync(0xFFFFFFFFu, scan, k);
    if (threadIdx.x % 32 >= k) scan += from;
  }
  out[4 * t] = sum, out[4 * t + 1] = five, out[4 * t + 2] = down, out[4 * t + 3] = scan;
}

// Blocks in a ring, passing values through global memory: each round every block
// publishes its value in buf[round % 2] ([2][gridDim.x]), and after the grid barrier adds
// its right neighbour's; out[b] its value after `rounds` rounds.
__global__ void ring_kernel(int rounds, int* buf, int* out) {
  const int n = int(gridDim.x), b = int(blockIdx.x);
  int v = b + 1;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) buf[(r % 2) * n + b] = v;
    BIRNN_GRID_SYNC();
    v += buf[(r % 2) * n + (b + 1) % n];
  }
  if (threadIdx.x == 0) out[b] = v;
}

// A deliberate race, for the emulator's schedules: each thread writes its entry of shared
// memory and, with no barrier between, reads its left neighbour's into out.
__global__ void neighbour_kernel(int* out) {
  BIRNN_DYNAMIC_SHARED(int, s);
  const int t = int(threadIdx.x);
  s[t] = t + 1;
  out[t] = t > 0 ? s[t - 1] : 0;
}

}  // namespace
}  // namespace birnn::cuda

namespace {

uint64_t lcg_state = 12345;
double next_value() {  // in [-1, 1), a fixed sequence
  lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
  return double(lcg_state >> 11) / double(1ull << 52) - 1.0;
}

// The value a kind's mma multiplies for v, rounded here on the host, independently of
// the kernels' own conversions.
double operand(double v, birnn::cuda::mma::Kind k) {
  using birnn::cuda::mma::Kind;
  if (k == Kind::kBf16) return __bfloat162float(__float2bfloat16_rn(float(v)));
  if (k == Kind::kF16) return __half2float(__float2half_rn(float(v)));
  // TF32: 10 mantissa bits, to nearest with ties away from zero.
  const float f = float(v);
  int e;
  const double m = std::frexp(double(f), &e);  // |m| in [0.5, 1): 11 significant bits are m * 2^11
  return std::ldexp(std::round(m * 2048.0) / 2048.0, e);
}

// run_kernels mma tf32|bf16|f16 ROW_TILES COL_TILES KDIM: c = a b through mma_tiles_kernel,
// against a double product of the same rounded operands; prints the largest error as a
// share of sum_k |a_ik b_kj| (the scale of a float accumulation's rounding).
template <birnn::cuda::mma::Kind K>
int run_mma(int tm, int tn, int kdim) {
  using T = typename birnn::cuda::mma::Traits<K>::T;
  const int M = 16 * tm, N = 8 * tn;
  std::vector<double> a(size_t(M) * kdim), bt(size_t(N) * kdim);
  for (double& v : a) v = operand(next_value(), K);
  for (double& v : bt) v = operand(next_value(), K);
  std::vector<T> a_t(a.size()), bt_t(bt.size());
  for (size_t i = 0; i < a.size(); ++i) a_t[i] = from_double<T>(a[i]);
  for (size_t i = 0; i < bt.size(); ++i) bt_t[i] = from_double<T>(bt[i]);
  std::vector<float> c(size_t(M) * N, std::nanf(""));
  const int warps = 2;
  BIRNN_LAUNCH((birnn::cuda::mma_tiles_kernel<K, T>), dim3((tn + warps - 1) / warps, tm), dim3(32 * warps), 0, nullptr,
               a_t.data(), bt_t.data(), kdim, tn, c.data());
  check(BIRNN_LAUNCH_ERROR());
  double worst = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0, scale = 0;
      for (int k = 0; k < kdim; ++k) {
        ref += a[size_t(i) * kdim + k] * bt[size_t(j) * kdim + k];
        scale += std::abs(a[size_t(i) * kdim + k] * bt[size_t(j) * kdim + k]);
      }
      const double err = std::abs(double(c[size_t(i) * N + j]) - ref) / (scale > 0 ? scale : 1);
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
  std::printf("max_err %.3g\n", worst);
  return 0;
}

// run_kernels shuffles: shuffles_kernel over 2 blocks of 96 threads, against the host's
// sums; prints "ok" or the first mismatch and fails.
int run_shuffles() {
  const int blocks = 2, threads = 96, n = blocks * threads;
  std::vector<int> in(n), out(4 * n, -1);
  for (int t = 0; t < n; ++t) in[t] = int(next_value() * 1000);
  BIRNN_LAUNCH(birnn::cuda::shuffles_kernel, dim3(blocks), dim3(threads), 0, nullptr, in.data(), out.data());
  check(BIRNN_LAUNCH_ERROR());
  for (int t = 0; t < n; ++t) {
    const int w0 = t / 32 * 32, lane = t % 32;
    int sum = 0, down = 0, scan = 0;
    for (int l = 0; l < 32; ++l) sum += in[w0 + l];
    for (int l = lane; l < std::min(lane + 4, lane / 8 * 8 + 8); ++l) down += in[w0 + l];
    for (int l = 0; l <= lane; ++l) scan += in[w0 + l];
    const int want[4] = {sum, in[w0 + 5], down, scan};
    for (int k = 0; k < 4; ++k)
      if (out[4 * t + k] != want[k]) {
        std::printf("thread %d result %d: %d, expected %d\n", t, k, out[4 * t + k], want[k]);
        return 1;
      }
  }
  std::puts("ok");
  return 0;
}

// run_kernels grid-barrier cooperative|plain: ring_kernel over 5 blocks of 64 threads, 4
// rounds, in a cooperative launch (against the host's sums; prints "ok" or the first
// mismatch and fails) or a plain one (which the emulator reports).
int run_grid_barrier(bool cooperative) {
  const int blocks = 5, threads = 64, rounds = 4;
  std::vector<int> buf(2 * blocks, -1), out(blocks, -1);
  if (cooperative) {
    BIRNN_LAUNCH_COOPERATIVE(birnn::cuda::ring_kernel, dim3(blocks), dim3(threads), 0, nullptr, rounds, buf.data(),
                             out.data());
  } else {
    BIRNN_LAUNCH(birnn::cuda::ring_kernel, dim3(blocks), dim3(threads), 0, nullptr, rounds, buf.data(), out.data());
  }
  check(BIRNN_LAUNCH_ERROR());
  std::vector<int> v(blocks);
  for (int b = 0; b < blocks; ++b) v[b] = b + 1;
  for (int r = 0; r < rounds; ++r) {
    const std::vector<int> was = v;
    for (int b = 0; b < blocks; ++b) v[b] += was[(b + 1) % blocks];
  }
  for (int b = 0; b < blocks; ++b)
    if (out[b] != v[b]) return std::printf("block %d: %d, expected %d\n", b, out[b], v[b]), 1;
  std::puts("ok");
  return 0;
}

// run_kernels neighbour-read: neighbour_kernel over one block of 64 threads; prints "ok"
// where every thread read its neighbour's entry, else "stale" and fails.
int run_neighbour_read() {
  const int threads = 64;
  std::vector<int> out(threads, -1);
  BIRNN_LAUNCH(birnn::cuda::neighbour_kernel, dim3(1), dim3(threads), threads * sizeof(int), nullptr, out.data());
  check(BIRNN_LAUNCH_ERROR());
  for (int t = 1; t < threads; ++t)
    if (out[t] != t) return std::puts("stale"), 1;
  std::puts("ok");
  return 0;
}

// run_kernels pointers: a full PointerTable written to the device table by its launch,
// entry for entry, and a table past kMax refused; prints "ok" or what differs.
int run_pointers() {
  using birnn::cuda::PointerTable;
  std::vector<double> operands(PointerTable::kMax);
  PointerTable t{};
  for (int i = 0; i < PointerTable::kMax; ++i) t.ptrs[t.n++] = &operands[size_t(i)];
  std::vector<const void*> table(PointerTable::kMax + 1, nullptr);
  check(birnn::cuda::launch_pointer_table(t, table.data(), nullptr));
  for (int i = 0; i < PointerTable::kMax; ++i)
    if (table[size_t(i)] != &operands[size_t(i)]) return std::printf("entry %d differs\n", i), 1;
  if (table[PointerTable::kMax] != nullptr) return std::puts("wrote past the table"), 1;
  t.n = PointerTable::kMax + 1;
  if (birnn::cuda::launch_pointer_table(t, table.data(), nullptr) == cudaSuccess) return std::puts("took n > kMax"), 1;
  std::puts("ok");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "shuffles") return run_shuffles();
  if (argc == 2 && std::string(argv[1]) == "pointers") return run_pointers();
  if (argc == 2 && std::string(argv[1]) == "neighbour-read") return run_neighbour_read();
  if (argc == 3 && std::string(argv[1]) == "grid-barrier")
    return run_grid_barrier(std::string(argv[2]) == "cooperative");
  if (argc == 6 && std::string(argv[1]) == "mma") {
    using birnn::cuda::mma::Kind;
    const std::string kind = argv[2];
    const int tm = std::atoi(argv[3]), tn = std::atoi(argv[4]), kdim = std::atoi(argv[5]);
    if (kind == "tf32") return run_mma<Kind::kTf32>(tm, tn, kdim);
    if (kind == "bf16") return run_mma<Kind::kBf16>(tm, tn, kdim);
    if (kind == "f16") return run_mma<Kind::kF16>(tm, tn, kdim);
    return 2;
  }
  // plan[-mma|-regs] fwd|bwd H B D ELEM MATH MAX_BLOCKS MAX_SHARED (plan-mma: K 8 for
  // 4-byte elements, else 16, the fragments in registers where they fit; plan-regs: SIMT
  // products with the weights in registers where they fit)
  const std::string command = argc > 1 ? argv[1] : "";
  if (argc == 10 && (command == "plan" || command == "plan-mma" || command == "plan-regs")) {
    const bool backward = std::string(argv[2]) == "bwd";
    int64_t a[7];
    for (int i = 0; i < 7; ++i) a[i] = std::atoll(argv[3 + i]);
    const int64_t mma_k = command == "plan-mma" ? (a[3] == 4 ? 8 : 16) : 0;
    SweepPlan pl;
    if (!choose_sweep_plan(backward, a[0], a[1], a[2], a[3], a[4], Products{mma_k, command != "plan"}, a[5], a[6],
                           &pl))
      return std::puts("none"), 0;
    std::printf("%lld %lld %lld %lld %lld %lld %lld %lld %d %lld %lld\n", (long long)pl.units, (long long)pl.blocks,
                (long long)pl.batch_tile, (long long)pl.lanes, (long long)pl.shared_bytes, (long long)pl.rows,
                (long long)pl.kdim, (long long)pl.stride, int(pl.registers), (long long)pl.slice,
                (long long)pl.batch_lanes);
    return 0;
  }
  // plan-cluster fwd|bwd H B D ELEM MATH CLUSTER MAX_SHARED GROUPS: the plan
  // choose_cluster_sweep_plan makes (SIMT products), with its batch groups and the place of
  // its own rows: "units blocks batch_tile groups group_rows own_offset shared_bytes".
  if (argc == 11 && std::string(argv[1]) == "plan-cluster") {
    int64_t a[8];
    for (int i = 0; i < 8; ++i) a[i] = std::atoll(argv[3 + i]);
    SweepPlan pl;
    if (!choose_cluster_sweep_plan(std::string(argv[2]) == "bwd", a[0], a[1], a[2], a[3], a[4], Products{}, a[5],
                                   a[6], &pl, a[7]))
      return std::puts("none"), 0;
    std::printf("%lld %lld %lld %lld %lld %lld %lld\n", (long long)pl.units, (long long)pl.blocks,
                (long long)pl.batch_tile, (long long)pl.groups, (long long)pl.group_rows, (long long)pl.own_offset,
                (long long)pl.shared_bytes);
    return 0;
  }
  const std::string mode = argc >= 6 ? argv[3] : "";
  bool options_ok = argc == 3 || mode == "sweep" || mode == "sweep-cluster";
  if (argc > 3 && options_ok) {
    sweep_option.on = true;
    (mode == "sweep-cluster" ? sweep_option.cluster : sweep_option.units) = std::atoll(argv[4]);
    sweep_option.batch_tile = std::atoll(argv[5]);
    for (int i = 6; i < argc; ++i) {
      const std::string opt = argv[i];
      if (opt == "mma" || opt == "mma-smem") {
        sweep_option.mma = true;
        sweep_option.registers = opt == "mma";
      } else if (opt == "regs") {
        sweep_option.registers = true;
      } else if (opt == "per-step" && mode == "sweep") {
        sweep_option.per_step = true;
      } else if (opt.rfind("groups=", 0) == 0) {
        sweep_option.groups = std::atoll(opt.c_str() + 7);
      } else {
        options_ok = false;
      }
    }
  }
  if (!options_ok) {
    std::fprintf(stderr,
                 "usage: %s IN OUT [sweep UNITS BATCH_TILE [per-step] | sweep-cluster CLUSTER BATCH_TILE] "
                 "[mma|mma-smem|regs] [groups=N]\n",
                 argv[0]);
    return 2;
  }
  Reader in{std::fopen(argv[1], "rb")};
  Writer out{std::fopen(argv[2], "wb")};
  if (!in.f || !out.f) {
    std::perror("open");
    return 2;
  }
  int64_t hd[14];
  if (std::fread(hd, sizeof(int64_t), 14, in.f) != 14) return 2;
  switch (hd[1]) {
    case 0: run<float>(hd, in, out); break;
    case 1: run<double>(hd, in, out); break;
    case 2: run<__half>(hd, in, out); break;
    case 3: run<__nv_bfloat16>(hd, in, out); break;
    default: return 2;
  }
  std::fclose(out.f);
  std::fclose(in.f);
#if defined(BIRNN_BREAK_LEAK)
  leak_on_purpose();
#endif
  return 0;
}
