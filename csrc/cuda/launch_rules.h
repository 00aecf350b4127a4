// The launch rules of the CUDA layer ops, in one place, each with the measurement that
// chose it or the switch that awaits one: whether a layer's recurrence (forward or
// backward) runs as one persistent sweep or per step, which sweep (the grid's, a block
// per direction, a cluster per direction) and whose products (the CUDA cores' or the
// tensor cores'). lstm_cuda.cpp asks; launch_rules.cpp answers for the current device.
#pragma once

#include <cstdint>

#include "sweep_kernels.h"

namespace birnn::rules {

// How a layer's recurrence runs.
struct Recurrence {
  bool sweep = false;        // one persistent sweep launch; else a GEMM and a launch per step
  bool cluster = false;      // the sweep with a thread-block cluster per direction (sm_90)
  bool cooperative = false;  // the sweep over several blocks a direction: the grid barrier
  cuda::SweepPlan plan;      // the sweep's cut, where sweep
};

// T: the kernels' storage type (float, double, __half, __nv_bfloat16). `proj`: the layer
// has a projection (no sweep runs one).
template <typename T>
Recurrence recurrence(bool backward, bool training, int64_t B, int64_t H, int64_t D, bool proj);

// Whether a layer backward's work after the recurrence (dx, dW_ih, dW_hh and dW_hr, the
// bias gradient) runs side by side on streams of its own rather than in order.
bool overlap_weight_grads();

// With those side streams on, the per-step backward also sums its weight gradients in this
// many chunks of steps on a side stream while the recurrence goes on (lstm_cuda.cpp).
constexpr int64_t kWeightGradChunks = 8;

}  // namespace birnn::rules
