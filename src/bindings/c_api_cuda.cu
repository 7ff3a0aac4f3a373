// The CUDA kernels behind the C ABI (c_api.h): argument records filled from raw pointers and
// shapes, the tensors' device made current, the kernel queued on the caller's stream. Host code only
// (compiled by nvcc with the kernels so that one toolchain builds the whole CUDA library).
#include <cuda_runtime.h>

#include <algorithm>

#include "src/bindings/c_api.h"
#include "src/bindings/c_api_identity.h"
#include "src/kernels/cuda/activation.h"
#include "src/kernels/cuda/gemv.h"
#include "src/kernels/cuda/kv_cache_write.h"
#include "src/kernels/cuda/lora.h"
#include "src/kernels/cuda/paged_decode_attention.h"
#include "src/kernels/cuda/quantize.h"
#include "src/kernels/cuda/rms_norm.h"
#include "src/kernels/cuda/rotary.h"
#include "src/kernels/cuda/row_stats.h"

namespace kc = th_transformer::cuda;

namespace {

// The caller's device made current for the launch (the tensors' device: ranks of one process may use
// several). cudaGetDevice / cudaSetDevice are host-side and cheap when nothing changes.
bool use_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) return false;
  return current == device || cudaSetDevice(device) == cudaSuccess;
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
kc::DType as_dtype(int code) { return static_cast<kc::DType>(code); }
bool compute_dtype(int code) { return code >= 0 && code <= 2; }

template <typename Launch>
int launch_on(int device, Launch&& launch) {
  if (!use_device(device)) return static_cast<int>(cudaErrorInvalidDevice);
  return static_cast<int>(launch());
}

__global__ void probe_kernel(int* out) {
  if (out) *out = 1;
}

}  // namespace

MAGA_API const char* maga_build_info(void) {
#ifdef MAGA_CUDA_ARCHS
  return "cuda kernels, CUDA " MAGA_STR(__CUDACC_VER_MAJOR__) "." MAGA_STR(__CUDACC_VER_MINOR__) ", " MAGA_STR(MAGA_CUDA_ARCHS);
#else
  return "cuda kernels, CUDA " MAGA_STR(__CUDACC_VER_MAJOR__) "." MAGA_STR(__CUDACC_VER_MINOR__);
#endif
}

MAGA_API const char* maga_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

MAGA_API int maga_cuda_probe(int device) {
  // The driver must run this runtime, and the device must find machine code (or PTX) for itself:
  // a launch of a trivial kernel reports either failure, which attribute queries alone do not.
  if (!use_device(device)) return static_cast<int>(cudaErrorInvalidDevice);
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) return static_cast<int>(err);
  probe_kernel<<<1, 1>>>(nullptr);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(cudaDeviceSynchronize());
}

MAGA_API int maga_cuda_sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (counts[device] == 0) cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
  return counts[device];
}

MAGA_API int maga_decode_partition_size(void) { return kc::kDecodePartitionSize; }
MAGA_API int maga_paged_decode_supports_head_dim(int head_dim) { return kc::paged_decode_supports_head_dim(head_dim); }
MAGA_API int64_t maga_gemv_max_in_features(void) { return kc::kGemvMaxInFeatures; }
MAGA_API int64_t maga_quantized_write_max_head_dim(void) { return kc::kQuantizedWriteMaxHeadDim; }

namespace {

kc::KVCacheWriteParams kv_rows(const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
                               int64_t num_tokens, int64_t kv_heads, int64_t head_dim, int64_t k_token_stride,
                               int64_t k_head_stride, int64_t v_token_stride, int64_t v_head_stride) {
  kc::KVCacheWriteParams p{};
  p.k = k;
  p.v = v;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.slot_mapping = slots;
  p.num_tokens = num_tokens;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.k_token_stride = k_token_stride;
  p.k_head_stride = k_head_stride;
  p.v_token_stride = v_token_stride;
  p.v_head_stride = v_head_stride;
  return p;
}

}  // namespace

MAGA_API int maga_write_kv_cache(int device, void* stream, const void* k, const void* v, void* k_cache, void* v_cache,
                                 const int64_t* slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                                 int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                                 int64_t v_head_stride, int elem_size) {
  kc::KVCacheWriteParams p = kv_rows(k, v, k_cache, v_cache, slot_mapping, num_tokens, kv_heads, head_dim,
                                     k_token_stride, k_head_stride, v_token_stride, v_head_stride);
  p.elem_size = elem_size;
  return launch_on(device, [&] { return kc::write_kv_cache(p, as_stream(stream)); });
}

