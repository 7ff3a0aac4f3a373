// NeoX-style rotary embedding (rotate halves) on the first rotary_dim channels of each head,
// for up to two tensors (queries and keys) in one launch. A target may instead go to a paged KV
// cache by slot, and a third, unrotated target (values) may be copied there in the same launch:
// a decode step's rotary and cache write as one kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

struct RotaryTarget {
  void* out;        // [tokens, heads, head_dim]; may equal `in` (in place)
  const void* in;   // last dim contiguous
  int num_heads;    // 0: unused target
  int64_t in_token_stride, in_head_stride;    // in elements
  int64_t out_token_stride, out_head_stride;
  // Non-null: out is ignored and token t's heads go to cache row slot_mapping[t] (a contiguous
  // [slots, num_heads, head_dim] cache; negative slots are skipped, like write_kv_cache).
  void* cache = nullptr;
};

struct RotaryParams {
  // 0 and 1 are rotated (queries, keys); 2 is copied as is (values into their cache).
  RotaryTarget targets[3];
  const int64_t* slot_mapping = nullptr;  // [tokens]; required when a target has a cache
  const int64_t* positions;  // [tokens] rows of cos/sin to use; null: token t uses row t
  const float* cos;          // [rows, cos_sin_stride] fp32, first rotary_dim / 2 columns used
  const float* sin;
  int64_t cos_sin_stride;
  int64_t num_tokens;
  int head_dim;
  int rotary_dim;            // even, <= head_dim; channels past it are copied (out-of-place) or left
  DType dtype;
};

cudaError_t apply_rotary(const RotaryParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
