// Scatter of the step's keys and values into the paged KV cache.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

struct KVCacheWriteParams {
  const void* k;  // [tokens, kv_heads, head_dim], last dim contiguous, strides below
  const void* v;
  void* k_cache;  // [blocks, block_size, kv_heads, head_dim], contiguous
  void* v_cache;
  const int64_t* slot_mapping;  // [tokens]: block_id * block_size + offset; negative = skip (padding)
  int64_t num_tokens;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t k_token_stride, k_head_stride;  // in elements
  int64_t v_token_stride, v_head_stride;
  int elem_size;  // bytes per element: the copy does not care about the dtype, only its width
};

cudaError_t write_kv_cache(const KVCacheWriteParams& params, cudaStream_t stream);

// The same scatter into a quantized cache (INT8_KV_CACHE / KV_CACHE_DTYPE=fp8): each token's row of
// each KV head is stored as round(x / s) in int8 (s = absmax / 127) or x / s in e4m3 (s = absmax /
// 448), with s (1 for an all-zero row) in the scale tensor [blocks, block_size, kv_heads].
struct KVCacheQuantizedWriteParams {
  KVCacheWriteParams rows;  // k, v, the data caches, slots, shapes and strides; elem_size unused
  float* k_scale;
  float* v_scale;
  DType dtype;      // of k and v: fp32, fp16 or bf16
  bool fp8;         // e4m3 values, else int8
};

constexpr int64_t kQuantizedWriteMaxHeadDim = 256;

cudaError_t write_kv_cache_quantized(const KVCacheQuantizedWriteParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
