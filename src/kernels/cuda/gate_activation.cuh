// act(gate) * up for one element, as the gated-activation kernel and the gated GEMV compute it.
#pragma once

#include "src/kernels/cuda/activation.h"
#include "src/kernels/cuda/common.cuh"

namespace th_transformer {
namespace cuda {

// The formulas of torch's CUDA kernels, in fp32.
template <GateActivation kAct>
__device__ __forceinline__ float activate(float x) {
  if (kAct == GateActivation::kSilu) return x / (1.f + expf(-x));
  if (kAct == GateActivation::kGelu) return x * 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);  // sqrt(2/pi)
  return 0.5f * x * (1.f + tanhf(inner));
}

// The activation is rounded to T before the multiply because the reference computes act(gate) and
// `* up` as two ops in T.
template <typename T, GateActivation kAct>
__device__ __forceinline__ T gated(T gate, T up) {
  return from_float<T>(round_to<T>(activate<kAct>(to_float(gate))) * to_float(up));
}

}  // namespace cuda
}  // namespace th_transformer
