// Device helpers shared by the kernels: fp32 conversions, dtype dispatch, warp/block reductions.
// Every kernel computes in fp32 and rounds once on store, as torch's reduced-precision ops do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

// Explicit intrinsics: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Rounds through T: reproduces the intermediate rounding torch does between two ops in T.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// Calls f(T{}) with T the C++ type of `dtype`; the launchers use it to pick a template instance.
template <typename F>
inline cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Sums each of the N values over the kLanes lanes of a lane group, scattering the results: a lane
// ends with max(1, N / kLanes) sums, v[0..), of the values numbered `first` on (the return value).
// Each halving step sends half of what a lane still holds and keeps the other half, so N = kLanes
// values take kLanes - 1 shuffles instead of N * log2(kLanes) for separate butterflies. With
// N < kLanes the last steps are plain butterflies and several lanes hold the same sum; `writer`
// says whether this lane is the one to store it.
template <int N, int kLanes>
__device__ __forceinline__ int reduce_scatter(float (&v)[N], int lane_in_row, bool& writer) {
  int first = 0;
  writer = true;
  int held = N;
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    const bool upper = (lane_in_row & offset) != 0;
    if (held > 1) {
      held /= 2;
#pragma unroll
      for (int j = 0; j < N / 2; ++j) {
        if (j >= held) break;
        const float send = upper ? v[j] : v[j + held];
        const float keep = upper ? v[j + held] : v[j];
        v[j] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
      }
      if (upper) first += held;
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
      writer = writer && !upper;
    }
  }
  return first;
}

// Sum (or max) over the whole block, returned to every thread. `scratch` holds 32 floats; the
// leading barrier lets one scratch buffer serve back-to-back reductions.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  return kMax ? warp_max(x) : warp_sum(x);
}

}  // namespace cuda
}  // namespace th_transformer
