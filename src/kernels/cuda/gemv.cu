#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/gemv.h"
#include "src/kernels/cuda/launch.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// 16-byte chunks of each row a lane loads before using the first: with kRows rows that is
// kRows * kUnroll loads in flight per lane.
constexpr int kUnroll = 4;

// sum over 8 elements of w * x (both 16-byte chunks of T), in fp32
template <typename T>
__device__ __forceinline__ float dot_chunk(const uint4& w, const uint4& x) {
  const T* wv = reinterpret_cast<const T*>(&w);
  const T* xv = reinterpret_cast<const T*>(&x);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc += to_float(wv[i]) * to_float(xv[i]);
  return acc;
}

// Streaming load: the weight is read once per step, keep it out of L1.
__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }

// Loads the 16-byte chunks base + u * 32 (u < kUnroll) of each of the warp's rows (zeros past the
// row's end).
template <int kRows>
__device__ __forceinline__ void load_tile(const uint4* const (&rows)[kRows], int base, int chunks,
                                          uint4 (&w)[kUnroll][kRows]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int c = base + u * 32;
      w[u][r] = c < chunks ? load_stream(rows[r] + c) : make_uint4(0, 0, 0, 0);
    }
}

// Grid: one CTA per kWarps * kRows output rows; warp w of CTA b computes rows
// (b * kWarps + w) * kRows + [0, kRows). Lanes stride over the row's 16-byte chunks. The first
// tile of weights is requested before waiting for the previous kernel (launch.cuh): at batch 1
// that overlaps the start of the stream with the small kernels before each projection.
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const GemvParams p) {
  __shared__ uint4 x_s[kGemvMaxInFeatures * 2 / 16];
  allow_downstream_launch();
  const int chunks = static_cast<int>(p.in_features * sizeof(T) / 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  const int64_t last_row = p.out_features - 1;
  const uint4* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r)  // rows past the end re-read the last one; their sums are dropped
    rows[r] = static_cast<const uint4*>(p.weight) + min(row0 + r, last_row) * chunks;
  uint4 w[kUnroll][kRows];
  load_tile<kRows>(rows, lane, chunks, w);
  wait_for_upstream();
  const uint4* x = static_cast<const uint4*>(p.x);
  for (int i = threadIdx.x; i < chunks; i += kThreads) x_s[i] = x[i];
  __syncthreads();
  if (row0 >= p.out_features) return;
  float acc[kRows] = {};
  for (int base = lane;;) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32;
      const uint4 xv = c < chunks ? x_s[c] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += dot_chunk<T>(w[u][r], xv);
    }
    base += 32 * kUnroll;
    if (base >= chunks) break;
    load_tile<kRows>(rows, base, chunks, w);
  }
  bool writer;
  const int first = reduce_scatter<kRows, 32>(acc, lane, writer);
  if (writer && row0 + first < p.out_features) static_cast<T*>(p.out)[row0 + first] = from_float<T>(acc[0]);
}

template <typename T, int kRows>
cudaError_t launch_rows(const GemvParams& p, cudaStream_t stream) {
  const int64_t rows_per_cta = static_cast<int64_t>(kWarps) * kRows;
  const int64_t ctas = (p.out_features + rows_per_cta - 1) / rows_per_cta;
  return launch_kernel(gemv_kernel<T, kRows>, dim3(static_cast<unsigned>(ctas)), dim3(kThreads), 0, stream, p);
}

// Rows per warp: 4 (the most loads in flight) while that still gives two CTAs per SM, fewer for
// narrow outputs so that every SM streams part of the weight.
template <typename T>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  const int64_t want = 2 * static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 132);
  if (p.out_features / (kWarps * 4) >= want) return launch_rows<T, 4>(p, stream);
  if (p.out_features / (kWarps * 2) >= want) return launch_rows<T, 2>(p, stream);
  return launch_rows<T, 1>(p, stream);
}

}  // namespace

cudaError_t gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.out_features == 0) return cudaSuccess;
  const int64_t per_chunk = 8;  // fp16 / bf16 elements in 16 bytes
  if (p.out_features < 0 || p.out_features > 0x7fffffffLL * kWarps || p.in_features <= 0 ||
      p.in_features % per_chunk != 0 || p.in_features > kGemvMaxInFeatures) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace th_transformer
