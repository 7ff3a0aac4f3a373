#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/gemv.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kVec = 8;  // 16 bytes of fp16 / bf16
// 16-byte loads each lane has in flight before it uses the first: enough bytes in flight per SM to
// cover HBM latency with one warp per output feature.
constexpr int kUnroll = 8;

template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) s += to_float(x[i]) * to_float(y[i]);
  return s;
}

// Grid: one warp per output feature (weight row). Weights are read once: streamed past L1 (__ldcs);
// x is tiny and shared by every warp, so it stays cached (__ldg).
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t feature = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (feature >= p.n) return;
  const int64_t chunks = p.k / kVec;
  const uint4* w = reinterpret_cast<const uint4*>(static_cast<const T*>(p.weight) + feature * p.k);
  const uint4* x = reinterpret_cast<const uint4*>(p.x);
  float acc[kRows] = {};
  for (int64_t base = lane; base < chunks; base += 32 * kUnroll) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * 32;
      wv[u] = c < chunks ? __ldcs(w + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * 32;
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += dot8<T>(wv[u], __ldg(x + r * chunks + c));
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    const float b = p.bias ? to_float(static_cast<const T*>(p.bias)[feature]) : 0.f;
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < kRows; ++r) out[r * p.n + feature] = from_float<T>(acc[r] + b);
  }
}

template <typename T>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kWarps - 1) / kWarps));
  switch (p.rows) {
    case 1: gemv_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: gemv_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: gemv_kernel<T, 3><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: gemv_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.rows > kGemvMaxRows || p.n < 1 || p.k < kVec || p.k % kVec != 0 ||
      p.n > 0x7fffffffLL * kWarps || !aligned16(p.x) || !aligned16(p.weight) || !aligned16(p.out))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace th_transformer
