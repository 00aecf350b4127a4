// The launch rules (launch_rules.h) for the current device, with the measurements behind
// them. The switches are environment variables read once, at first use.
#include "launch_rules.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace birnn::rules {
namespace {

using cuda::math_t;

// Whether a layer's forward runs as one sweep launch (cuda::SweepFwd, where it also
// fits the device) rather than a GEMM and a launch per step. The sweep wins while a
// step's work is small. Inference on an H100, two runs of benchmarks/bench_lstm.py with
// BIRNN_EXT_CUDA_SWEEP=0 and without (the second: benchmarks/results/cuda-sweep-*.csv):
// 1.15-2.3x faster in both at B 1 to 100 with H 128, B 8 and 16 with H 512, and B 32
// with H 256 (B H^2 from 2^14 to 2^22); mixed at B 64 with H 256 (2^22: 1.16x faster,
// then 1.22x slower) and B 32 with H 512 (2^23: 1.08x faster, then 1.38x slower); 2.7x
// slower at B 256 with H 256 (2^24), where each block's share of a step outgrows what
// its 256 threads turn around quickly. BIRNN_EXT_CUDA_SWEEP=0 turns it off (read once,
// at first use).
//
// The backward sweep follows the same rule for now: it does per step the same products
// (dg W_hh instead of h W_hh^T, the same count) on the same cut of the units, but has not
// yet been timed against the per-step GEMMs on a GPU. BIRNN_EXT_CUDA_SWEEP_BWD=0 turns
// the backward sweep alone off, so that one `make gpu-variants` times both ways.
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::string(v) == value;
}

bool use_sweep(int64_t B, int64_t H, bool backward) {
  static const bool fwd_on = !env_is("BIRNN_EXT_CUDA_SWEEP", "0");
  static const bool bwd_on = fwd_on && !env_is("BIRNN_EXT_CUDA_SWEEP_BWD", "0");
  return (backward ? bwd_on : fwd_on) && B * H * H < (int64_t(1) << 23);
}

// Whether a sweep's step products run on the tensor cores, as nn.LSTM's do: the mma K
// (cuda::SweepPlan::mma_k) for float16 and bfloat16, for float32 where
// torch.backends.cudnn.allow_tf32 is on (TF32), on sm_80 and later; else 0, the CUDA
// cores (float64 always). BIRNN_EXT_CUDA_MMA=1 turns them on: off by default until a GPU
// has run them. The emulator checks their fragment layout against its own reference of
// the PTX ISA's (csrc/emu/cuda_emu.h); make gpu-variants runs the GPU tests and times the
// targets preset with them on.
template <typename T>
int64_t sweep_mma_k() {
  static const bool on = env_is("BIRNN_EXT_CUDA_MMA", "1");
  if (!on || at::cuda::getCurrentDeviceProperties()->major < 8) return 0;
  if constexpr (std::is_same_v<T, double>) {
    return 0;
  } else if constexpr (std::is_same_v<T, float>) {
    return at::globalContext().allowTF32CuDNN() ? 8 : 0;
  } else {
    return 16;
  }
}

// How a sweep's step products run: on the tensor cores where sweep_mma_k says so, with
// their weight fragments in registers where they fit; else on the CUDA cores, with
// BIRNN_EXT_CUDA_SWEEP_REGS=1 also their weights in registers where they fit
// (SweepPlan::registers: 2 rows over a slice of the row a thread, the step's tile read 16
// bytes at a time, one shared-memory load per 8 float32 multiply-adds against 6 with the
// weights in shared memory). Chosen by that count, not yet timed: off by default until
// make gpu-variants has timed it against the shared-memory products.
template <typename T>
cuda::Products sweep_products() {
  static const bool simt_registers = env_is("BIRNN_EXT_CUDA_SWEEP_REGS", "1");
  const int64_t mma_k = sweep_mma_k<T>();
  return cuda::Products{mma_k, mma_k > 0 || simt_registers};
}

// The batch groups of a sweep whose blocks (one a direction, or a cluster a direction)
// would leave most of the GPU idle: as many groups as `slots` (what the device runs at
// once: blocks or clusters) hold for D directions, each of at least kMinGroupRows rows (an
// mma's N; fewer rows would keep a block's products mostly idle). The groups split the
// batch rows, which never meet: the same work over more multiprocessors, each staging a
// step's h (dg) of its own rows only. Chosen by that reasoning, not yet timed; it rides
// with the one-block and cluster sweeps, which make gpu-variants times against the grid's.
constexpr int64_t kMinGroupRows = 8;

int64_t batch_groups(int64_t B, int64_t D, int64_t slots) {
  const int64_t by_rows = (B + kMinGroupRows - 1) / kMinGroupRows, by_slots = slots / D;
  return std::max<int64_t>(1, std::min(by_rows, by_slots));
}

