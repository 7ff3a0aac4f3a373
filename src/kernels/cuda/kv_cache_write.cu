#include "src/kernels/cuda/kv_cache_write.h"

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// One CTA per token. Keys and values are a pure copy, so they move in the widest word (up to 16
// bytes) that every row, stride and base pointer allows, whatever the element type.
template <typename Word>
__global__ void __launch_bounds__(kThreads) write_kv_cache_kernel(const KVCacheWriteParams p) {
  allow_downstream_launch();
  wait_for_upstream();
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;  // padded token (e.g. a CUDA-graph batch larger than the real one)
  const int64_t words_per_head = p.head_dim * p.elem_size / sizeof(Word);
  const int64_t words = p.kv_heads * words_per_head;
  const int64_t elems_per_word = sizeof(Word) / p.elem_size;
  const Word* k = static_cast<const Word*>(p.k);
  const Word* v = static_cast<const Word*>(p.v);
  Word* k_cache = static_cast<Word*>(p.k_cache) + slot * words;
  Word* v_cache = static_cast<Word*>(p.v_cache) + slot * words;
  const int64_t k_row = token * p.k_token_stride / elems_per_word;
  const int64_t v_row = token * p.v_token_stride / elems_per_word;
  for (int64_t i = threadIdx.x; i < words; i += kThreads) {
    const int64_t head = i / words_per_head, w = i % words_per_head;
    k_cache[i] = k[k_row + head * p.k_head_stride / elems_per_word + w];
    v_cache[i] = v[v_row + head * p.v_head_stride / elems_per_word + w];
  }
}

bool fits_word(const KVCacheWriteParams& p, int64_t word) {
  const int64_t elems = word / p.elem_size;
  if (word < p.elem_size || word % p.elem_size) return false;
  const bool strides = p.head_dim % elems == 0 && p.k_token_stride % elems == 0 && p.k_head_stride % elems == 0 &&
                       p.v_token_stride % elems == 0 && p.v_head_stride % elems == 0;
  const bool pointers = reinterpret_cast<uintptr_t>(p.k) % word == 0 && reinterpret_cast<uintptr_t>(p.v) % word == 0 &&
                        reinterpret_cast<uintptr_t>(p.k_cache) % word == 0 &&
                        reinterpret_cast<uintptr_t>(p.v_cache) % word == 0;
  return strides && pointers;
}

template <typename Word>
cudaError_t launch(const KVCacheWriteParams& p, cudaStream_t stream) {
  return launch_kernel(write_kv_cache_kernel<Word>, dim3(static_cast<unsigned>(p.num_tokens)), dim3(kThreads), 0,
                       stream, p);
}

// Quantized write: one CTA per token, one warp per (K or V, head) row at a time; each lane holds
// head_dim / 32 elements (at most 8), the warp reduces their absmax, and lane 0 writes the scale.
// The division and round-to-nearest-even match ops/kv_cache.py's torch reference bit for bit.
constexpr int kMaxPerLane = static_cast<int>(kQuantizedWriteMaxHeadDim / 32);

template <typename T>
__device__ void quantize_row(const T* x, int head_dim, bool fp8, void* out, float* scale_out) {
  const int lane = threadIdx.x % 32;
  float v[kMaxPerLane];
  float absmax = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int d = lane + j * 32;
    v[j] = d < head_dim ? to_float(x[d]) : 0.f;
    absmax = fmaxf(absmax, fabsf(v[j]));
  }
  absmax = warp_max(absmax);
  // times the reciprocal, as torch computes a tensor divided by a Python number on CUDA
  float scale = absmax * (fp8 ? 1.f / 448.f : 1.f / 127.f);
  if (!(scale > 0.f)) scale = 1.f;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int d = lane + j * 32;
    if (d >= head_dim) break;
    const float scaled = v[j] / scale;
    if (fp8) {
      static_cast<__nv_fp8_e4m3*>(out)[d] = __nv_fp8_e4m3(fminf(fmaxf(scaled, -448.f), 448.f));
    } else {
      static_cast<int8_t*>(out)[d] = static_cast<int8_t>(max(-127, min(127, __float2int_rn(scaled))));
    }
  }
  if (lane == 0) *scale_out = scale;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) write_kv_cache_quantized_kernel(const KVCacheQuantizedWriteParams p) {
  allow_downstream_launch();
  wait_for_upstream();
  const KVCacheWriteParams& r = p.rows;
  const int64_t token = blockIdx.x;
  const int64_t slot = r.slot_mapping[token];
  if (slot < 0) return;  // padded token
  const int warp = threadIdx.x / 32;
  for (int row = warp; row < 2 * r.kv_heads; row += kThreads / 32) {
    const bool is_v = row >= r.kv_heads;
    const int64_t head = is_v ? row - r.kv_heads : row;
    const T* x = static_cast<const T*>(is_v ? r.v : r.k) + token * (is_v ? r.v_token_stride : r.k_token_stride) +
                 head * (is_v ? r.v_head_stride : r.k_head_stride);
    const int64_t cell = slot * r.kv_heads + head;
    char* cache = static_cast<char*>(is_v ? r.v_cache : r.k_cache) + cell * r.head_dim;
    quantize_row<T>(x, static_cast<int>(r.head_dim), p.fp8, cache, (is_v ? p.v_scale : p.k_scale) + cell);
  }
}

}  // namespace

cudaError_t write_kv_cache_quantized(const KVCacheQuantizedWriteParams& p, cudaStream_t stream) {
  const KVCacheWriteParams& r = p.rows;
  if (r.num_tokens == 0) return cudaSuccess;
  if (r.num_tokens < 0 || r.num_tokens > 0x7fffffff || r.head_dim <= 0 || r.head_dim > kQuantizedWriteMaxHeadDim ||
      r.kv_heads <= 0 || !p.k_scale || !p.v_scale) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel(write_kv_cache_quantized_kernel<decltype(tag)>, dim3(static_cast<unsigned>(r.num_tokens)),
                         dim3(kThreads), 0, stream, p);
  });
}

cudaError_t write_kv_cache(const KVCacheWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff || p.elem_size <= 0) return cudaErrorInvalidValue;
  if (fits_word(p, 16)) return launch<uint4>(p, stream);
  if (fits_word(p, 8)) return launch<uint2>(p, stream);
  if (fits_word(p, 4)) return launch<uint32_t>(p, stream);
  if (fits_word(p, 2)) return launch<uint16_t>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace th_transformer
