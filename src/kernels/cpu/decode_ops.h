// The small per-layer ops of a CPU decode step in fp32, one call each instead of the 5-15 torch ops
// their references take (at batch 1 on a small model those ops cost as much as the GEMVs).
#pragma once

#include <cstdint>

namespace th_transformer {

// Rows of `hidden` values: summed = x + residual (when residual != nullptr; written to `summed`),
// out = summed * rsqrt(mean(summed^2) + eps) * weight, as torch's fp32 rms_norm computes it.
// x, residual, out and summed are row-major with row strides x_stride / residual_stride / hidden.
void rms_norm_f32(const float* x, int64_t x_stride, const float* residual, int64_t residual_stride,
                  const float* weight, float* out, float* summed, int64_t rows, int64_t hidden, float eps);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i]: rows of [gate | up] with row stride
// gate_up_stride, out contiguous [rows, width].
void silu_and_mul_f32(const float* gate_up, int64_t gate_up_stride, float* out, int64_t rows, int64_t width);

struct RotaryKvArgs {
  const float* qk;      // [tokens, q_heads + kv_heads, head_dim], row stride qk_stride, heads contiguous
  int64_t qk_stride;
  const float* v;       // [tokens, kv_heads, head_dim], row stride v_stride
  int64_t v_stride;
  const float* cos;     // [tokens, >= rotary_dim / 2], row stride table_stride (sin the same)
  const float* sin;
  int64_t table_stride;
  const int64_t* slots;  // [tokens]: block * block_size + offset; negative slots are skipped
  float* q_out;         // [tokens, q_heads, head_dim] contiguous
  float* k_cache;       // [slots, kv_heads, head_dim] contiguous
  float* v_cache;
  int64_t tokens, q_heads, kv_heads, head_dim, rotary_dim;
};

// NeoX rotary (rotate halves of the first rotary_dim channels) of the queries and keys; the rotated
// queries go to q_out, the rotated keys and the values to the caches at their slots.
void rotary_write_kv_f32(const RotaryKvArgs& a);

struct DecodeAttentionArgs {
  const float* q;  // [seqs, heads, head_dim], row stride q_stride, heads contiguous
  int64_t q_stride;
  const float* k_cache;  // [blocks, block_size, kv_heads, head_dim] contiguous
  const float* v_cache;
  const int32_t* block_tables;  // [seqs, max_blocks]
  int64_t max_blocks;
  const int32_t* seq_lens;  // [seqs]: keys of each sequence, this step's included
  float* out;               // [seqs, heads, head_dim] contiguous
  int64_t seqs, heads, kv_heads, head_dim, block_size;
  float scale;
  int64_t window;  // keys within the last `window` positions only; 0 = all
};

// One query per sequence over its paged keys, read where they lie (no gathered copy): exact
// softmax in two passes over the keys. Each (sequence, head) is one task, so a sequence gets the
// same result alone or batched.
void paged_decode_attention_f32(const DecodeAttentionArgs& a);

}  // namespace th_transformer
