// Thin fp32 GEMM for decode on CPU: y[b, :] = W x[b, :] for a few rows b.
#pragma once

#include <cstdint>

namespace th_transformer {

// Largest number of activation rows handled in one pass over the weight.
constexpr int64_t kMaxGemvRows = 16;

// x: [rows, in], w: [out, in] row-major, bias: [out] or nullptr, y: [rows, out].
// Each output is one dot product over `in` in a fixed order, whatever `rows` is, so a
// sequence gets the same result alone or batched (batch-invariant numerics).
void gemv_f32(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in,
              int64_t out);

// Weight-only int8 (WEIGHT_TYPE=INT8): w is int8 [out, in] with one fp32 scale per output row, so
// y[b, o] = scale[o] * (x[b, :] . w[o, :]) (+ bias[o]). A quarter of fp32's bytes streamed per step.
void gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias, float* y, int64_t rows,
             int64_t in, int64_t out);

}  // namespace th_transformer
