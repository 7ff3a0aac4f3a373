#include "src/kernels/cuda/kv_cache_write.h"

#include <cuda_runtime.h>

#include "src/kernels/cuda/launch.cuh"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// One CTA per token. Keys and values are a pure copy, so they move in the widest word (up to 16
// bytes) that every row, stride and base pointer allows, whatever the element type.
template <typename Word>
__global__ void __launch_bounds__(kThreads) write_kv_cache_kernel(const KVCacheWriteParams p) {
  allow_downstream_launch();
  wait_for_upstream();
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;  // padded token (e.g. a CUDA-graph batch larger than the real one)
  const int64_t words_per_head = p.head_dim * p.elem_size / sizeof(Word);
  const int64_t words = p.kv_heads * words_per_head;
  const int64_t elems_per_word = sizeof(Word) / p.elem_size;
  const Word* k = static_cast<const Word*>(p.k);
  const Word* v = static_cast<const Word*>(p.v);
  Word* k_cache = static_cast<Word*>(p.k_cache) + slot * words;
  Word* v_cache = static_cast<Word*>(p.v_cache) + slot * words;
  const int64_t k_row = token * p.k_token_stride / elems_per_word;
  const int64_t v_row = token * p.v_token_stride / elems_per_word;
  for (int64_t i = threadIdx.x; i < words; i += kThreads) {
    const int64_t head = i / words_per_head, w = i % words_per_head;
    k_cache[i] = k[k_row + head * p.k_head_stride / elems_per_word + w];
    v_cache[i] = v[v_row + head * p.v_head_stride / elems_per_word + w];
  }
}

bool fits_word(const KVCacheWriteParams& p, int64_t word) {
  const int64_t elems = word / p.elem_size;
  if (word < p.elem_size || word % p.elem_size) return false;
  const bool strides = p.head_dim % elems == 0 && p.k_token_stride % elems == 0 && p.k_head_stride % elems == 0 &&
                       p.v_token_stride % elems == 0 && p.v_head_stride % elems == 0;
  const bool pointers = reinterpret_cast<uintptr_t>(p.k) % word == 0 && reinterpret_cast<uintptr_t>(p.v) % word == 0 &&
                        reinterpret_cast<uintptr_t>(p.k_cache) % word == 0 &&
                        reinterpret_cast<uintptr_t>(p.v_cache) % word == 0;
  return strides && pointers;
}

template <typename Word>
cudaError_t launch(const KVCacheWriteParams& p, cudaStream_t stream) {
  return launch_kernel(write_kv_cache_kernel<Word>, dim3(static_cast<unsigned>(p.num_tokens)), dim3(kThreads), 0,
                       stream, p);
}

}  // namespace

cudaError_t write_kv_cache(const KVCacheWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff || p.elem_size <= 0) return cudaErrorInvalidValue;
  if (fits_word(p, 16)) return launch<uint4>(p, stream);
  if (fits_word(p, 8)) return launch<uint2>(p, stream);
  if (fits_word(p, 4)) return launch<uint32_t>(p, stream);
  if (fits_word(p, 2)) return launch<uint16_t>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace th_transformer
