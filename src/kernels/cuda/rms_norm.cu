#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"
#include "src/kernels/cuda/rms_norm.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// The numerics follow the torch reference (ops/norm.py), rounding where it rounds: the sum is
// rounded to T (torch adds in T), normalised in fp32, rounded to T, and only then multiplied by
// the weight, rounding again.

// Rows whose 16-byte chunks fit kMaxVecs per thread: every load of the row is issued before the
// first is used and the row stays in registers between the two passes. A decode step has one row
// per sequence (one CTA on one SM at batch 1), so the kernel is bound by load latency, not
// bandwidth: the scalar loop below took 14 us for a 4096-wide bf16 row, this one a few.
template <typename T, int kMaxVecs>
__global__ void __launch_bounds__(kThreads) rms_norm_vec_kernel(const RmsNormParams p) {
  constexpr int kPer = 16 / sizeof(T);
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / kPer;
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + row * p.x_row_stride);
  const uint4* residual =
      p.residual ? reinterpret_cast<const uint4*>(static_cast<const T*>(p.residual) + row * p.residual_row_stride)
                 : nullptr;
  uint4* summed = p.residual ? reinterpret_cast<uint4*>(static_cast<T*>(p.residual_out) + row * p.hidden) : nullptr;
  // The weight is loaded with the row, not after the reduction: one dependent memory round trip
  // less in a kernel that is all latency at batch 1.
  // It is read before waiting for the previous kernel (launch.cuh).
  const uint4* weight = static_cast<const uint4*>(p.weight);
  uint4 raw[kMaxVecs], res_raw[kMaxVecs], w_raw[kMaxVecs];
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int v = threadIdx.x + j * kThreads;
    if (v < nvec) w_raw[j] = weight[v];
  }
  allow_downstream_launch();
  wait_for_upstream();
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int v = threadIdx.x + j * kThreads;
    if (v < nvec) {
      raw[j] = x[v];
      if (residual) res_raw[j] = residual[v];
    }
  }
  float vals[kMaxVecs][kPer];
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int v = threadIdx.x + j * kThreads;
    if (v >= nvec) continue;
    const T* xe = reinterpret_cast<const T*>(&raw[j]);
    const T* re = reinterpret_cast<const T*>(&res_raw[j]);
    uint4 sum_raw;
    T* se = reinterpret_cast<T*>(&sum_raw);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      float s = to_float(xe[k]);
      if (residual) {
        s = round_to<T>(s + to_float(re[k]));
        se[k] = from_float<T>(s);
      }
      vals[j][k] = s;
      sq += s * s;
    }
    if (residual) summed[v] = sum_raw;
  }
  const float rstd = rsqrtf(block_reduce<false>(sq, scratch) / p.hidden + p.eps);
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row * p.hidden);
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int v = threadIdx.x + j * kThreads;
    if (v >= nvec) continue;
    const T* we = reinterpret_cast<const T*>(&w_raw[j]);
    uint4 o_raw;
    T* oe = reinterpret_cast<T*>(&o_raw);
#pragma unroll
    for (int k = 0; k < kPer; ++k) oe[k] = from_float<T>(to_float(we[k]) * round_to<T>(vals[j][k] * rstd));
    out[v] = o_raw;
  }
}

// Any other row: one CTA per row, scalar loads.
template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormParams p) {
  __shared__ float scratch[32];
  allow_downstream_launch();
  wait_for_upstream();
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

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The vector kernel needs whole 16-byte chunks: every pointer aligned, every row start aligned.
template <typename T>
bool vector_path_applies(const RmsNormParams& p) {
  constexpr int kPer = 16 / sizeof(T);
  const bool pointers = aligned16(p.x) && aligned16(p.out) && aligned16(p.weight) &&
                        (!p.residual || (aligned16(p.residual) && aligned16(p.residual_out)));
  const bool strides = p.hidden % kPer == 0 && p.x_row_stride % kPer == 0 &&
                       (!p.residual || p.residual_row_stride % kPer == 0);
  return pointers && strides;
}

template <typename T>
cudaError_t launch(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kPer = 16 / sizeof(T);
  const unsigned rows = static_cast<unsigned>(p.rows);
  const int nvec = p.hidden / kPer;
  if (vector_path_applies<T>(p) && nvec <= 4 * kThreads)
    return launch_kernel(rms_norm_vec_kernel<T, 4>, dim3(rows), dim3(kThreads), 0, stream, p);
  if (vector_path_applies<T>(p) && nvec <= 8 * kThreads)
    return launch_kernel(rms_norm_vec_kernel<T, 8>, dim3(rows), dim3(kThreads), 0, stream, p);
  return launch_kernel(rms_norm_kernel<T>, dim3(rows), dim3(kThreads), 0, stream, p);
}

}  // namespace

cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > 0x7fffffff || p.hidden <= 0 || (p.residual && !p.residual_out)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) { return launch<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace th_transformer
