// Unmerged multi-LoRA for small batches (decode steps, CUDA graphs): for every row r whose adapter
// slot has factors in this projection's table, out[r] += B_s (A_s x[r]), in two launches: the
// shrink (x -> rank values, each row's in_features split over k_splits CTAs that write partial
// sums) and the expand (the partial sums added up, rank values -> outputs, each row's outputs split
// over CTAs). Adapters are found through a device table the host rewrites between steps, so a
// captured graph serves whatever adapters are loaded when it replays.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "src/kernels/cuda/dtype.h"

namespace th_transformer {
namespace cuda {

constexpr int kLoraMaxRank = 256;  // lora/config.py MAX_RANK (fused q/k/v of rank-256 adapters: 768)
constexpr int kLoraMaxTableRank = 3 * kLoraMaxRank;
// Rows one CTA takes. Measured on the H200 (Llama-3-8B projections, 64 rows over 8 adapters, rows
// sorted by slot): 8 rows a CTA, each adapter's factors then read once per CTA, ran 1.8-2x slower
// than one row a CTA, whose 8x more CTAs keep more loads in flight (the factors come from L2 anyway).
constexpr int kLoraGroupRows = 1;

struct LoraApplyParams {
  void* out;                 // [rows, out_features], row stride out_stride; the term is added in place
  const void* x;             // [rows, in_features], row stride x_stride
  const int64_t* row_slots;  // [rows] each row's adapter slot, < 0: none
  // [rows] the rows sorted by slot: CTAs take kLoraGroupRows consecutive ones, so one adapter's rows
  // run side by side and share its factors in L2
  const int64_t* row_order;
  // [4, capacity]: slot ids (-1: empty entry), addresses of A [rank, in] and B [out, rank] (x's
  // dtype, contiguous, the adapter's scale folded into B), ranks
  const int64_t* table;
  int capacity;
  int64_t rows;
  int64_t in_features;
  int64_t out_features;
  int64_t x_stride;
  int64_t out_stride;
  float* partial;     // workspace [rows, k_splits, kLoraMaxTableRank]: the shrink's partial sums
  int k_splits;       // in_features ranges per row in the shrink
  int ctas_per_group;  // output ranges per row group in the expand (the host spreads a small batch over the SMs)
  DType dtype;
};

cudaError_t lora_apply(const LoraApplyParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
