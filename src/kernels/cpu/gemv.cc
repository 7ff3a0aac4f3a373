#include "src/kernels/cpu/gemv.h"

namespace th_transformer {

// Decode GEMMs are bandwidth-bound: stream each weight row once (it stays in L1 while every
// activation row uses it) and let the compiler vectorise the dot products. OpenMP splits the
// output rows between cores, so each core streams its own contiguous part of the weight.
void gemv_f32(const float* __restrict x, const float* __restrict w, const float* __restrict bias,
              float* __restrict y, int64_t rows, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const float* w_row = w + o * in;
    const float b = bias ? bias[o] : 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < in; ++i) acc += x_row[i] * w_row[i];
      y[r * out + o] = acc + b;
    }
  }
}

// The same walk over int8 weights: each weight row is widened to fp32 in registers (the compiler
// vectorises the int8 -> fp32 conversion with the dot product) and scaled once at the end.
void gemv_i8(const float* __restrict x, const int8_t* __restrict w, const float* __restrict scale,
             const float* __restrict bias, float* __restrict y, int64_t rows, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const int8_t* w_row = w + o * in;
    const float b = bias ? bias[o] : 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < in; ++i) acc += x_row[i] * static_cast<float>(w_row[i]);
      y[r * out + o] = acc * scale[o] + b;
    }
  }
}

}  // namespace th_transformer
