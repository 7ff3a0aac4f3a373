// What the decode attention kernel and its partition merge must agree on.
#pragma once

#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"
#include "src/kernels/cuda/paged_decode_attention.h"

namespace th_transformer {
namespace cuda {

// The keys a sequence's query attends to, [start, len), and the partitions covering them.
struct DecodeRange {
  int start;       // first visible key (sliding window), else 0
  int len;         // keys in the sequence
  int first_part;  // partition holding `start`; partition indices in launches are relative to it
  int num_parts;
};

__device__ __forceinline__ DecodeRange decode_range(int len, int sliding_window) {
  DecodeRange r;
  r.len = len > 0 ? len : 0;
  r.start = (sliding_window > 0 && r.len > sliding_window) ? r.len - sliding_window : 0;
  r.first_part = r.start / kDecodePartitionSize;
  r.num_parts = (r.len + kDecodePartitionSize - 1) / kDecodePartitionSize - r.first_part;
  return r;
}

// Partition merge (paged_decode_reduce.cu): combines the partial results of multi-partition
// sequences into `out`.
cudaError_t launch_paged_decode_reduce(const PagedDecodeParams& params, cudaStream_t stream);

// The warp-private online-softmax kernel (paged_decode_stream.cu): whether it takes this launch
// (MAGA_DECODE_KERNEL=stream, fp16 / bf16 caches of the query's dtype, head_dim 64 / 128 / 256), and
// its launch (with the merge).
bool paged_decode_stream_applies(const PagedDecodeParams& params);
cudaError_t launch_paged_decode_stream(const PagedDecodeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace th_transformer
