// The forward sweep of a layer: its whole recurrence, both directions, in one launch
// (sweep_kernels.h says how the work is cut; sweep_common.cuh holds what it shares with
// the backward sweep).
#include "sweep_common.cuh"

namespace birnn::cuda {
namespace {

using namespace sweep;

// What a unit's cell update at a step needs besides the step's products. None of it
// depends on them, so each thread loads its first item's before the products
// (sweep_fwd_kernel): the trip to memory then overlaps the staging and the products
// instead of following them, once a step. Most plans give a thread one item a tile.
template <typename T>
struct FwdInputs {
  int64_t len, row;       // the sequence's length; the row of x and y the step reads and writes
  math_t<T> c;            // the cell state before the step
  math_t<T> x[4];         // x W_ih^T of the unit's gates (not loaded past the sequence's end)
  math_t<T> bias[4];      // b_ih + b_hh, zeros without a bias
};

template <typename T>
__device__ __forceinline__ FwdInputs<T> fwd_inputs(const SweepFwd<T>& p, int64_t d, int64_t s, int64_t b, int j) {
  using A = math_t<T>;
  const int64_t H = p.H, G = 4 * H;
  FwdInputs<T> in;
  in.len = p.len ? p.len[b] : p.T_;
  in.row = step_time(d, s, in.len) * p.B + b;
  in.c = p.c[(d * p.B + b) * H + j];
  for (int g = 0; g < 4; ++g) {
    in.x[g] = s < in.len ? to_math(p.xg[in.row * p.D * G + d * G + g * H + j]) : A(0);
    // b_ih + b_hh rounded to the storage type, as a sum of the two tensors would be.
    in.bias[g] = p.b_ih[d] ? to_math(from_math<T>(to_math(p.b_ih[d][g * H + j]) + to_math(p.b_hh[d][g * H + j])))
                           : A(0);
  }
  return in;
}

// The forward sweep. Cluster = false: the grid sweep, h passed between the steps through
// global memory (hs), the grid barrier between them (or none where a block holds a
// direction for its group's rows). Cluster = true (sm_90): a thread-block cluster per
// direction and group; each block keeps its units' h of the last two steps for its
// group's rows in its shared memory (own, [2][group_rows][U]), where the others read it,
// and the cluster barrier ends each step, the last one included: no block may leave while
// another still reads its shared memory. Mma: the step's products on the tensor cores
// (mma_products), else on the CUDA cores (tile_products).
template <typename T, bool Training, bool Cluster, bool Mma>
__global__ void sweep_fwd_kernel(const SweepFwd<T> p) {
  using A = math_t<T>;
  const SweepPlan& pl = p.plan;
  // Shared-memory indices fit in int; global offsets stay int64_t.
  const int H = int(p.H), U = int(pl.units), R = int(pl.rows), L = int(pl.lanes), stride = int(pl.stride);
  const PartLayout pt = part_layout(pl);
  const int64_t G = 4 * p.H, B = p.B, D = p.D;
  const BlockPlace place = block_place(pl, p.H, B);
  const int64_t d = place.d;
  const int j0 = place.j0, nu = place.nu;  // the block's units [j0, j0 + nu): j0 / U its rank in its cluster
  const int tid = threadIdx.x, nt = blockDim.x;
  BIRNN_DYNAMIC_SHARED(unsigned char, smem);
  T* w_s = reinterpret_cast<T*>(smem);                    // [R][stride]: row g*U + u is W_hh row g*H + j0 + u
  T* h_s = reinterpret_cast<T*>(smem + pl.tile_offset);  // [tile_rows][stride]: h of the tile's rows
  A* part = reinterpret_cast<A*>(smem + pl.part_offset);  // partial dot products (PartLayout pt)
  T* own = reinterpret_cast<T*>(smem + pl.own_offset);   // Cluster: [2][group_rows][U]
  // Zeros past the rows of the block's units and past the row's end: the tensor cores
  // read whole 16-row tiles and whole mma steps of the row.
  const T zero = from_math<T>(A(0));
  for (int i = tid; i < R * stride; i += nt) {
    const int r = i / stride, k = i % stride, g = r / U, u = r % U;
    w_s[i] = r < 4 * U && u < nu && k < H ? p.w_hh[d][(g * H + j0 + u) * H + k] : zero;
  }
  WeightRegisters<T, Mma> regs;  // the thread's weights where the plan keeps them in registers
  prepare_products<Mma>(pl, w_s, H, h_s, regs);
  for (int64_t s = p.s_begin; s < p.s_end; ++s) {
    const T* h_cur = s == 0 ? p.h0 + d * B * H : p.h + ((s & 1) * D + d) * B * H;
    T* h_next = s == p.T_ - 1 ? p.h_n + d * B * H : p.h + (((s + 1) & 1) * D + d) * B * H;
    T* own_next = own + ((s + 1) & 1) * pl.group_rows * U;
    for (int64_t b0 = place.b_begin; b0 < place.b_end; b0 += pl.batch_tile) {
      const int nb = int(place.b_end - b0 < pl.batch_tile ? place.b_end - b0 : pl.batch_tile);
      const int staged = staged_rows<Mma>(nb);
      FwdInputs<T> first;
      if (tid < nb * nu) first = fwd_inputs(p, d, s, b0 + tid / nu, j0 + tid % nu);
      if (Cluster && s > 0) {
        stage_from_cluster(own + (s & 1) * pl.group_rows * U, b0 - place.b_begin, nb, staged, H, stride, H, U, U, h_s);
      } else {
        stage_tile(h_cur + b0 * H, nb, staged, H, stride, h_s);
      }
      __syncthreads();
      step_products<Mma>(pl, w_s, h_s, H, nb, staged, regs, part);
#if !defined(BIRNN_BREAK_SWEEP_BARRIER)
      __syncthreads();
#endif
      for (int t = tid; t < nb * nu; t += nt) {
        const int bb = t / nu, u = t % nu, j = j0 + u;
        const int64_t b = b0 + bb;
        const FwdInputs<T> in = t == tid ? first : fwd_inputs(p, d, s, b, j);
        const int64_t row = in.row, state = d * B + b;
        const T h_old = h_s[bb * stride + j];
        if (p.c_prev) p.c_prev[row * D * H + d * H + j] = in.c;
        if (p.h_prev) p.h_prev[(d * p.T_ * B + row) * H + j] = h_old;
        T* y = p.y + row * D * H + d * H;
        T h_new = h_old;  // padding: zero output, state carried unchanged
        if (s >= in.len) {
          y[j] = from_math<T>(A(0));
        } else {
          A sums[4], c = in.c;
          for (int g = 0; g < 4; ++g) sums[g] = lane_sum(part + bb * pt.batch + (g * U + u) * pt.row, L);
          h_new = from_math<T>(cell_forward<T, Training>(in.x, sums, in.bias, c, p.xg + row * D * G + d * G, H, j));
          p.c[state * H + j] = c;
          y[j] = h_new;
        }
        if (Cluster) {
          own_next[(b - place.b_begin) * U + u] = h_new;
          if (s == p.T_ - 1) h_next[b * H + j] = h_new;
        } else {
          h_next[b * H + j] = h_new;
        }
      }
      __syncthreads();  // the next tile overwrites h_s and part
    }
    if (Cluster) {
#if !defined(BIRNN_BREAK_CLUSTER_BARRIER)
      BIRNN_CLUSTER_SYNC();
#endif
    } else if (s + 1 < p.s_end) {
      step_barrier(place.per_dir);
    }
  }
}

// The kernel that runs a plan: tensor-core products where the plan has them, the variant
// that saves what the backward needs where training; nullptr for a plan no kernel runs.
template <typename T, bool Cluster>
auto fwd_kernel(const SweepPlan& plan, bool training) -> void (*)(SweepFwd<T>) {
  if constexpr (kHasMma<T>) {
    if (plan.mma_k == mma::Traits<mma::KindOf<T>::value>::kK)
      return training ? sweep_fwd_kernel<T, true, Cluster, true> : sweep_fwd_kernel<T, false, Cluster, true>;
  }
  if (plan.mma_k) return nullptr;
  return training ? sweep_fwd_kernel<T, true, Cluster, false> : sweep_fwd_kernel<T, false, Cluster, false>;
}

}  // namespace

template <typename T>
cudaError_t launch_sweep_fwd(const SweepFwd<T>& p, bool cooperative, cudaStream_t stream) {
  if (p.B == 0 || p.s_begin >= p.s_end) return cudaSuccess;
  return launch_sweep(fwd_kernel<T, false>(p.plan, p.c_prev != nullptr), p, p.s_end - p.s_begin, cooperative, stream);
}

template <typename T>
cudaError_t launch_sweep_fwd_cluster(const SweepFwd<T>& p, cudaStream_t stream) {
  if (p.B == 0 || p.s_begin >= p.s_end) return cudaSuccess;
  return launch_clusters(fwd_kernel<T, true>(p.plan, p.c_prev != nullptr), p, stream);
}

#if !defined(BIRNN_EMU)
template <typename T>
bool sweep_fwd_fits(const SweepPlan& plan, bool training, int multiprocessors) {
  return fits(fwd_kernel<T, false>(plan, training), plan, multiprocessors);
}

template <typename T>
int64_t sweep_fwd_clusters(const SweepPlan& plan, bool training, int64_t D) {
  return max_clusters(fwd_kernel<T, true>(plan, training), plan, D);
}
#define BIRNN_INSTANTIATE_FITS(T)                                 \
  template bool sweep_fwd_fits<T>(const SweepPlan&, bool, int); \
  template int64_t sweep_fwd_clusters<T>(const SweepPlan&, bool, int64_t);
#else
#define BIRNN_INSTANTIATE_FITS(T)
#endif

#define BIRNN_INSTANTIATE(T)                                                          \
  template cudaError_t launch_sweep_fwd<T>(const SweepFwd<T>&, bool, cudaStream_t); \
  template cudaError_t launch_sweep_fwd_cluster<T>(const SweepFwd<T>&, cudaStream_t); \
  BIRNN_INSTANTIATE_FITS(T)
BIRNN_INSTANTIATE(float)
BIRNN_INSTANTIATE(double)
BIRNN_INSTANTIATE(__half)
BIRNN_INSTANTIATE(__nv_bfloat16)
#undef BIRNN_INSTANTIATE
#undef BIRNN_INSTANTIATE_FITS

}  // namespace birnn::cuda
