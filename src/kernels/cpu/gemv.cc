#include "src/kernels/cpu/gemv.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <immintrin.h>

namespace th_transformer {

namespace {

// Independent partial sums per dot product. One vector accumulator makes every FMA wait for the
// previous one (4-5 cycles each), which held the int8 kernel (and fp32 on data in cache) to a
// third of the memory bandwidth; 64 floats are 4 AVX-512 or 8 AVX2 registers, enough FMAs in
// flight on either vendor's cores, and the compiler vectorises the fixed-width inner loop for
// whatever -march=native offers.
constexpr int64_t kLanes = 64;

template <typename W>
float dot(const float* __restrict x, const W* __restrict w, int64_t in) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j] * static_cast<float>(w[i + j]);
  }
  float tail = 0.f;
  for (; i < in; ++i) tail += x[i] * static_cast<float>(w[i]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return sum + tail;
}

// Decode GEMMs are bandwidth-bound: stream each weight row once (it stays in L1 while every
// activation row uses it), widening int8 weights to fp32 in registers. OpenMP splits the output
// rows between cores, so each core streams its own contiguous part of the weight.
// scale: one per output row, or nullptr.
template <typename W>
void gemv(const float* __restrict x, const W* __restrict w, const float* __restrict scale,
          const float* __restrict bias, float* __restrict y, int64_t rows, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const W* w_row = w + o * in;
    const float b = bias ? bias[o] : 0.f;
    const float s = scale ? scale[o] : 1.f;
    for (int64_t r = 0; r < rows; ++r) y[r * out + o] = dot(x + r * in, w_row, in) * s + b;
  }
}

// Integer partial sums are turned into float every kIntBlock elements: a 32-bit lane then holds at
// most kIntBlock / 16 pair sums of under 2^23 each, far from overflowing.
constexpr int64_t kIntBlock = 2048;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 32 elements per step: the weight's bytes widened to int16, then one fused multiply-add of pairs.
int32_t dot_block(const int16_t* x, const int8_t* w, int64_t n, int64_t& done) {
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    acc0 = _mm512_dpwssd_epi32(acc0, _mm512_loadu_si512(x + j), _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                                                    reinterpret_cast<const __m256i*>(w + j))));
    acc1 = _mm512_dpwssd_epi32(acc1, _mm512_loadu_si512(x + j + 32), _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                                                         reinterpret_cast<const __m256i*>(w + j + 32))));
  }
  done = j;
  return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
}
#elif defined(__AVX2__)
int32_t dot_block(const int16_t* x, const int8_t* w, int64_t n, int64_t& done) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16)));
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), w0));
    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16)), w1));
  }
  done = j;
  const __m256i sum8 = _mm256_add_epi32(acc0, acc1);
  __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4e));
  sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xb1));
  return _mm_cvtsi128_si32(sum4);
}
#else
int32_t dot_block(const int16_t*, const int8_t*, int64_t, int64_t& done) {
  done = 0;  // no vector path for this CPU: the scalar loop below takes the whole block
  return 0;
}
#endif

float dot_i16_i8(const int16_t* __restrict x, const int8_t* __restrict w, int64_t in) {
  float sum = 0.f;
  for (int64_t i = 0; i < in; i += kIntBlock) {
    const int64_t n = std::min(kIntBlock, in - i);
    int64_t done = 0;
    int32_t acc = dot_block(x + i, w + i, n, done);
    for (int64_t j = done; j < n; ++j) acc += static_cast<int32_t>(x[i + j]) * static_cast<int32_t>(w[i + j]);
    sum += static_cast<float>(acc);
  }
  return sum;
}

// x -> round(x / s) in [-32767, 32767], returning s = absmax / 32767 (1 for an all-zero row).
float quantize_row_i16(const float* __restrict x, int64_t in, int16_t* __restrict q) {
  float absmax = 0.f;
  for (int64_t i = 0; i < in; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  const float s = absmax > 0.f ? absmax / 32767.f : 1.f;
  const float inv = 1.f / s;
  for (int64_t i = 0; i < in; ++i) q[i] = static_cast<int16_t>(std::lrintf(x[i] * inv));
  return s;
}

}  // namespace

void gemv_f32(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in, int64_t out) {
  gemv(x, w, nullptr, bias, y, rows, in, out);
}

void gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias, float* y, int64_t rows,
             int64_t in, int64_t out) {
  // Each activation row enters as int16 with its own scale, so the products are integer
  // multiply-adds (AVX2's vpmaddwd, AVX-512 VNNI's vpdpwssd) on the weight's bytes widened once,
  // instead of widening every weight to fp32: the float path was bound by its conversions, not by
  // memory. Rounding x to 16 bits costs under 2^-16 of the row's largest value per element.
  std::vector<int16_t> xq(static_cast<size_t>(rows * in));
  std::vector<float> x_scale(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) x_scale[r] = quantize_row_i16(x + r * in, in, xq.data() + r * in);
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const int8_t* w_row = w + o * in;
    const float b = bias ? bias[o] : 0.f;
    for (int64_t r = 0; r < rows; ++r)
      y[r * out + o] = dot_i16_i8(xq.data() + r * in, w_row, in) * x_scale[r] * scale[o] + b;
  }
}

}  // namespace th_transformer