MAGA_API int maga_write_kv_cache_quantized(int device, void* stream, int dtype, int fp8, const void* k, const void* v,
                                           void* k_cache, void* v_cache, float* k_scale, float* v_scale,
                                           const int64_t* slot_mapping, int64_t num_tokens, int64_t kv_heads,
                                           int64_t head_dim, int64_t k_token_stride, int64_t k_head_stride,
                                           int64_t v_token_stride, int64_t v_head_stride) {
  if (!compute_dtype(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  kc::KVCacheQuantizedWriteParams p{};
  p.rows = kv_rows(k, v, k_cache, v_cache, slot_mapping, num_tokens, kv_heads, head_dim, k_token_stride,
                   k_head_stride, v_token_stride, v_head_stride);
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.dtype = as_dtype(dtype);
  p.fp8 = fp8 != 0;
  return launch_on(device, [&] { return kc::write_kv_cache_quantized(p, as_stream(stream)); });
}

MAGA_API int maga_paged_decode_attention(int device, void* stream, int dtype, int cache_dtype, void* out,
                                         const void* q, const void* k_cache, const void* v_cache,
                                         const float* k_scale_opt, const float* v_scale_opt,
                                         const int32_t* block_tables, const int32_t* seq_lens,
                                         float* partial_out_opt, float* partial_max_opt, float* partial_sum_opt,
                                         int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                         int max_blocks_per_seq, int num_splits, int64_t q_seq_stride,
                                         int64_t q_head_stride, double scale, int sliding_window) {
  if (!compute_dtype(dtype) || cache_dtype < 0 || cache_dtype > 4) return static_cast<int>(cudaErrorInvalidValue);
  kc::PagedDecodeParams p{};
  p.dtype = as_dtype(dtype);
  p.cache_dtype = as_dtype(cache_dtype);
  p.out = out;
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.k_scale = k_scale_opt;
  p.v_scale = v_scale_opt;
  p.block_tables = block_tables;
  p.seq_lens = seq_lens;
  p.partial_out = partial_out_opt;
  p.partial_max = partial_max_opt;
  p.partial_sum = partial_sum_opt;
  p.num_seqs = num_seqs;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.max_blocks_per_seq = max_blocks_per_seq;
  p.num_splits = num_splits;
  p.q_seq_stride = q_seq_stride;
  p.q_head_stride = q_head_stride;
  p.scale = static_cast<float>(scale);
  p.sliding_window = sliding_window;
  return launch_on(device, [&] { return kc::paged_decode_attention(p, as_stream(stream)); });
}

MAGA_API int maga_rms_norm(int device, void* stream, int dtype, void* out, void* residual_out_opt, const void* x,
                           const void* residual_opt, const void* weight, int64_t rows, int hidden,
                           int64_t x_row_stride, int64_t residual_row_stride, double eps) {
  if (!compute_dtype(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  kc::RmsNormParams p{};
  p.dtype = as_dtype(dtype);
  p.out = out;
  p.residual_out = residual_out_opt;
  p.x = x;
  p.residual = residual_opt;
  p.weight = weight;
  p.rows = rows;
  p.hidden = hidden;
  p.x_row_stride = x_row_stride;
  p.residual_row_stride = residual_row_stride;
  p.eps = static_cast<float>(eps);
  return launch_on(device, [&] { return kc::rms_norm(p, as_stream(stream)); });
}

namespace {

kc::RotaryTarget rotary_target(void* out, const void* in, int heads, int64_t in_token_stride, int64_t in_head_stride,
                               int64_t out_token_stride, int64_t out_head_stride, void* cache) {
  kc::RotaryTarget t{};
  t.out = out;
  t.in = in;
  t.num_heads = in ? heads : 0;
  t.in_token_stride = in_token_stride;
  t.in_head_stride = in_head_stride;
  t.out_token_stride = out_token_stride;
  t.out_head_stride = out_head_stride;
  t.cache = cache;
  return t;
}

}  // namespace

MAGA_API int maga_apply_rotary(int device, void* stream, int dtype,
                               void* out0, const void* in0, int heads0, int64_t in0_token_stride,
                               int64_t in0_head_stride, int64_t out0_token_stride, int64_t out0_head_stride,
                               void* cache0_opt,
                               void* out1_opt, const void* in1_opt, int heads1, int64_t in1_token_stride,
                               int64_t in1_head_stride, int64_t out1_token_stride, int64_t out1_head_stride,
                               void* cache1_opt,
                               const void* in2_opt, int heads2, int64_t in2_token_stride, int64_t in2_head_stride,
                               void* cache2_opt,
                               const int64_t* slot_mapping_opt, const int64_t* positions_opt, const float* cos,
                               const float* sin, int64_t cos_sin_stride, int64_t num_tokens, int head_dim,
                               int rotary_dim) {
  if (!compute_dtype(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  kc::RotaryParams p{};
  p.dtype = as_dtype(dtype);
  p.targets[0] = rotary_target(out0, in0, heads0, in0_token_stride, in0_head_stride, out0_token_stride,
                               out0_head_stride, cache0_opt);
  p.targets[1] = rotary_target(out1_opt, in1_opt, heads1, in1_token_stride, in1_head_stride, out1_token_stride,
                               out1_head_stride, cache1_opt);
  p.targets[2] = rotary_target(nullptr, in2_opt, heads2, in2_token_stride, in2_head_stride, 0, 0, cache2_opt);
  p.slot_mapping = slot_mapping_opt;
  p.positions = positions_opt;
  p.cos = cos;
  p.sin = sin;
  p.cos_sin_stride = cos_sin_stride;
  p.num_tokens = num_tokens;
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  return launch_on(device, [&] { return kc::apply_rotary(p, as_stream(stream)); });
}

MAGA_API int maga_gated_activation(int device, void* stream, int dtype, void* out, const void* input, int64_t rows,
                                   int64_t width, int64_t input_row_stride, int activation) {
  if (!compute_dtype(dtype) || activation < 0 || activation > 2) return static_cast<int>(cudaErrorInvalidValue);
  kc::GatedActivationParams p{};
  p.dtype = as_dtype(dtype);
  p.out = out;
  p.input = input;
  p.rows = rows;
  p.width = width;
  p.input_row_stride = input_row_stride;
  p.activation = static_cast<kc::GateActivation>(activation);
  return launch_on(device, [&] { return kc::gated_activation(p, as_stream(stream)); });
}

MAGA_API int maga_gemv(int device, void* stream, int dtype, int weight_kind, void* out, const void* x,
                       const void* weight, const float* scale_opt, int64_t out_features, int64_t in_features) {
  if (!compute_dtype(dtype) || weight_kind < 0 || weight_kind > 2) return static_cast<int>(cudaErrorInvalidValue);
  kc::GemvParams p{};
  p.dtype = as_dtype(dtype);
  p.out = out;
  p.x = x;
  p.weight = weight;
  p.out_features = out_features;
  p.in_features = in_features;
  p.num_sms = maga_cuda_sm_count(device);
  p.weight_kind = static_cast<kc::GemvWeight>(weight_kind);
  p.scale = scale_opt;
  return launch_on(device, [&] { return kc::gemv(p, as_stream(stream)); });
}

MAGA_API int maga_lora_max_table_rank(void) { return kc::kLoraMaxTableRank; }

MAGA_API int maga_lora_apply(int device, void* stream, int dtype, void* out, const void* x,
                             const int64_t* row_slots, const int64_t* row_order, const int64_t* table, int capacity,
                             float* partial, int k_splits, int64_t rows, int64_t in_features, int64_t out_features,
                             int64_t x_stride, int64_t out_stride) {
  if (!compute_dtype(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  kc::LoraApplyParams p{};
  p.dtype = as_dtype(dtype);
  p.out = out;
  p.x = x;
  p.row_slots = row_slots;
  p.row_order = row_order;
  p.table = table;
  p.capacity = capacity;
  p.partial = partial;
  p.k_splits = k_splits;
  p.rows = rows;
  p.in_features = in_features;
  p.out_features = out_features;
  p.x_stride = x_stride;
  p.out_stride = out_stride;
  // two CTAs per SM over the batch's row groups, each with at least a CTA-width of outputs
  const int64_t sms = maga_cuda_sm_count(device) > 0 ? maga_cuda_sm_count(device) : 132;
  const int64_t groups = (rows + kc::kLoraGroupRows - 1) / kc::kLoraGroupRows;
  const int64_t want = groups > 0 ? (2 * sms + groups - 1) / groups : 1;
  const int64_t widest = (out_features + 255) / 256;
  p.ctas_per_group = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, widest, 65535})));
  return launch_on(device, [&] { return kc::lora_apply(p, as_stream(stream)); });
}

MAGA_API int maga_quantize_rows_fp8(int device, void* stream, int dtype, void* out, float* scale, const void* x,
                                    int64_t rows, int64_t cols, int64_t row_stride) {
  if (!compute_dtype(dtype)) return static_cast<int>(cudaErrorInvalidValue);
  kc::QuantizeRowsParams p{};
  p.dtype = as_dtype(dtype);
  p.x = x;
  p.out = out;
  p.scale = scale;
  p.rows = rows;
  p.cols = cols;
  p.row_stride = row_stride;
  return launch_on(device, [&] { return kc::quantize_rows_fp8(p, as_stream(stream)); });
}

MAGA_API int maga_row_argmax_logsumexp(int device, void* stream, int64_t* argmax, float* logsumexp,
                                       const float* logits, int64_t rows, int64_t vocab, int64_t row_stride) {
  kc::RowStatsParams p{};
  p.logits = logits;
  p.argmax = argmax;
  p.logsumexp = logsumexp;
  p.rows = rows;
  p.vocab = vocab;
  p.row_stride = row_stride;
  return launch_on(device, [&] { return kc::row_argmax_logsumexp(p, as_stream(stream)); });
}
