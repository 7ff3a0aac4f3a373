// Scatter of the step's keys and values into the paged KV cache.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

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

}  // namespace cuda
}  // namespace th_transformer
