#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/row_stats.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kUnroll = 8;

// Running (max, index of the first max, sum of exp(x - max)) of a set of values.
struct Stats {
  float max;
  int64_t index;
  float sum;
};

// Values are visited in increasing index order per thread, so a tie keeps the first index.
// Masked entries (-inf) add nothing. Rows are assumed free of NaN (logits of a working model).
__device__ __forceinline__ void add_value(Stats& s, float x, int64_t i) {
  if (x > s.max) {
    s.sum = s.sum * expf(s.max - x) + 1.f;
    s.max = x;
    s.index = i;
  } else if (x != -INFINITY) {
    s.sum += expf(x - s.max);
  }
}

__device__ __forceinline__ Stats combine(const Stats& a, const Stats& b) {
  if (b.max > a.max || (b.max == a.max && b.index < a.index)) {
    const float scale = a.max == -INFINITY ? 0.f : expf(a.max - b.max);
    return Stats{b.max, b.index, b.sum + a.sum * scale};
  }
  const float scale = b.max == -INFINITY ? 0.f : expf(b.max - a.max);
  return Stats{a.max, a.index, a.sum + b.sum * scale};
}

__device__ __forceinline__ Stats warp_combine(Stats s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Stats o{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.index, offset),
            __shfl_xor_sync(0xffffffffu, s.sum, offset)};
    s = combine(s, o);
  }
  return s;
}

// One CTA per row; threads stride over 16-byte chunks (float4) when the row allows, else floats.
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const RowStatsParams p) {
  __shared__ Stats partial[kThreads / 32];
  const float* row = p.logits + blockIdx.x * p.row_stride;
  Stats s{-INFINITY, p.vocab, 0.f};
  // an all -inf row keeps index vocab here; the combine below resolves it to 0, as argmax does
  if (p.vocab % 4 == 0 && p.row_stride % 4 == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0) {
    // kUnroll loads in flight per thread before the first is used: one row is one CTA on one SM,
    // bound by load latency (a plain loop took 23 us for a 128k row on the H100)
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int64_t n4 = p.vocab / 4;
    for (int64_t base = threadIdx.x; base < n4; base += static_cast<int64_t>(kThreads) * kUnroll) {
      float4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = base + u * kThreads;
        v[u] = c < n4 ? row4[c] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = base + u * kThreads;
        add_value(s, v[u].x, 4 * c);
        add_value(s, v[u].y, 4 * c + 1);
        add_value(s, v[u].z, 4 * c + 2);
        add_value(s, v[u].w, 4 * c + 3);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < p.vocab; i += kThreads) add_value(s, row[i], i);
  }
  s = warp_combine(s);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = partial[threadIdx.x];
    s = warp_combine(s);
    if (threadIdx.x == 0) {
      p.argmax[blockIdx.x] = s.index < p.vocab ? s.index : 0;
      p.logsumexp[blockIdx.x] = s.max == -INFINITY ? -INFINITY : s.max + logf(s.sum);
    }
  }
}

}  // namespace

cudaError_t row_argmax_logsumexp(const RowStatsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > 0x7fffffff || p.vocab <= 0 || p.row_stride < p.vocab) return cudaErrorInvalidValue;
  row_stats_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace th_transformer
