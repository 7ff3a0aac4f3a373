// Merge of flash-decoding splits. Each split stored its output normalised by its own softmax sum,
// plus that sum and its max logit; rescaling every split to the global max gives
// out = sum_p w_p o_p / sum_p w_p with w_p = sum_p * exp(max_p - max).
#include "src/kernels/cuda/paged_decode_common.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads) paged_decode_reduce_kernel(const PagedDecodeParams p) {
  extern __shared__ float weights[];  // [num_splits]
  __shared__ float scratch[32];
  allow_downstream_launch();
  const int seq = blockIdx.x, head = blockIdx.y;
  const DecodeRange r = decode_range(p.seq_lens[seq], p.sliding_window);  // step metadata: before the wait
  const int count = min(r.num_parts, p.num_splits);  // splits that got a partition
  wait_for_upstream();  // every CTA: the merge's completion must imply the attention kernel's
  if (count <= 1) return;  // written directly by the attention kernel
  const int64_t row = static_cast<int64_t>(seq) * p.num_heads + head;
  const float* part_max = p.partial_max + row * p.num_splits;
  const float* part_sum = p.partial_sum + row * p.num_splits;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < count; i += kThreads) m = fmaxf(m, part_max[i]);
  m = block_reduce<true>(m, scratch);
  float total = 0.f;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const float w = part_sum[i] * expf(part_max[i] - m);
    weights[i] = w;
    total += w;
  }
  total = block_reduce<false>(total, scratch);  // its barriers also publish `weights`
  const float inv_total = 1.f / total;
  const float* part_out = p.partial_out + row * p.num_splits * p.head_dim;
  T* out = static_cast<T*>(p.out) + row * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float acc = 0.f;
    for (int i = 0; i < count; ++i) acc += weights[i] * part_out[static_cast<int64_t>(i) * p.head_dim + d];
    out[d] = from_float<T>(acc * inv_total);
  }
}

}  // namespace

cudaError_t launch_paged_decode_reduce(const PagedDecodeParams& p, cudaStream_t stream) {
  const size_t smem = p.num_splits * sizeof(float);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // 12k splits: far beyond any use
  const dim3 grid(p.num_seqs, p.num_heads);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel(paged_decode_reduce_kernel<decltype(tag)>, grid, dim3(kThreads), smem, stream, p);
  });
}

}  // namespace cuda
}  // namespace th_transformer
