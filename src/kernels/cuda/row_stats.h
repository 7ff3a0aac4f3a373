// Per row of fp32 logits, in one pass: the index of the largest value (the first on ties, as
// torch.argmax) and logsumexp. Greedy sampling needs exactly these (the token and its log-prob);
// torch's reductions give one row a single small CTA each (about 27 us per reduction for a 128k
// vocabulary on the H100, three of them a step).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace th_transformer {
namespace cuda {

struct RowStatsParams {
  const float* logits;  // [rows, vocab], rows `row_stride` apart, 16-byte aligned rows when vocab % 4 == 0
  int64_t* argmax;      // [rows]
  float* logsumexp;     // [rows]
  int64_t rows, vocab, row_stride;
};

cudaError_t row_argmax_logsumexp(const RowStatsParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
