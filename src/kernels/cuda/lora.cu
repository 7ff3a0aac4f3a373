#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"
#include "src/kernels/cuda/lora.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <typename T>
constexpr int kPerVector = 16 / static_cast<int>(sizeof(T));  // elements in one 16-byte load

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
__device__ __forceinline__ float dot_vectors(const uint4& a, const uint4& b) {
  const T* av = reinterpret_cast<const T*>(&a);
  const T* bv = reinterpret_cast<const T*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kPerVector<T>; ++i) acc = fmaf(to_float(av[i]), to_float(bv[i]), acc);
  return acc;
}

constexpr int kShrinkRows = 4;  // rank rows a warp reads at once: their loads are in flight together

// acc[i] = x . a[i * row_stride] over n elements for the warp's kShrinkRows rank rows (rows >= count
// are skipped), every lane ending with the sums; 16-byte loads when x and A allow.
template <typename T>
__device__ __forceinline__ void warp_dot_rows(const T* x, const T* a, int64_t row_stride, int count, int64_t n,
                                              bool vectors, int lane, float (&acc)[kShrinkRows]) {
#pragma unroll
  for (int i = 0; i < kShrinkRows; ++i) acc[i] = 0.f;
  if (vectors) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int64_t chunks = n / kPerVector<T>;
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint4 xc = xv[c];
      uint4 ac[kShrinkRows];
#pragma unroll
      for (int i = 0; i < kShrinkRows; ++i)
        ac[i] = i < count ? __ldg(reinterpret_cast<const uint4*>(a + i * row_stride) + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int i = 0; i < kShrinkRows; ++i) acc[i] += dot_vectors<T>(ac[i], xc);
    }
  } else {
    for (int64_t k = lane; k < n; k += 32) {
      const float xk = to_float(x[k]);
#pragma unroll
      for (int i = 0; i < kShrinkRows; ++i)
        if (i < count) acc[i] = fmaf(to_float(a[i * row_stride + k]), xk, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kShrinkRows; ++i) acc[i] = warp_sum(acc[i]);
}

// b_row . t over rank elements (t in shared memory, fp32).
template <typename T>
__device__ __forceinline__ float expand_one(const T* b_row, const float* t, int rank, bool vectors) {
  float acc = 0.f;
  if (vectors) {
    const uint4* bv = reinterpret_cast<const uint4*>(b_row);
    for (int c = 0; c < rank / kPerVector<T>; ++c) {
      const uint4 chunk = __ldg(bv + c);
      const T* values = reinterpret_cast<const T*>(&chunk);
#pragma unroll
      for (int i = 0; i < kPerVector<T>; ++i) acc = fmaf(to_float(values[i]), t[c * kPerVector<T> + i], acc);
    }
  } else {
    for (int j = 0; j < rank; ++j) acc = fmaf(to_float(b_row[j]), t[j], acc);
  }
  return acc;
}

// The row's adapter in the table: its entry, or -1 (no adapter, or not one of this projection's).
__device__ __forceinline__ int find_entry(const LoraApplyParams& p, int64_t row) {
  const int64_t slot = p.row_slots[row];
  if (slot < 0) return -1;
  for (int i = 0; i < p.capacity; ++i)
    if (p.table[i] == slot) return p.table[3 * p.capacity + i] > 0 && p.table[3 * p.capacity + i] <= kLoraMaxTableRank ? i : -1;
  return -1;
}

__device__ __forceinline__ float* partial_row(const LoraApplyParams& p, int64_t row, int split) {
  return p.partial + (row * p.k_splits + split) * kLoraMaxTableRank;
}

// Row i of CTA group g (the sorted order), or -1 past the end.
__device__ __forceinline__ int64_t group_row(const LoraApplyParams& p, int i) {
  const int64_t position = static_cast<int64_t>(blockIdx.x) * kLoraGroupRows + i;
  return position < p.rows ? p.row_order[position] : -1;
}

// Grid (row groups, k_splits). CTA (g, s) takes the s-th range of in_features (a whole number of
// 16-byte chunks) and, for each row of group g in turn, writes for each rank j of the row's adapter
// (warp w: kShrinkRows rows from j = w * kShrinkRows on, every kWarps * kShrinkRows) the partial sum
// of x[r] . A[j] over that range.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const LoraApplyParams p) {
  allow_downstream_launch();
  const int64_t per_split = (p.in_features + p.k_splits - 1) / p.k_splits;
  const int64_t chunk = (per_split + kPerVector<T> - 1) / kPerVector<T> * kPerVector<T>;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t n = max(int64_t{0}, min(p.in_features, begin + chunk) - begin);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wait_for_upstream();  // every CTA: the kernel's completion implies its predecessor's (launch.cuh)
  for (int i = 0; i < kLoraGroupRows; ++i) {
    const int64_t row = group_row(p, i);
    const int entry = row < 0 ? -1 : find_entry(p, row);
    if (entry < 0) continue;
    const T* a = reinterpret_cast<const T*>(p.table[p.capacity + entry]);
    const int rank = static_cast<int>(p.table[3 * p.capacity + entry]);
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride + begin;
    const bool vectors = p.in_features % kPerVector<T> == 0 && aligned16(x) && aligned16(a);
    float* out = partial_row(p, row, blockIdx.y);
    for (int j = warp * kShrinkRows; j < rank; j += kWarps * kShrinkRows) {
      float sums[kShrinkRows];
      warp_dot_rows<T>(x, a + static_cast<int64_t>(j) * p.in_features + begin, p.in_features,
                       min(kShrinkRows, rank - j), n, vectors, lane, sums);
      if (lane == 0)
#pragma unroll
        for (int k = 0; k < kShrinkRows; ++k)
          if (j + k < rank) out[j + k] = sums[k];
    }
  }
}

