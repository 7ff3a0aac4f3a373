// Paged attention for decode: one query token per sequence against its cached keys and values.
//
// Flash-decoding: each sequence's context is cut into partitions of kDecodePartitionSize tokens.
// `num_splits` CTAs share a sequence's partitions (CTA z takes partitions z, z + num_splits, ...
// and merges them as it goes), so a long context at a small batch still fills the GPU while a big
// batch launches no CTA without work (a CUDA graph's launch shape is fixed for the longest context);
// a second kernel merges the splits' partial softmax results. A sequence whose partitions all fell
// to one CTA is written straight to `out` and the merge skips it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

// 64: at batch 1 the CTAs of one sequence are few and each is bound by memory latency, so
// shorter partitions (more CTAs, fewer dependent load rounds each) run faster: on the H100, 256
// beat 512, and in a Llama-3-8B decode step at 256 tokens of context a 256-token partition (8
// CTAs for 8 KV heads) took 26 us a layer. The macro exists only for such measurements; bindings
// and kernels must agree.
#ifndef MAGA_DECODE_PARTITION_SIZE
#define MAGA_DECODE_PARTITION_SIZE 64
#endif
constexpr int kDecodePartitionSize = MAGA_DECODE_PARTITION_SIZE;

struct PagedDecodeParams {
  void* out;                // [seqs, heads, head_dim], contiguous
  const void* q;            // [seqs, heads, head_dim], last dim contiguous, strides below
  const void* k_cache;      // [blocks, block_size, kv_heads, head_dim], contiguous, cache_dtype
  const void* v_cache;
  // Quantized caches (cache_dtype int8 / e4m3, with fp16 / bf16 queries): one fp32 scale per token
  // and KV head, [blocks, block_size, kv_heads]; a key is its stored values times its scale.
  const float* k_scale;
  const float* v_scale;
  const int32_t* block_tables;  // [seqs, max_blocks_per_seq]; any block ids, in any order
  const int32_t* seq_lens;      // [seqs]: keys per sequence (cached tokens + this step's token)
  // Workspace for the splits' partial results (may be null when num_splits == 1):
  float* partial_out;       // [seqs, heads, num_splits, head_dim]
  float* partial_max;       // [seqs, heads, num_splits]
  float* partial_sum;       // [seqs, heads, num_splits]
  int num_seqs, num_heads, num_kv_heads, head_dim;
  int block_size, max_blocks_per_seq;
  int num_splits;           // CTAs per (sequence, query-head group); any count >= 1 is correct
  int64_t q_seq_stride, q_head_stride;  // in elements
  float scale;
  int sliding_window;       // 0: none; else a query sees only the last `sliding_window` keys
  DType dtype;              // of q and out
  DType cache_dtype;        // dtype, or kInt8 / kFloat8E4M3 (quantized, with scales)
};

// Partitions a sequence of `seq_len` keys needs (a sliding window skips the ones before it).
inline int decode_partitions(int seq_len, int sliding_window) {
  const int start = (sliding_window > 0 && seq_len > sliding_window) ? seq_len - sliding_window : 0;
  const int end = (seq_len + kDecodePartitionSize - 1) / kDecodePartitionSize;
  return end - start / kDecodePartitionSize;
}

bool paged_decode_supports_head_dim(int head_dim);

cudaError_t paged_decode_attention(const PagedDecodeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
