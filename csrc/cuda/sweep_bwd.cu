// The backward sweep of a layer: its whole recurrence in reverse, both directions, in
// one launch (sweep_kernels.h says how the work is cut; sweep_common.cuh holds what it
// shares with the forward sweep).
#include "sweep_common.cuh"

namespace birnn::cuda {
namespace {

using namespace sweep;

// What a unit's cell backward at a phase needs besides the phase's products (as
// FwdInputs in the forward sweep): the carries of its own state and the forward's saved
// values, none of which depends on the products, so each thread loads its first item's
// before them.
template <typename T>
struct BwdInputs {
  int64_t len, row;     // the sequence's length; the row the step's gates and outputs are at
  math_t<T> dh, dc;     // the carries to h_t and c_t so far (dh without this phase's dg W_hh)
  math_t<T> dy;         // the output's gradient, zero without one
  math_t<T> c_prev;     // the forward's cell state before the step
  math_t<T> gates[4];   // the forward's activated gates
};

template <typename T>
__device__ __forceinline__ BwdInputs<T> bwd_inputs(const SweepBwd<T>& p, int64_t d, int64_t s, int64_t b, int j) {
  using A = math_t<T>;
  const int64_t H = p.H, G = 4 * H, state = d * p.B + b;
  BwdInputs<T> in;
  in.dh = p.dh[state * H + j];
  in.dc = p.dc[state * H + j];
  in.len = p.len ? p.len[b] : p.T_;
  in.row = s < 0 ? 0 : step_time(d, s, in.len) * p.B + b;
  const bool active = s >= 0 && s < in.len;  // the last phase (s -1) and padding read none of the rest
  const int64_t at = in.row * p.D * H + d * H + j;
  in.dy = active && p.dy ? to_math(p.dy[at]) : A(0);
  in.c_prev = active ? p.c_prev[at] : A(0);
  for (int g = 0; g < 4; ++g) in.gates[g] = active ? to_math(p.gates[in.row * p.D * G + d * G + g * H + j]) : A(0);
  return in;
}

// The backward sweep. The block's shared W_hh columns make dh = dg_{t+1} W_hh at its units
// from the whole dg row of the step before; the cell backward of its units then needs
// nothing from other blocks (dh and dc of its units are its own), and its dg goes out for
// the others' next phase: through global memory (dg_step) with the grid barrier, or with
// Cluster (sm_90) through its shared memory (own, [2][group_rows][4 U]: its units' dg of
// its group's rows, gate by gate) with the cluster barrier, as in the forward sweep. Steps no gradient has reached
// are not skipped, as the CPU sweep skips them: both directions share the step barrier,
// so a direction whose dg is still zero (the reverse one under a loss on the last output
// only) would wait for the other direction anyway, and the zero products and cells cost
// no extra step time.
template <typename T, bool Cluster, bool Mma>
__global__ void sweep_bwd_kernel(const SweepBwd<T> p) {
  using A = math_t<T>;
  const SweepPlan& pl = p.plan;
  const int H = int(p.H), U = int(pl.units), R = int(pl.rows), W = 4 * H, L = int(pl.lanes);
  const int stride = int(pl.stride);
  const PartLayout pt = part_layout(pl);
  const int64_t G = 4 * p.H, B = p.B, D = p.D;
  const BlockPlace place = block_place(pl, p.H, B);
  const int64_t d = place.d;
  const int j0 = place.j0, nu = place.nu;
  const int tid = threadIdx.x, nt = blockDim.x;
  BIRNN_DYNAMIC_SHARED(unsigned char, smem);
  T* w_s = reinterpret_cast<T*>(smem);                    // [R][stride]: row u is W_hh column j0 + u (zeros past nu)
  T* g_s = reinterpret_cast<T*>(smem + pl.tile_offset);  // [tile_rows][stride]: dg of the tile's rows, last phase
  A* part = reinterpret_cast<A*>(smem + pl.part_offset);  // partial dot products (PartLayout pt)
  T* own = reinterpret_cast<T*>(smem + pl.own_offset);   // Cluster: [2][group_rows][4 U]
  // k-major, so that neighbouring threads read neighbouring columns of a W_hh row; zeros
  // past the block's units and past the row's end, as in the forward sweep.
  const T zero = from_math<T>(A(0));
  for (int i = tid; i < R * stride; i += nt) {
    const int k = i / R, u = i % R;
    w_s[u * stride + k] = u < nu && k < W ? p.w_hh[d][k * H + j0 + u] : zero;
  }
  WeightRegisters<T, Mma> regs;  // the thread's weights where the plan keeps them in registers
  prepare_products<Mma>(pl, w_s, W, g_s, regs);
  for (int64_t q = p.q_begin; q < p.q_end; ++q) {
    const int64_t s = p.T_ - 1 - q;  // the sweep step; -1 in the last phase, which only makes dh0
    const T* dg_last = p.dg_step + ((q & 1) * D + d) * B * G;
    T* dg_next = p.dg_step + (((q + 1) & 1) * D + d) * B * G;
    T* own_next = own + ((q + 1) & 1) * pl.group_rows * 4 * U;
    for (int64_t b0 = place.b_begin; b0 < place.b_end; b0 += pl.batch_tile) {
      const int nb = int(place.b_end - b0 < pl.batch_tile ? place.b_end - b0 : pl.batch_tile);
      const int staged = staged_rows<Mma>(nb);
      BwdInputs<T> first;
      if (tid < nb * nu) first = bwd_inputs(p, d, s, b0 + tid / nu, j0 + tid % nu);
      if (q > 0) {  // the first phase has no dg before it
        if (Cluster) {
          stage_from_cluster(own + (q & 1) * pl.group_rows * 4 * U, b0 - place.b_begin, nb, staged, W, stride, H, U,
                             4 * U, g_s);
        } else {
          stage_tile(dg_last + b0 * G, nb, staged, W, stride, g_s);
        }
        __syncthreads();
        step_products<Mma>(pl, w_s, g_s, W, nb, staged, regs, part);
#if !defined(BIRNN_BREAK_SWEEP_BWD_BARRIER)
        __syncthreads();
#endif
      }
      for (int t = tid; t < nb * nu; t += nt) {
        const int bb = t / nu, u = t % nu, j = j0 + u;
        const int64_t b = b0 + bb, state = d * B + b;
        const BwdInputs<T> in = t == tid ? first : bwd_inputs(p, d, s, b, j);
        // The gradient carried to h_t: from h_n or the steps after, through padding unchanged.
        A carry = in.dh;
        if (q > 0) carry += lane_sum(part + bb * pt.batch + u * pt.row, L);
        if (s < 0) {
          p.dh[state * H + j] = carry;
          continue;
        }
        T* dg = p.dg + (d * p.T_ * B + in.row) * G;
        A grads[4] = {};
        if (s >= in.len) {  // padding: no gradient through it, the carries pass unchanged
          p.dh[state * H + j] = carry;
        } else {
          const Gates<A> a{in.gates[0], in.gates[1], in.gates[2], in.gates[3]};
          const GateGrads<A> r = backward(a, in.c_prev, carry + in.dy, in.dc);
          grads[0] = r.di, grads[1] = r.df, grads[2] = r.dg, grads[3] = r.do_;
          p.dc[state * H + j] = r.dc_prev;
          p.dh[state * H + j] = A(0);  // the next phase adds dg W_hh to it
        }
        for (int g = 0; g < 4; ++g) {
          const T v = from_math<T>(grads[g]);
          dg[g * H + j] = v;
          if (Cluster) {
            own_next[(b - place.b_begin) * 4 * U + g * U + u] = v;
          } else {
            dg_next[b * G + g * H + j] = v;
          }
        }
      }
      __syncthreads();  // the next tile overwrites g_s and part
    }
    if (Cluster) {
#if !defined(BIRNN_BREAK_CLUSTER_BWD_BARRIER)
      BIRNN_CLUSTER_SYNC();
#endif
    } else if (q + 1 < p.q_end) {
      step_barrier(place.per_dir);
    }
  }
}

// The kernel that runs a plan: tensor-core products where the plan has them; nullptr for
// a plan no kernel runs.
template <typename T, bool Cluster>
auto bwd_kernel(const SweepPlan& plan) -> void (*)(SweepBwd<T>) {
  if constexpr (kHasMma<T>) {
    if (plan.mma_k == mma::Traits<mma::KindOf<T>::value>::kK) return sweep_bwd_kernel<T, Cluster, true>;
  }
  if (plan.mma_k) return nullptr;
  return sweep_bwd_kernel<T, Cluster, false>;
}

}  // namespace

template <typename T>
cudaError_t launch_sweep_bwd(const SweepBwd<T>& p, bool cooperative, cudaStream_t stream) {
  if (p.B == 0 || p.q_begin >= p.q_end) return cudaSuccess;
  return launch_sweep(bwd_kernel<T, false>(p.plan), p, p.q_end - p.q_begin, cooperative, stream);
}

template <typename T>
cudaError_t launch_sweep_bwd_cluster(const SweepBwd<T>& p, cudaStream_t stream) {
  if (p.B == 0 || p.q_begin >= p.q_end) return cudaSuccess;
  return launch_clusters(bwd_kernel<T, true>(p.plan), p, stream);
}

#if !defined(BIRNN_EMU)
template <typename T>
bool sweep_bwd_fits(const SweepPlan& plan, int multiprocessors) {
  return fits(bwd_kernel<T, false>(plan), plan, multiprocessors);
}

template <typename T>
int64_t sweep_bwd_clusters(const SweepPlan& plan, int64_t D) {
  return max_clusters(bwd_kernel<T, true>(plan), plan, D);
}
#define BIRNN_INSTANTIATE_FITS(T)                           \
  template bool sweep_bwd_fits<T>(const SweepPlan&, int); \
  template int64_t sweep_bwd_clusters<T>(const SweepPlan&, int64_t);
#else
#define BIRNN_INSTANTIATE_FITS(T)
#endif

#define BIRNN_INSTANTIATE(T)                                                          \
  template cudaError_t launch_sweep_bwd<T>(const SweepBwd<T>&, bool, cudaStream_t); \
  template cudaError_t launch_sweep_bwd_cluster<T>(const SweepBwd<T>&, cudaStream_t); \
  BIRNN_INSTANTIATE_FITS(T)
BIRNN_INSTANTIATE(float)
BIRNN_INSTANTIATE(double)
BIRNN_INSTANTIATE(__half)
BIRNN_INSTANTIATE(__nv_bfloat16)
#undef BIRNN_INSTANTIATE
#undef BIRNN_INSTANTIATE_FITS

}  // namespace birnn::cuda
