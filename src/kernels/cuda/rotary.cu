#include "src/kernels/cuda/common.cuh"
#include "src/kernels/cuda/launch.cuh"
#include "src/kernels/cuda/rotary.h"

namespace th_transformer {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Where token `token`'s head `head` of target t goes: its cache row (null for a skipped slot) or
// its output row.
template <typename T>
__device__ __forceinline__ T* target_row(const RotaryTarget& t, int64_t token, int head, int64_t slot,
                                         int head_dim) {
  if (t.cache == nullptr) return static_cast<T*>(t.out) + token * t.out_token_stride + head * t.out_head_stride;
  if (slot < 0) return nullptr;
  return static_cast<T*>(t.cache) + (slot * t.num_heads + head) * head_dim;
}

// Grid: (token, group of heads_per_cta heads of the targets together); thread j handles one
// (head, pair). Splitting a token's heads over CTAs matters at small batches: one CTA per token
// left a batch-1 decode step's rotary on a single SM, walking 40 heads (5 us a layer on the H100).
// Products are rounded separately (no FMA contraction) to reproduce the reference's separate
// multiplies bit for bit. Heads of target 2 are copied (the pair and tail layout serves a copy too).
template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, int heads_per_cta) {
  allow_downstream_launch();
  wait_for_upstream();
  const int64_t token = blockIdx.x;
  const int64_t row = p.positions ? p.positions[token] : token;
  const int64_t slot = p.slot_mapping ? p.slot_mapping[token] : -1;
  const float* cos = p.cos + row * p.cos_sin_stride;
  const float* sin = p.sin + row * p.cos_sin_stride;
  const int half = p.rotary_dim / 2;
  const int tail = p.head_dim - p.rotary_dim;
  const int per_head = half + tail;  // rotated pairs, then untouched channels to copy
  const int heads0 = p.targets[0].num_heads, heads01 = heads0 + p.targets[1].num_heads;
  const int first_head = blockIdx.y * heads_per_cta;
  const int heads = min(heads_per_cta, heads01 + p.targets[2].num_heads - first_head);
  const int work = heads * per_head;
  for (int j = threadIdx.x; j < work; j += kThreads) {
    int head = first_head + j / per_head;
    const int c = j % per_head;
    const int target = head < heads0 ? 0 : head < heads01 ? 1 : 2;
    const RotaryTarget& t = p.targets[target];
    head -= target == 0 ? 0 : target == 1 ? heads0 : heads01;
    const T* in = static_cast<const T*>(t.in) + token * t.in_token_stride + head * t.in_head_stride;
    T* out = target_row<T>(t, token, head, slot, p.head_dim);
    if (out == nullptr) continue;
    if (c < half && target < 2) {
      const float x1 = to_float(in[c]), x2 = to_float(in[c + half]);
      out[c] = from_float<T>(__fsub_rn(__fmul_rn(x1, cos[c]), __fmul_rn(x2, sin[c])));
      out[c + half] = from_float<T>(__fadd_rn(__fmul_rn(x2, cos[c]), __fmul_rn(x1, sin[c])));
    } else if (c < half) {
      out[c] = in[c];
      out[c + half] = in[c + half];
    } else if (in != out) {
      const int d = p.rotary_dim + (c - half);
      out[d] = in[d];
    }
  }
}

}  // namespace

cudaError_t apply_rotary(const RotaryParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const bool shapes = p.num_tokens > 0 && p.num_tokens <= 0x7fffffff && p.rotary_dim > 0 && p.rotary_dim % 2 == 0 &&
                      p.rotary_dim <= p.head_dim && p.targets[0].num_heads >= 0 && p.targets[1].num_heads >= 0 &&
                      p.targets[2].num_heads >= 0;
  const bool has_cache = p.targets[0].cache || p.targets[1].cache || p.targets[2].cache;
  if (!shapes || (has_cache && !p.slot_mapping)) return cudaErrorInvalidValue;
  const int per_head = p.rotary_dim / 2 + (p.head_dim - p.rotary_dim);
  const int heads = p.targets[0].num_heads + p.targets[1].num_heads + p.targets[2].num_heads;
  if (heads == 0) return cudaSuccess;
  const int heads_per_cta = per_head >= kThreads ? 1 : kThreads / per_head;
  const dim3 grid(static_cast<unsigned>(p.num_tokens), (heads + heads_per_cta - 1) / heads_per_cta);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel(rotary_kernel<decltype(tag)>, grid, dim3(kThreads), 0, stream, p, heads_per_cta);
  });
}

}  // namespace cuda
}  // namespace th_transformer
