// CUDA implementations of the layer and cell ops: argument checks, allocation, cuBLAS
// on ATen's handle and the current stream, and the kernel launchers of lstm_kernels.cu
// and the sweeps (sweep_kernels.h). A layer is one GEMM for the input projection of every
// step and direction, then the recurrence: one persistent sweep launch where the launch
// rules (launch_rules.cpp) say so, else per step one batched GEMM covering both
// directions and one pointwise launch covering both directions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <functional>
#include <vector>

#include "../layer_checks.h"
#include "launch_rules.h"
#include "lstm_kernels.h"
#include "sweep_kernels.h"

namespace birnn {
namespace {

using cuda::math_t;

// torch scalar type -> the kernels' storage type and its cuBLAS data type.
template <typename S>
struct Storage;
template <>
struct Storage<float> {
  using type = float;
  static constexpr cudaDataType_t id = CUDA_R_32F;
};
template <>
struct Storage<double> {
  using type = double;
  static constexpr cudaDataType_t id = CUDA_R_64F;
};
template <>
struct Storage<at::Half> {
  using type = __half;
  static constexpr cudaDataType_t id = CUDA_R_16F;
};
template <>
struct Storage<at::BFloat16> {
  using type = __nv_bfloat16;
  static constexpr cudaDataType_t id = CUDA_R_16BF;
};

template <typename S>
constexpr at::ScalarType math_scalar() {
  return std::is_same_v<S, double> ? at::kDouble : at::kFloat;
}

// Row-major C[b] = op(A[b]) op(B[b]) + beta C[b] for `batch` matrices at fixed strides,
// accumulated in the math type. A and B hold the storage type; C holds c_type (the
// storage type, or the math type for the recurrent carries). Every product of the ops
// goes through here. float32 follows nn.LSTM's own switch, torch.backends.cudnn.allow_tf32
// (default on): TF32 tensor cores when it is on, IEEE float32 when it is off, so that a
// drop-in computes at the precision of what it replaces (torch.backends.cuda.matmul's
// switch, which ATen's matmuls follow, defaults to off). float16 and bfloat16 take the
// tensor cores either way; float64 computes in float64.
template <typename S>
cublasComputeType_t compute_type() {
  if constexpr (std::is_same_v<S, double>) return CUBLAS_COMPUTE_64F;
  return std::is_same_v<S, float> && at::globalContext().allowTF32CuDNN() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                          : CUBLAS_COMPUTE_32F;
}

// The scaling factors in the compute type's precision.
template <typename S>
using Scale = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, int64_t stride_a,
          const void* B, int64_t ldb, int64_t stride_b, double beta, void* C, cudaDataType_t c_type, int64_t ldc,
          int64_t stride_c, int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  constexpr cudaDataType_t ab = Storage<S>::id;
  const Scale<S> one = 1, b = Scale<S>(beta);
  // A row-major matrix is its column-major transpose: swap the operands.
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(handle, op_b, op_a, N, M, K, &one, B, ab, ldb, stride_b, A, ab, lda,
                                                  stride_a, &b, C, c_type, ldc, stride_c, batch, compute_type<S>(),
                                                  CUBLAS_GEMM_DEFAULT));
}

// The same product for `batch` matrices given by device tables of pointers (DeviceTables):
// the per-step path's products over the directions, each direction's weight where it lies.
template <typename S>
void gemm_tables(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* const* A, int64_t lda,
                 const void* const* B, int64_t ldb, double beta, const void* const* C, cudaDataType_t c_type,
                 int64_t ldc, int64_t batch) {
  if (M == 0 || N == 0 || batch == 0) return;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  constexpr cudaDataType_t ab = Storage<S>::id;
  const Scale<S> one = 1, b = Scale<S>(beta);
  TORCH_CUDABLAS_CHECK(cublasGemmBatchedEx(handle, op_b, op_a, N, M, K, &one, B, ab, ldb, A, ab, lda, &b,
                                           const_cast<void* const*>(C), c_type, ldc, batch, compute_type<S>(),
                                           CUBLAS_GEMM_DEFAULT));
}

