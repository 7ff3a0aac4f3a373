// out = x @ weight.T for one row x (batch-1 decode projections; fp16 / bf16 weights, or int8 / e4m3
// with a scale per output row): bandwidth-bound, the weight streamed
// once. cuBLAS reaches 80-88 % of the copy bandwidth on these shapes in CUDA graphs and adds a split-K
// reduction kernel for the long-K ones; this kernel keeps many 16-byte weight loads in flight per
// lane and sums each output row inside one warp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

// What the weight holds: x's dtype, or one byte per weight with a scale per output row
// (WEIGHT_TYPE=INT8: int8; WEIGHT_TYPE=FP8: float8 e4m3, widened in the kernel, x stays 16-bit).
enum class GemvWeight : int { kSameAsX = 0, kInt8 = 1, kE4M3 = 2 };

struct GemvParams {
  void* out;           // [out_features], contiguous
  const void* x;       // [in_features], contiguous, 16-byte aligned
  const void* weight;  // [out_features, in_features], contiguous, 16-byte aligned: see `weight_kind`
  int64_t out_features;
  int64_t in_features;  // a multiple of 16 bytes' worth of weights, at most kGemvMaxInFeatures
  int num_sms;          // multiprocessors: rows per warp are chosen to keep them all busy
  DType dtype;          // of x and out: fp16 or bf16
  GemvWeight weight_kind;  // a byte kind: out[o] = scale[o] * (x . weight[o])
  const float* scale;      // [out_features] fp32, with a byte kind of weight
};

constexpr int64_t kGemvMaxInFeatures = 16384;  // x is staged in shared memory (32 KB at most)

cudaError_t gemv(const GemvParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