// The plan of a sweep on the current device, if it fits there: the units spread over as
// many blocks as the device holds at once, with the grid barrier between steps. With
// BIRNN_EXT_CUDA_SWEEP_BLOCK=1, one block per direction and group of batch rows
// (batch_groups) instead wherever a direction's W_hh fits one block's shared memory (H
// up to about 100 in float32): no grid barrier (about 1.1 us a step on an H200) and a
// plain launch, against the SMs the groups fill. Off by default until a GPU has timed it
// (make gpu-variants times gpu-grid's cases with H below 100 both ways).
template <typename T>
bool device_sweep_plan(bool backward, bool training, int64_t H, int64_t B, int64_t D, cuda::SweepPlan* plan) {
  static const bool block = env_is("BIRNN_EXT_CUDA_SWEEP_BLOCK", "1");
  const cuda::Products products = sweep_products<T>();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int sms = prop->multiProcessorCount;
  const int64_t shared = int64_t(prop->sharedMemPerBlockOptin);
  auto fits = [&] {
    return backward ? cuda::sweep_bwd_fits<T>(*plan, sms) : cuda::sweep_fwd_fits<T>(*plan, training, sms);
  };
  if (block && cuda::choose_block_sweep_plan(backward, H, B, D, sizeof(T), sizeof(math_t<T>), products, shared, plan,
                                             batch_groups(B, D, sms)) &&
      fits())
    return true;
  return cuda::choose_sweep_plan(backward, H, B, D, sizeof(T), sizeof(math_t<T>), products, sms, shared, plan) &&
         fits();
}

// The sweeps with a thread-block cluster per direction and group of batch rows (sm_90
// and later), with BIRNN_EXT_CUDA_SWEEP_CLUSTER=1: the blocks of a direction exchange h
// (dg backward) through their shared memories and meet at the cluster barrier (0.31-0.40
// us a step with a read of another block's shared memory, against the grid barrier's
// 1.1-1.2, on an H200), in clusters of 16 blocks where the device allows that size, else
// 8; in as many groups as the device runs clusters at once (batch_groups), so that a large
// batch fills every cluster the device holds rather than one a direction. Off by default
// until a GPU has timed them against the grid sweeps.
template <typename T>
bool device_cluster_plan(bool backward, bool training, int64_t H, int64_t B, int64_t D, cuda::SweepPlan* plan) {
  static const bool on = env_is("BIRNN_EXT_CUDA_SWEEP_CLUSTER", "1");
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!on || prop->major < 9) return false;
  const int64_t shared = int64_t(prop->sharedMemPerBlockOptin);
  const cuda::Products products = sweep_products<T>();
  auto plan_of = [&](int64_t cluster, int64_t groups) {
    return cuda::choose_cluster_sweep_plan(backward, H, B, D, sizeof(T), sizeof(math_t<T>), products, cluster, shared,
                                           plan, groups);
  };
  auto clusters = [&] {
    return backward ? cuda::sweep_bwd_clusters<T>(*plan, D) : cuda::sweep_fwd_clusters<T>(*plan, training, D);
  };
  for (int64_t cluster : {16, 8}) {
    if (!plan_of(cluster, 1)) continue;
    const int64_t at_once = clusters();
    if (at_once == 0) continue;
    const int64_t groups = batch_groups(B, D, at_once);
    if (groups == 1 || (plan_of(cluster, groups) && clusters() > 0)) return true;
    return plan_of(cluster, 1);  // the one group's plan, which fitted above
  }
  return false;
}

}  // namespace

// The cluster sweep where it is on and fits, else the grid (or one-block) sweep where
// that fits, else per step.
template <typename T>
Recurrence recurrence(bool backward, bool training, int64_t B, int64_t H, int64_t D, bool proj) {
  Recurrence r;
  if (proj || !use_sweep(B, H, backward)) return r;
  if (device_cluster_plan<T>(backward, training, H, B, D, &r.plan)) {
    r.sweep = r.cluster = true;
  } else if (device_sweep_plan<T>(backward, training, H, B, D, &r.plan)) {
    r.sweep = true;
    r.cooperative = cuda::sweep_is_cooperative(r.plan, D);
  }
  return r;
}

// The backward's products after the recurrence are each small beside the GPU at the
// sizes the sweeps serve (classic on an H200: 0.38 ms of weight-gradient GEMMs, four
// launches one after another, in a 2.48 ms forward+backward), and independent of each
// other; at the per-step path's sizes the weight gradients need not wait for the end of
// the recurrence at all (B 128, T 100, H 512, 2 layers on an H200: the fused kernels
// summed to 28.9 ms, less than cuDNN's 37.0, but ran in 30.7 ms against cuDNN's 25.8,
// which overlaps its work on several streams). BIRNN_EXT_CUDA_OVERLAP=1 runs them side by
// side, and the per-step path's weight gradients chunk by chunk beside its recurrence;
// off by default until make gpu-variants has timed it.
bool overlap_weight_grads() {
  static const bool on = env_is("BIRNN_EXT_CUDA_OVERLAP", "1");
  return on;
}

template Recurrence recurrence<float>(bool, bool, int64_t, int64_t, int64_t, bool);
template Recurrence recurrence<double>(bool, bool, int64_t, int64_t, int64_t, bool);
template Recurrence recurrence<__half>(bool, bool, int64_t, int64_t, int64_t, bool);
template Recurrence recurrence<__nv_bfloat16>(bool, bool, int64_t, int64_t, int64_t, bool);

}  // namespace birnn::rules
