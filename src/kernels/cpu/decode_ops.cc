#include "src/kernels/cpu/decode_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace th_transformer {

namespace {

// Work below this many values runs on the calling thread: waking the OpenMP team costs more
// than a decode row's norm or rotary.
constexpr int64_t kParallelGrain = 1 << 15;

float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void norm_row(const float* __restrict x, const float* __restrict residual, const float* __restrict weight,
              float* __restrict out, float* __restrict summed, int64_t hidden, float eps) {
  const float* src = x;
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) summed[i] = x[i] + residual[i];
    src = summed;
  }
  const float inv = 1.f / std::sqrt(dot(src, src, hidden) / static_cast<float>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = src[i] * inv * weight[i];
}

void rotate_head(const float* __restrict src, const float* __restrict cos, const float* __restrict sin,
                 float* __restrict dst, int64_t head_dim, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = src[i], x2 = src[i + half];
    dst[i] = x1 * cos[i] - x2 * sin[i];
    dst[i + half] = x2 * cos[i] + x1 * sin[i];
  }
  if (rotary_dim < head_dim) std::memcpy(dst + rotary_dim, src + rotary_dim, (head_dim - rotary_dim) * sizeof(float));
}

void rotary_token(const RotaryKvArgs& a, int64_t t) {
  const float* row = a.qk + t * a.qk_stride;
  const float* cos = a.cos + t * a.table_stride;
  const float* sin = a.sin + t * a.table_stride;
  for (int64_t h = 0; h < a.q_heads; ++h)
    rotate_head(row + h * a.head_dim, cos, sin, a.q_out + (t * a.q_heads + h) * a.head_dim, a.head_dim, a.rotary_dim);
  const int64_t slot = a.slots[t];
  if (slot < 0) return;  // a padding row
  const int64_t kv_width = a.kv_heads * a.head_dim;
  float* k_dst = a.k_cache + slot * kv_width;
  for (int64_t h = 0; h < a.kv_heads; ++h)
    rotate_head(row + (a.q_heads + h) * a.head_dim, cos, sin, k_dst + h * a.head_dim, a.head_dim, a.rotary_dim);
  std::memcpy(a.v_cache + slot * kv_width, a.v + t * a.v_stride, kv_width * sizeof(float));
}

const float* key_row(const DecodeAttentionArgs& a, const int32_t* table, int64_t position, int64_t kv_head,
                     const float* cache) {
  const int64_t block = table[position / a.block_size];
  return cache + ((block * a.block_size + position % a.block_size) * a.kv_heads + kv_head) * a.head_dim;
}

void attend_one(const DecodeAttentionArgs& a, int64_t seq, int64_t head, std::vector<float>& scores) {
  float* out = a.out + (seq * a.heads + head) * a.head_dim;
  const int64_t keys = a.seq_lens[seq];
  const int64_t first = (a.window > 0 && keys > a.window) ? keys - a.window : 0;
  if (keys <= first) {
    std::fill(out, out + a.head_dim, 0.f);
    return;
  }
  const float* q = a.q + seq * a.q_stride + head * a.head_dim;
  const int32_t* table = a.block_tables + seq * a.max_blocks;
  const int64_t kv_head = head / (a.heads / a.kv_heads);
  scores.resize(keys - first);
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t p = first; p < keys; ++p) {
    const float s = dot(q, key_row(a, table, p, kv_head, a.k_cache), a.head_dim) * a.scale;
    scores[p - first] = s;
    best = std::max(best, s);
  }
  float total = 0.f;
  std::fill(out, out + a.head_dim, 0.f);
  for (int64_t p = first; p < keys; ++p) {
    const float w = std::exp(scores[p - first] - best);
    total += w;
    const float* v = key_row(a, table, p, kv_head, a.v_cache);
#pragma omp simd
    for (int64_t i = 0; i < a.head_dim; ++i) out[i] += w * v[i];
  }
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t i = 0; i < a.head_dim; ++i) out[i] *= inv;
}

}  // namespace

void rms_norm_f32(const float* x, int64_t x_stride, const float* residual, int64_t residual_stride,
                  const float* weight, float* out, float* summed, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden >= kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    norm_row(x + r * x_stride, residual ? residual + r * residual_stride : nullptr, weight, out + r * hidden,
             summed ? summed + r * hidden : nullptr, hidden, eps);
  }
}

void silu_and_mul_f32(const float* gate_up, int64_t gate_up_stride, float* out, int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * gate_up_stride;
    const float* up = gate + width;
    float* dst = out + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) dst[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
}

void rotary_write_kv_f32(const RotaryKvArgs& a) {
  const int64_t work = a.tokens * (a.q_heads + a.kv_heads) * a.head_dim;
#pragma omp parallel for schedule(static) if (work >= kParallelGrain)
  for (int64_t t = 0; t < a.tokens; ++t) rotary_token(a, t);
}

void paged_decode_attention_f32(const DecodeAttentionArgs& a) {
  const int64_t tasks = a.seqs * a.heads;
#pragma omp parallel if (tasks > 1)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) attend_one(a, task / a.heads, task % a.heads, scores);
  }
}

}  // namespace th_transformer
