#include "src/kernels/cpu/gemv.h"

namespace th_transformer {

namespace {

// Decode GEMMs are bandwidth-bound: stream each weight row once (it stays in L1 while every
// activation row uses it) and let the compiler vectorise the dot products (for int8 weights, with
// the int8 -> fp32 widening in registers). OpenMP splits the output rows between cores, so each
// core streams its own contiguous part of the weight. scale: one per output row, or nullptr.
template <typename W>
void gemv(const float* __restrict x, const W* __restrict w, const float* __restrict scale,
          const float* __restrict bias, float* __restrict y, int64_t rows, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const W* w_row = w + o * in;
    const float b = bias ? bias[o] : 0.f;
    const float s = scale ? scale[o] : 1.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < in; ++i) acc += x_row[i] * static_cast<float>(w_row[i]);
      y[r * out + o] = acc * s + b;
    }
  }
}

}  // namespace

void gemv_f32(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in, int64_t out) {
  gemv(x, w, nullptr, bias, y, rows, in, out);
}

void gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias, float* y, int64_t rows,
             int64_t in, int64_t out) {
  gemv(x, w, scale, bias, y, rows, in, out);
}

}  // namespace th_transformer
