// Thin GEMM for decode: out[r, :] = x[r, :] @ weight.T (+ bias) for a few rows r.
//
// A decode step at a small batch reads every weight once and does little else with it, so the step
// is as fast as the weights stream from HBM. cuBLAS picks split-K kernels for these shapes that
// reach 45-75 % of the copy bandwidth on the thin q/k/v and output projections (measured on the
// H100 and H200, benchmark/gpu_profile.py); this kernel streams each weight row with 16-byte loads,
// several in flight per lane, one warp per output feature.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

constexpr int kGemvMaxRows = 4;

struct GemvParams {
  void* out;           // [rows, n] contiguous
  const void* x;       // [rows, k] contiguous
  const void* weight;  // [n, k] contiguous
  const void* bias;    // [n] or null
  int rows;            // 1..kGemvMaxRows
  int64_t n, k;        // k: a multiple of 8; all pointers 16-byte aligned
  DType dtype;         // fp16 or bf16
};

cudaError_t gemv(const GemvParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