// Per-direction operand tables on the device for gemm_tables: operand i's D pointers at
// [i] (cuda::PointerTable: one launch writes them, no host-to-device copy).
class DeviceTables {
 public:
  DeviceTables(std::initializer_list<std::array<const void*, 2>> operands, int64_t D, at::Device device,
               cudaStream_t stream)
      : D_(D) {
    cuda::PointerTable t{};
    for (const auto& op : operands)
      for (int64_t d = 0; d < D; ++d) {
        TORCH_INTERNAL_ASSERT(t.n < cuda::PointerTable::kMax, "DeviceTables: too many operands");
        t.ptrs[t.n++] = op[d];
      }
    buf_ = at::empty({t.n}, at::TensorOptions().dtype(at::kLong).device(device));
    C10_CUDA_CHECK(cuda::launch_pointer_table(t, table(0), stream));
  }
  const void* const* operator[](int64_t i) const { return table(i); }

 private:
  const void** table(int64_t i) const { return reinterpret_cast<const void**>(buf_.data_ptr<int64_t>()) + i * D_; }
  at::Tensor buf_;
  int64_t D_;
};

// One kind of weight per direction, contiguous (a copy only where a weight is not).
using Weights = std::array<at::Tensor, 2>;
Weights contiguous(const std::array<at::Tensor, 2>& kind, int64_t D) {
  Weights w;
  for (int64_t d = 0; d < D; ++d)
    if (kind[d].defined()) w[d] = kind[d].contiguous();
  return w;
}

// Direction d's block of a contiguous [D, ...] tensor, and direction d's weight: entries
// of the per-step path's pointer tables (nullptr where there is none).
const void* block_of(const at::Tensor& t, int64_t d, int64_t D) {
  return t.numel() && d < D ? static_cast<const char*>(t.data_ptr()) + d * (t.numel() / D) * t.element_size() : nullptr;
}
const void* weight_of(const Weights& w, int64_t d) { return w[d].defined() ? w[d].data_ptr() : nullptr; }

// A stream from ATen's pool beside the current one: run() queues work there that starts
// once the current stream's work so far is done; join() makes the current stream's later
// work wait until all of it is done (events: no host synchronisation, and a CUDA graph
// captures the fork and the join). Every tensor the work touches must outlive the join on
// the current stream, so that the caching allocator, which orders reuse by that stream,
// hands none of its memory out while the work runs.
class SideStream {
 public:
  SideStream()
      : current_(at::cuda::getCurrentCUDAStream()),
        side_(at::cuda::getStreamFromPool(/*isHighPriority=*/false, current_.device_index())) {}
  void run(const std::function<void()>& work) {
    at::cuda::CUDAEvent ready;
    ready.record(current_);
    ready.block(side_);
    const c10::cuda::CUDAStreamGuard on_side(side_);
    work();
    used_ = true;
  }
  void join() {
    if (!used_) return;
    at::cuda::CUDAEvent done;
    done.record(side_);
    done.block(current_);
    used_ = false;
  }

 private:
  at::cuda::CUDAStream current_, side_;
  bool used_ = false;
};

// Runs each piece of work on a stream of its own, the first on the current stream, the
// others on SideStreams, joined before it returns. The pieces must not depend on each other.
void side_by_side(std::initializer_list<std::function<void()>> work) {
  std::vector<SideStream> sides(work.size() > 0 ? work.size() - 1 : 0);
  size_t i = 0;
  for (const auto& piece : work) {
    if (i == 0) piece();
    else sides[i - 1].run(piece);
    ++i;
  }
  for (SideStream& side : sides) side.join();
}