// Grid (row groups, ctas_per_group). A CTA adds up its rows' partial sums into their rank values
// t, then out[r][o] += B_r[o] . t_r for its share of outputs and each of its rows (rows of one
// adapter re-read B_r[o] from L1), rounding once into out's dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(const LoraApplyParams p) {
  __shared__ float t[kLoraGroupRows][kLoraMaxTableRank];
  __shared__ const T* b[kLoraGroupRows];
  __shared__ int ranks[kLoraGroupRows];
  __shared__ int64_t rows[kLoraGroupRows];
  allow_downstream_launch();
  if (threadIdx.x < kLoraGroupRows) {  // step metadata and the table: written by copies, readable now
    const int64_t row = group_row(p, threadIdx.x);
    const int entry = row < 0 ? -1 : find_entry(p, row);
    rows[threadIdx.x] = row;
    ranks[threadIdx.x] = entry < 0 ? 0 : static_cast<int>(p.table[3 * p.capacity + entry]);
    b[threadIdx.x] = entry < 0 ? nullptr : reinterpret_cast<const T*>(p.table[2 * p.capacity + entry]);
  }
  __syncthreads();
  const int64_t share = (p.out_features + p.ctas_per_group - 1) / p.ctas_per_group;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * share;
  const int64_t end = min(p.out_features, begin + share);
  wait_for_upstream();
  bool any = false;
  for (int i = 0; i < kLoraGroupRows; ++i) {
    any = any || ranks[i] > 0;
    for (int j = threadIdx.x; j < ranks[i]; j += kThreads) {
      float sum = 0.f;
      for (int split = 0; split < p.k_splits; ++split) sum += partial_row(p, rows[i], split)[j];
      t[i][j] = sum;
    }
  }
  if (!any) return;
  __syncthreads();
  for (int i = 0; i < kLoraGroupRows; ++i) {
    const int rank = ranks[i];
    if (rank == 0) continue;
    const bool vectors = rank % kPerVector<T> == 0 && aligned16(b[i]);
    T* out = static_cast<T*>(p.out) + rows[i] * p.out_stride;
    for (int64_t o = begin + threadIdx.x; o < end; o += kThreads) {
      const float delta = expand_one<T>(b[i] + o * rank, t[i], rank, vectors);
      out[o] = from_float<T>(to_float(out[o]) + delta);
    }
  }
}

}  // namespace

cudaError_t lora_apply(const LoraApplyParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.out_features == 0) return cudaSuccess;
  if (p.rows < 0 || p.rows > 0x7fffffffLL || p.in_features <= 0 || p.out_features < 0 || p.capacity <= 0 ||
      p.ctas_per_group <= 0 || p.ctas_per_group > 65535 || p.k_splits <= 0 || p.k_splits > 65535 ||
      p.x_stride < p.in_features || p.out_stride < p.out_features || p.table == nullptr || p.row_slots == nullptr ||
      p.partial == nullptr || p.row_order == nullptr) {
    return cudaErrorInvalidValue;
  }
  const unsigned groups = static_cast<unsigned>((p.rows + kLoraGroupRows - 1) / kLoraGroupRows);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t shrink =
        launch_kernel(lora_shrink_kernel<T>, dim3(groups, static_cast<unsigned>(p.k_splits)), dim3(kThreads), 0, stream, p);
    if (shrink != cudaSuccess) return shrink;
    return launch_kernel(lora_expand_kernel<T>, dim3(groups, static_cast<unsigned>(p.ctas_per_group)), dim3(kThreads),
                         0, stream, p);
  });
}

}  // namespace cuda
}  // namespace th_transformer
