#include "src/kernels/cuda/quantize.h"

#include <cuda_fp8.h>

#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_max(float v, float* shared) {
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? shared[lane] : 0.f;
  return warp_max(v);  // every warp reduces the partial maxima itself: no second barrier
}

// One CTA per row: its absmax, then the scaled values. The scale is a product with 1/448 and the
// values a true division, as the torch reference (ops/linear.py, quantize_fp8_rows) computes them.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_rows_fp8_kernel(const QuantizeRowsParams p) {
  __shared__ float partial[kThreads / 32];
  allow_downstream_launch();
  wait_for_upstream();
  const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.row_stride;
  __nv_fp8_e4m3* out = static_cast<__nv_fp8_e4m3*>(p.out) + blockIdx.x * p.cols;
  float absmax = 0.f;
  for (int64_t i = threadIdx.x; i < p.cols; i += kThreads) absmax = fmaxf(absmax, fabsf(to_float(x[i])));
  absmax = block_max(absmax, partial);
  float scale = absmax * (1.f / 448.f);
  if (!(scale > 0.f)) scale = 1.f;
  for (int64_t i = threadIdx.x; i < p.cols; i += kThreads)
    out[i] = __nv_fp8_e4m3(fminf(fmaxf(to_float(x[i]) / scale, -448.f), 448.f));
  if (threadIdx.x == 0) p.scale[blockIdx.x] = scale;
}

}  // namespace

cudaError_t quantize_rows_fp8(const QuantizeRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > 0x7fffffff || p.cols <= 0 || p.row_stride < p.cols) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel(quantize_rows_fp8_kernel<decltype(tag)>, dim3(static_cast<unsigned>(p.rows)), dim3(kThreads),
                         0, stream, p);
  });
}

}  // namespace cuda
}  // namespace th_transformer
