// Per-row FP8 (e4m3) quantization of activations for WEIGHT_TYPE=FP8: one kernel where torch takes
// eight (abs, max, divide, select, divide, clamp, cast), which at batch-1 decode is eight graph
// nodes per projection.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

struct QuantizeRowsParams {
  const void* x;   // [rows, cols], rows `row_stride` elements apart, dtype
  void* out;       // [rows, cols] e4m3, contiguous
  float* scale;    // [rows]: absmax / 448, or 1 for an all-zero row; out = x / scale, clamped to +-448
  int64_t rows, cols, row_stride;
  DType dtype;     // fp32, fp16 or bf16
};

cudaError_t quantize_rows_fp8(const QuantizeRowsParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