template <typename S>
typename Storage<S>::type* ptr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<typename Storage<S>::type*>(t.data_ptr<S>()) : nullptr;
}
template <typename S>
math_t<typename Storage<S>::type>* math_ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<math_t<typename Storage<S>::type>>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& b_ih_,
    const std::optional<at::Tensor>& b_hh_, const std::optional<at::Tensor>& w_hr_,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, bool training) {
  const LayerWeights wts = layer_weights("lstm_layer_forward", w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, w_ih_reverse,
                                         w_hh_reverse, b_ih_reverse, b_hh_reverse, w_hr_reverse);
  const LayerDims n = check_layer_forward(x_, lengths, h0, c0, wts);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor len = checked_lengths_on("lstm_layer_forward", lengths, n.T, n.B, x_.device());
  const auto [T_, B, I, H, P, D] = n;
  const int64_t G = 4 * H, rows = T_ * B;
  const bool proj = wts.proj();
  const at::Tensor x = x_.contiguous();
  auto opt = x.options();
  // A fresh copy of h0 for the state the sweep carries, or zeros where h0 is None.
  auto h_init = [&] { return h0 ? h0->clone(at::MemoryFormat::Contiguous) : at::zeros({D, B, P}, opt); };
  at::Tensor y = at::empty({T_, B, D * P}, opt);
  at::Tensor h;
  at::Tensor xg = at::empty({T_, B, D * G}, opt);
  // What backward needs, made only when training (else undefined, None in Python).
  at::Tensor h_prev = training ? at::empty({D, T_, B, P}, opt) : at::Tensor();
  at::Tensor h_raw_saved = training ? at::empty({D, proj ? T_ : 0, B, H}, opt) : at::Tensor();
  at::Tensor c, c_prev;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_forward_cuda", [&] {
    using S = scalar_t;
    using T = typename Storage<S>::type;
    auto mopt = opt.dtype(math_scalar<S>());
    c = c0 ? c0->to(mopt, /*non_blocking=*/false, /*copy=*/true).contiguous() : at::zeros({D, B, H}, mopt);
    if (training) c_prev = at::empty({T_, B, D * H}, mopt);
    if (B == 0) {
      h = h_init();
      return;
    }
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t* lp = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    // Each direction's weights where they lie (no stacked copy per call): the input
    // projection as one GEMM per direction into its columns of xg, [T*B, I] x [4H, I]^T.
    const Weights w_ih = contiguous(wts.w_ih, D), w_hh = contiguous(wts.w_hh, D);
    const Weights b_ih = contiguous(wts.b_ih, D), b_hh = contiguous(wts.b_hh, D);
    for (int64_t d = 0; d < D; ++d)
      gemm<S>(false, true, rows, G, I, ptr<S>(x), I, 0, ptr<S>(w_ih[d]), I, 0, 0.0, ptr<S>(xg) + d * G,
              Storage<S>::id, D * G, 0, 1);
    const rules::Recurrence how = rules::recurrence<T>(/*backward=*/false, training, B, H, D, proj);
    if (how.sweep) {
      // The sweep reads h0 at its first step and writes h_n at its last; the steps between
      // pass h through hs: step s reads hs[s % 2] and writes hs[(s + 1) % 2].
      const at::Tensor h0c = h0 ? h0->contiguous() : at::zeros({D, B, H}, opt);
      h = at::empty({D, B, H}, opt);
      at::Tensor hs = at::empty({T_ > 1 ? 2 : 0, D, B, H}, opt);
      auto dir = [&](const Weights& w, int64_t d) { return d < D && w[d].defined() ? ptr<S>(w[d]) : nullptr; };
      cuda::SweepFwd<T> sw{T_, B, H, D, 0, T_, how.plan, lp, {dir(w_hh, 0), dir(w_hh, 1)}, {dir(b_ih, 0), dir(b_ih, 1)},
                           {dir(b_hh, 0), dir(b_hh, 1)}, ptr<S>(xg), math_ptr<S>(c), ptr<S>(h0c), ptr<S>(hs),
                           ptr<S>(h), ptr<S>(y), training ? math_ptr<S>(c_prev) : nullptr,
                           training ? ptr<S>(h_prev) : nullptr};
      C10_CUDA_CHECK(how.cluster ? cuda::launch_sweep_fwd_cluster(sw, stream)
                                 : cuda::launch_sweep_fwd(sw, how.cooperative, stream));
      return;
    }
    // The per-step path: one batched GEMM per step covers both directions, through
    // tables of per-direction pointers (h, W_hh, rec; with a projection h_raw, W_hr,
    // h_proj), so that each direction's weights are read where they lie.
    const Weights w_hr = proj ? contiguous(wts.w_hr, D) : Weights{};
    at::Tensor bias;  // [D,4H] b_ih + b_hh, rounded to the storage type as nn.LSTM's sum is
    if (wts.bias()) {
      bias = at::empty({D, G}, opt);
      for (int64_t d = 0; d < D; ++d) {
        at::Tensor out = bias[d];
        at::add_out(out, b_ih[d], b_hh[d]);
      }
    }
    h = h_init();
    at::Tensor rec = at::empty({D, B, G}, mopt);
    at::Tensor h_raw = at::empty({D, proj ? B : 0, H}, opt), h_proj = at::empty({D, proj ? B : 0, P}, opt);
    auto dir = [&](const at::Tensor& t) { return std::array<const void*, 2>{block_of(t, 0, D), block_of(t, 1, D)}; };
    auto weight = [](const Weights& w) { return std::array<const void*, 2>{weight_of(w, 0), weight_of(w, 1)}; };
    const DeviceTables tables({dir(h), weight(w_hh), dir(rec), dir(h_raw), weight(w_hr), dir(h_proj)}, D, x.device(),
                              stream);
    for (int64_t s = 0; s < T_; ++s) {
      // rec[d] = h[d] W_hh[d]^T, both directions in one batched GEMM.
      gemm_tables<S>(false, true, B, G, P, tables[0], P, tables[1], P, 0.0, tables[2], Storage<math_t<T> >::id, G,
                     D);
      cuda::FwdStep<T> f{T_, B, H, P, D, s, lp, math_ptr<S>(rec), bias.defined() ? ptr<S>(bias) : nullptr,
                         ptr<S>(xg), math_ptr<S>(c), ptr<S>(h), proj ? ptr<S>(h_raw) : nullptr, ptr<S>(y),
                         training ? math_ptr<S>(c_prev) : nullptr, training ? ptr<S>(h_prev) : nullptr};
      C10_CUDA_CHECK(cuda::launch_fwd_step(f, stream));
      if (proj) {
        gemm_tables<S>(false, true, B, P, H, tables[3], H, tables[4], H, 0.0, tables[5], Storage<S>::id, P, D);
        cuda::ProjOut<T> po{T_, B, H, P, D, s, lp, ptr<S>(h_proj), ptr<S>(h_raw), ptr<S>(h), ptr<S>(y),
                            training ? ptr<S>(h_raw_saved) : nullptr};
        C10_CUDA_CHECK(cuda::launch_proj_out(po, stream));
      }
    }
  });
  return {y, h, c.to(x.scalar_type()), training ? xg : at::Tensor(), c_prev, h_prev, h_raw_saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x_,
                         const std::optional<at::Tensor>& lengths, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                         const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& w_ih_reverse,
                         const std::optional<at::Tensor>& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
                         const at::Tensor& gates_, const at::Tensor& c_prev_,
                         const at::Tensor& h_prev_, const at::Tensor& h_raw_, bool input_grad,
                         bool weight_grads) {
  const LayerWeights wts = layer_weights("lstm_layer_backward", w_ih_, w_hh_, std::nullopt, std::nullopt, w_hr_,
                                         w_ih_reverse, w_hh_reverse, std::nullopt, std::nullopt, w_hr_reverse);
  const LayerDims n = check_layer_backward(grad_y, grad_h_n, grad_c_n, x_, wts, gates_, c_prev_, h_prev_, h_raw_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const bool proj = wts.proj();
  const auto [T_, B, I, H, P, D] = n;
  const int64_t G = 4 * H, rows = T_ * B;
  const at::Tensor len = checked_lengths_on("lstm_layer_backward", lengths, T_, B, x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor h_raw = proj ? h_raw_.contiguous() : at::Tensor();
  const at::Tensor gates = gates_.contiguous(), c_prev = c_prev_.contiguous(), h_prev = h_prev_.contiguous();
  const at::Tensor dy = grad_y ? grad_y->contiguous() : at::Tensor();
  auto opt = x.options();
  // Every gradient is written whole below (zeros only for an empty batch).
  auto out = [&](at::IntArrayRef sizes) { return B > 0 ? at::empty(sizes, opt) : at::zeros(sizes, opt); };
  at::Tensor dx = input_grad ? out({T_, B, I}) : at::empty({0}, opt), dh0, dc0;
  // The weight matrices' gradients: empty when not asked (the op's weight_grad).
  auto weight_out = [&](at::IntArrayRef sizes) { return weight_grads ? out(sizes) : at::empty({0}, opt); };
  at::Tensor dw_ih = weight_out({D, G, I}), dw_hh = weight_out({D, G, P}), dbias = out({D, G});
  at::Tensor dw_hr = weight_out({proj ? D : 0, P, H});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_layer_backward_cuda", [&] {
    using S = scalar_t;
    using T = typename Storage<S>::type;
    auto mopt = opt.dtype(math_scalar<S>());
    at::Tensor dh = grad_h_n ? grad_h_n->to(mopt, false, true).contiguous() : at::zeros({D, B, P}, mopt);
    at::Tensor dc = grad_c_n ? grad_c_n->to(mopt, false, true).contiguous() : at::zeros({D, B, H}, mopt);
    if (B > 0) {
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      at::Tensor dg = at::empty({D, rows, G}, opt), dg_step = at::empty({D, B, G}, opt);
      at::Tensor dh_proj = at::empty({D, proj ? B : 0, P}, opt), dh_raw = at::empty({D, proj ? B : 0, H}, mopt);
      at::Tensor dh_proj_saved = at::empty({D, proj ? rows : 0, P}, opt);
      const int64_t* lp = len.defined() ? len.data_ptr<int64_t>() : nullptr;
      const T* dyp = dy.defined() ? ptr<S>(dy) : nullptr;
      const rules::Recurrence how = rules::recurrence<T>(/*backward=*/true, /*training=*/true, B, H, D, proj);
      const bool sweep = how.sweep;
      if (sweep) {
        // Each direction's W_hh where it lies: no stacked copy per call.
        const Weights w = contiguous(wts.w_hh, D);
        at::Tensor dgs = at::empty({2, D, B, G}, opt);  // phase q reads dgs[q % 2], writes dgs[(q + 1) % 2]
        cuda::SweepBwd<T> sw{T_, B, H, D, 0, T_ + 1, how.plan, lp, {ptr<S>(w[0]), D > 1 ? ptr<S>(w[1]) : nullptr},
                             ptr<S>(gates), math_ptr<S>(c_prev), dyp, math_ptr<S>(dh), math_ptr<S>(dc), ptr<S>(dg),
                             ptr<S>(dgs)};
        C10_CUDA_CHECK(how.cluster ? cuda::launch_sweep_bwd_cluster(sw, stream)
                                   : cuda::launch_sweep_bwd(sw, how.cooperative, stream));
      }
      // The per-step path: one batched GEMM per step covers both directions, through tables
      // of per-direction pointers (dg_step, W_hh, dh; with a projection dh_proj, W_hr,
      // dh_raw), each direction's weights where they lie.
      // (The weights, copies where not contiguous, live as long as the tables point at them.)
      std::optional<DeviceTables> tables;
      const Weights w_hh = sweep ? Weights{} : contiguous(wts.w_hh, D);
      const Weights w_hr = !sweep && proj ? contiguous(wts.w_hr, D) : Weights{};
      if (!sweep) {
        auto dir = [&](const at::Tensor& t) {
          return std::array<const void*, 2>{block_of(t, 0, D), block_of(t, 1, D)};
        };
        auto weight = [](const Weights& w) { return std::array<const void*, 2>{weight_of(w, 0), weight_of(w, 1)}; };
        tables.emplace(std::initializer_list<std::array<const void*, 2>>{dir(dg_step), weight(w_hh), dir(dh),
                                                                        dir(dh_proj), weight(w_hr), dir(dh_raw)},
                       D, x.device(), stream);
      }
      // Direction d's weight gradients from its rows for times [t0, t1), onto what the rows
      // before them gave (beta 1) or alone (beta 0): dW_ih[d] (input), dW_hh[d] and dW_hr[d]
      // (recurrent).
      auto input_weight_grads_of = [&](int64_t d, int64_t t0, int64_t t1, double beta) {
        const int64_t r0 = t0 * B, k = (t1 - t0) * B;
        gemm<S>(true, false, G, I, k, ptr<S>(dg) + (d * rows + r0) * G, G, 0, ptr<S>(x) + r0 * I, I, 0, beta,
                ptr<S>(dw_ih) + d * G * I, Storage<S>::id, I, 0, 1);
      };
      auto recurrent_weight_grads_of = [&](int64_t d, int64_t t0, int64_t t1, double beta) {
        const int64_t r0 = t0 * B, k = (t1 - t0) * B;
        gemm<S>(true, false, G, P, k, ptr<S>(dg) + (d * rows + r0) * G, G, 0, ptr<S>(h_prev) + (d * rows + r0) * P, P,
                0, beta, ptr<S>(dw_hh) + d * G * P, Storage<S>::id, P, 0, 1);
        if (proj)
          gemm<S>(true, false, P, H, k, ptr<S>(dh_proj_saved) + (d * rows + r0) * P, P, 0,
                  ptr<S>(h_raw) + (d * rows + r0) * H, H, 0, beta, ptr<S>(dw_hr) + d * P * H, Storage<S>::id, H, 0, 1);
      };
      // With the side streams on (rules::overlap_weight_grads), the per-step path sums the
      // weight gradients chunk by chunk on a side stream while the recurrence goes on: every
      // chunk of steps finishes the rows of known times, direction 0's at the steps' own
      // times, direction 1's at T-1 minus them (with lengths its rows' times differ per
      // sequence, and the host does not read the lengths: its gradients wait for the end).
      // In float32 and float64 only: the half types would round the running sum to 16 bits
      // at every chunk. The chunks, and the order they are added in, depend on T alone.
      const bool chunked = !sweep && weight_grads && rules::overlap_weight_grads() &&
                           (std::is_same_v<T, float> || std::is_same_v<T, double>);
      const int64_t chunked_dirs = !chunked ? 0 : len.defined() ? 1 : D;
      const int64_t chunk = (T_ + rules::kWeightGradChunks - 1) / rules::kWeightGradChunks;
      std::optional<SideStream> side;
      if (chunked) side.emplace();
      int64_t unflushed = T_;  // steps [s, unflushed) are done, their weight gradients not yet queued
      for (int64_t s = sweep ? -1 : T_ - 1; s >= 0; --s) {
        if (proj) {
          cuda::ProjBwd<T> pb{T_, B, P, D, s, lp, dyp, math_ptr<S>(dh), ptr<S>(dh_proj), ptr<S>(dh_proj_saved)};
          C10_CUDA_CHECK(cuda::launch_proj_bwd(pb, stream));
          gemm_tables<S>(false, false, B, H, P, (*tables)[3], P, (*tables)[4], H, 0.0, (*tables)[5],
                         Storage<math_t<T> >::id, H, D);
        }
        cuda::BwdStep<T> bs{T_, B, H, P, D, s, lp, ptr<S>(gates), math_ptr<S>(c_prev), dyp,
                            proj ? math_ptr<S>(dh_raw) : nullptr, math_ptr<S>(dh), math_ptr<S>(dc), ptr<S>(dg),
                            ptr<S>(dg_step)};
        C10_CUDA_CHECK(cuda::launch_bwd_step(bs, stream));
        // dh_{t-1} += dg W_hh, both directions in one batched GEMM.
        gemm_tables<S>(false, false, B, P, G, (*tables)[0], G, (*tables)[1], P, 1.0, (*tables)[2],
                       Storage<math_t<T> >::id, P, D);
        if (chunked && (unflushed - s == chunk || s == 0)) {
          side->run([&] {
            const double beta = unflushed == T_ ? 0.0 : 1.0;  // the first chunk starts the sum
            for (int64_t d = 0; d < chunked_dirs; ++d) {
              const int64_t t0 = d == 0 ? s : T_ - unflushed, t1 = d == 0 ? unflushed : T_ - s;
              input_weight_grads_of(d, t0, t1, beta);
              recurrent_weight_grads_of(d, t0, t1, beta);
            }
          });
          unflushed = s;
        }
      }
      // What does not recur, for all steps at once: four independent pieces of work, one
      // after another on the current stream, or side by side on streams of their own where
      // the launch rules say so (rules::overlap_weight_grads).
      const Weights w_ih = input_grad ? contiguous(wts.w_ih, D) : Weights{};
      auto input_grads = [&] {  // dx = sum over d of dg[d] W_ih[d]
        for (int64_t d = 0; d < (input_grad ? D : 0); ++d)
          gemm<S>(false, false, rows, I, G, ptr<S>(dg) + d * rows * G, G, 0, ptr<S>(w_ih[d]), I, 0, d ? 1.0 : 0.0,
                  ptr<S>(dx), Storage<S>::id, I, 0, 1);
      };
      // Chunked: only the directions the chunks did not cover are left.
      auto input_weight_grads = [&] {  // dW_ih[d] = dg[d]^T x (x shared by the directions: stride 0)
        if (!weight_grads) return;
        if (chunked) {
          for (int64_t d = chunked_dirs; d < D; ++d) input_weight_grads_of(d, 0, T_, 0.0);
          return;
        }
        gemm<S>(true, false, G, I, rows, ptr<S>(dg), G, rows * G, ptr<S>(x), I, 0, 0.0, ptr<S>(dw_ih), Storage<S>::id,
                I, G * I, D);
      };
      auto recurrent_weight_grads = [&] {  // dW_hh[d] = dg[d]^T h_prev[d], dW_hr[d] = dh_proj[d]^T h_raw[d]
        if (!weight_grads) return;
        if (chunked) {
          for (int64_t d = chunked_dirs; d < D; ++d) recurrent_weight_grads_of(d, 0, T_, 0.0);
          return;
        }
        gemm<S>(true, false, G, P, rows, ptr<S>(dg), G, rows * G, ptr<S>(h_prev), P, rows * P, 0.0, ptr<S>(dw_hh),
                Storage<S>::id, P, G * P, D);
        if (proj)
          gemm<S>(true, false, P, H, rows, ptr<S>(dh_proj_saved), P, rows * P, ptr<S>(h_raw), H, rows * H, 0.0,
                  ptr<S>(dw_hr), Storage<S>::id, H, P * H, D);
      };
      // The bias gradient as one reduction over the rows of both directions (ATen's sum:
      // float accumulation, a fixed order). column_sums_kernel, 8 threads per column,
      // took 0.24 ms of the classic size's 2.48 ms forward+backward on an H200.
      auto bias_grads = [&] { at::sum_out(dbias, dg, {1}); };
      if (rules::overlap_weight_grads()) {
        side_by_side({input_grads, input_weight_grads, recurrent_weight_grads, bias_grads});
      } else {
        input_grads(), input_weight_grads(), recurrent_weight_grads(), bias_grads();
      }
      if (side) side->join();
    }
    dh0 = dh.to(x.scalar_type());
    dc0 = dc.to(x.scalar_type());
  });
  return {dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cuda(const at::Tensor& x_, const at::Tensor& h_,
                                                                      const at::Tensor& c_, const at::Tensor& w_ih_,
                                                                      const at::Tensor& w_hh_,
                                                                      const std::optional<at::Tensor>& bias_,
                                                                      bool training) {
  const auto [B, I, H] = check_cell("lstm_cell_forward", x_, h_, c_, w_ih_, w_hh_, bias_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  auto opt = x.options();
  const int64_t G = 4 * H;
  at::Tensor xg = at::empty({B, G}, opt), h_new = at::empty({B, H}, opt), c_new;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_cell_forward_cuda", [&] {
    using S = scalar_t;
    using T = typename Storage<S>::type;
    auto mopt = opt.dtype(math_scalar<S>());
    at::Tensor c = c_.to(mopt, false, true).contiguous();
    if (B > 0) {
      at::Tensor rec = at::empty({B, G}, mopt);
      gemm<S>(false, true, B, G, I, ptr<S>(x), I, 0, ptr<S>(w_ih), I, 0, 0.0, ptr<S>(xg), Storage<S>::id, G, 0, 1);
      gemm<S>(false, true, B, G, H, ptr<S>(h), H, 0, ptr<S>(w_hh), H, 0, 0.0, math_ptr<S>(rec),
              Storage<math_t<T> >::id, G, 0, 1);
      cuda::FwdStep<T> f{1, B, H, H, 1, 0, nullptr, math_ptr<S>(rec), bias.defined() ? ptr<S>(bias) : nullptr,
                         ptr<S>(xg), math_ptr<S>(c), ptr<S>(h_new), nullptr, ptr<S>(h_new), nullptr, nullptr};
      C10_CUDA_CHECK(cuda::launch_cell_fwd(f, training, at::cuda::getCurrentCUDAStream()));
    }
    c_new = c.to(x.scalar_type());
  });
  return {h_new, c_new, training ? xg : at::Tensor()};  // no gates in inference
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cuda(
    const std::optional<at::Tensor>& grad_h_new, const std::optional<at::Tensor>& grad_c_new, const at::Tensor& x_,
    const at::Tensor& h_, const at::Tensor& c_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const at::Tensor& gates_, bool input_grad, bool weight_grads) {
  const auto [B, I, H] = check_cell_backward(grad_h_new, grad_c_new, x_, h_, c_, w_ih_, w_hh_, gates_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor gates = gates_.contiguous();
  auto opt = x.options();
  const int64_t G = 4 * H;
  // Every gradient is written whole below (zeros only for an empty batch).
  auto out = [&](at::IntArrayRef sizes) { return B > 0 ? at::empty(sizes, opt) : at::zeros(sizes, opt); };
  at::Tensor dx = input_grad ? out({B, I}) : at::empty({0}, opt), dh_out = out({B, H}), dc_out;
  // The weight matrices' gradients: empty when not asked (the op's weight_grad).
  at::Tensor dw_ih = weight_grads ? out({G, I}) : at::empty({0}, opt);
  at::Tensor dw_hh = weight_grads ? out({G, H}) : at::empty({0}, opt), dbias = out({G});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_cell_backward_cuda", [&] {
    using S = scalar_t;
    using T = typename Storage<S>::type;
    auto mopt = opt.dtype(math_scalar<S>());
    at::Tensor dh = grad_h_new ? grad_h_new->to(mopt, false, true).contiguous() : at::zeros({B, H}, mopt);
    at::Tensor dc = grad_c_new ? grad_c_new->to(mopt, false, true).contiguous() : at::zeros({B, H}, mopt);
    if (B > 0) {
      const at::Tensor c = c_.to(mopt).contiguous();
      at::Tensor dg = at::empty({B, G}, opt), dg_step = at::empty({B, G}, opt);
      cuda::BwdStep<T> bs{1, B, H, H, 1, 0, nullptr, ptr<S>(gates), math_ptr<S>(c), nullptr, nullptr,
                          math_ptr<S>(dh), math_ptr<S>(dc), ptr<S>(dg), ptr<S>(dg_step)};
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      C10_CUDA_CHECK(cuda::launch_bwd_step(bs, stream));
      if (input_grad)
        gemm<S>(false, false, B, I, G, ptr<S>(dg), G, 0, ptr<S>(w_ih), I, 0, 0.0, ptr<S>(dx), Storage<S>::id, I, 0,
                1);
      gemm<S>(false, false, B, H, G, ptr<S>(dg), G, 0, ptr<S>(w_hh), H, 0, 0.0, ptr<S>(dh_out), Storage<S>::id, H,
              0, 1);
      if (weight_grads) {
        gemm<S>(true, false, G, I, B, ptr<S>(dg), G, 0, ptr<S>(x), I, 0, 0.0, ptr<S>(dw_ih), Storage<S>::id, I, 0, 1);
        gemm<S>(true, false, G, H, B, ptr<S>(dg), G, 0, ptr<S>(h), H, 0, 0.0, ptr<S>(dw_hh), Storage<S>::id, H, 0, 1);
      }
      cuda::ColumnSums<T> cs{B, G, ptr<S>(dg), ptr<S>(dbias)};
      C10_CUDA_CHECK(cuda::launch_column_sums(cs, stream));
    }
    dc_out = dc.to(x.scalar_type());
  });
  return {dx, dh_out, dc_out, dw_ih, dw_hh, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(birnn_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
  m.impl("lstm_cell_forward", &lstm_cell_forward_cuda);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cuda);
}

}  // namespace birnn
