#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/rms_norm.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One CTA per row. The numerics follow the torch reference (ops/norm.py), rounding where it
// rounds: the sum is rounded to T (torch adds in T), normalised in fp32, rounded to T, and only
// then multiplied by the weight, rounding again.
template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* residual = p.residual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
  T* summed = p.residual ? static_cast<T*>(p.residual_out) + row * p.hidden : nullptr;
  float sq = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    float s = to_float(x[i]);
    if (residual) {
      s = round_to<T>(s + to_float(residual[i]));
      summed[i] = from_float<T>(s);
    }
    sq += s * s;
  }
  const float rstd = rsqrtf(block_reduce<false>(sq, scratch) / p.hidden + p.eps);
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + row * p.hidden;
  // Second pass re-reads what this same thread read or wrote in the first (an L1/L2 hit).
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float s = residual ? to_float(summed[i]) : to_float(x[i]);
    out[i] = from_float<T>(to_float(weight[i]) * round_to<T>(s * rstd));
  }
}

}  // namespace

cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > 0x7fffffff || p.hidden <= 0 || (p.residual && !p.residual_out)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    rms_norm_kernel<decltype(tag)><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace th_transformer
