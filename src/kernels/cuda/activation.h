// Gated activations on a fused [gate | up] projection: out = act(gate) * up.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

enum class GateActivation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

struct GatedActivationParams {
  void* out;          // [rows, width] contiguous
  const void* input;  // [rows, 2 * width], last dim contiguous; gate first, then up
  int64_t rows;
  int64_t width;
  int64_t input_row_stride;  // in elements
  GateActivation activation;
  DType dtype;
};

cudaError_t gated_activation(const GatedActivationParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
