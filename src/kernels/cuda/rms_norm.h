// RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

struct RmsNormParams {
  void* out;                // [rows, hidden] contiguous: weight * normalize(x + residual)
  void* residual_out;       // [rows, hidden] contiguous: x + residual (null when residual is null)
  const void* x;            // [rows, hidden], last dim contiguous
  const void* residual;     // [rows, hidden] or null (plain RMSNorm)
  const void* weight;       // [hidden], same dtype as x
  int64_t rows;
  int hidden;
  int64_t x_row_stride, residual_row_stride;  // in elements
  float eps;
  DType dtype;
};

// Outputs may alias the inputs (in-place use): each element is read before it is overwritten,
// by the thread that overwrites it.
cudaError_t rms_norm(const RmsNormParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
