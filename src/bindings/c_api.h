// The C ABI of the runtime: plain functions over raw pointers, shapes, strides and (CUDA) a device
// and a stream, loaded by maga_transformer/ops/_native.py through ctypes.
//
// Why a C ABI (and not a pybind11 / torch extension): the library then depends on neither torch nor
// Python, so one build serves every torch (CI's 2.13 CPU, the GPU machine's 2.11 CUDA 13) and every
// Python, a wheel can carry it prebuilt, and no torch header is compiled (the torch glue took most
// of the old build's time). Two libraries are built from these declarations:
//   libth_transformer_cpu.so   the CPU kernels (c_api_cpu.cc, kernels/cpu/)
//   libth_transformer_cuda.so  the CUDA kernels (c_api_cuda.cu, kernels/cuda/), CUDA runtime linked in
//
// Rules every function keeps: inputs were validated in Python; nothing throws (an exception must not
// cross the ABI); the return value is 0 on success, else an error code (CUDA: the launch's
// cudaError_t, described by maga_cuda_error_string); CUDA work is queued on `stream` with no host
// sync and no allocation, so CUDA graphs capture it. Pointers named *_opt may be null.
// Bump MAGA_ABI_VERSION whenever a signature or a meaning changes: the loader refuses a library
// whose version differs from the one it was written for.
#pragma once

#include <cstdint>

#define MAGA_ABI_VERSION 2
#define MAGA_API extern "C" __attribute__((visibility("default")))

// Both libraries.
MAGA_API int maga_abi_version(void);
MAGA_API const char* maga_build_info(void);  // what the library was built for (arch flags, CUDA version)
MAGA_API const char* maga_source_hash(void);  // the sources it was built from ("" when unknown)

// ---- CPU (fp32): libth_transformer_cpu.so ------------------------------------------------------
constexpr int kMagaInvalidArgument = 22;  // EINVAL: a shape the kernel does not take

MAGA_API int maga_max_gemv_rows(void);
MAGA_API int maga_gemv_f32(const float* x, const float* w, const float* bias_opt, float* y, int64_t rows,
                           int64_t in, int64_t out);
MAGA_API int maga_gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias_opt, float* y,
                          int64_t rows, int64_t in, int64_t out);
MAGA_API int maga_rms_norm_f32(const float* x, int64_t x_stride, const float* residual_opt, int64_t residual_stride,
                               const float* weight, float* out, float* summed_opt, int64_t rows, int64_t hidden,
                               double eps);
MAGA_API int maga_silu_and_mul_f32(const float* gate_up, int64_t gate_up_stride, float* out, int64_t rows,
                                   int64_t width);
MAGA_API int maga_rotary_write_kv_f32(const float* qk, int64_t qk_stride, const float* v, int64_t v_stride,
                                      const float* cos, const float* sin, int64_t table_stride, const int64_t* slots,
                                      float* q_out, float* k_cache, float* v_cache, int64_t tokens, int64_t q_heads,
                                      int64_t kv_heads, int64_t head_dim, int64_t rotary_dim);
MAGA_API int maga_paged_decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache,
                                             const float* v_cache, const int32_t* block_tables, int64_t max_blocks,
                                             const int32_t* seq_lens, float* out, int64_t seqs, int64_t heads,
                                             int64_t kv_heads, int64_t head_dim, int64_t block_size, double scale,
                                             int64_t window);

// ---- CUDA: libth_transformer_cuda.so -------------------------------------------------------------
// dtype codes (src/kernels/cuda/dtype.h): 0 fp32, 1 fp16, 2 bf16, 3 int8, 4 e4m3. `device` is the
// CUDA device the tensors live on (made current for the call), `stream` a cudaStream_t.
MAGA_API const char* maga_cuda_error_string(int code);
// 0 when this device can run the library's kernels (the right architecture, a new enough driver),
// else the CUDA error that says why not.
MAGA_API int maga_cuda_probe(int device);
MAGA_API int maga_cuda_sm_count(int device);
MAGA_API int maga_decode_partition_size(void);
MAGA_API int maga_paged_decode_supports_head_dim(int head_dim);
MAGA_API int64_t maga_gemv_max_in_features(void);
MAGA_API int64_t maga_quantized_write_max_head_dim(void);

MAGA_API int maga_write_kv_cache(int device, void* stream, const void* k, const void* v, void* k_cache, void* v_cache,
                                 const int64_t* slot_mapping, int64_t num_tokens, int64_t kv_heads, int64_t head_dim,
                                 int64_t k_token_stride, int64_t k_head_stride, int64_t v_token_stride,
                                 int64_t v_head_stride, int elem_size);
MAGA_API int maga_write_kv_cache_quantized(int device, void* stream, int dtype, int fp8, const void* k, const void* v,
                                           void* k_cache, void* v_cache, float* k_scale, float* v_scale,
                                           const int64_t* slot_mapping, int64_t num_tokens, int64_t kv_heads,
                                           int64_t head_dim, int64_t k_token_stride, int64_t k_head_stride,
                                           int64_t v_token_stride, int64_t v_head_stride);
MAGA_API int maga_paged_decode_attention(int device, void* stream, int dtype, int cache_dtype, void* out,
                                         const void* q, const void* k_cache, const void* v_cache,
                                         const float* k_scale_opt, const float* v_scale_opt,
                                         const int32_t* block_tables, const int32_t* seq_lens,
                                         float* partial_out_opt, float* partial_max_opt, float* partial_sum_opt,
                                         int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                         int max_blocks_per_seq, int num_splits, int64_t q_seq_stride,
                                         int64_t q_head_stride, double scale, int sliding_window);
MAGA_API int maga_rms_norm(int device, void* stream, int dtype, void* out, void* residual_out_opt, const void* x,
                           const void* residual_opt, const void* weight, int64_t rows, int hidden,
                           int64_t x_row_stride, int64_t residual_row_stride, double eps);
// One rotary target: `heads` heads of `in` rotated into `out` (or, cache non-null, into the cache
// rows named by slot_mapping). Targets 0 and 1 rotate; target 2 is copied (values into their cache).
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
                               int rotary_dim);
MAGA_API int maga_gated_activation(int device, void* stream, int dtype, void* out, const void* input, int64_t rows,
                                   int64_t width, int64_t input_row_stride, int activation);
// weight_kind (src/kernels/cuda/gemv.h GemvWeight): 0 the weight is x's dtype; 1 int8 and 2 e4m3, each
// with `scale` (one fp32 per output row).
MAGA_API int maga_gemv(int device, void* stream, int dtype, int weight_kind, void* out, const void* x,
                       const void* weight, const float* scale_opt, int64_t out_features, int64_t in_features);
// Unmerged LoRA (src/kernels/cuda/lora.h): out[r] += B_s (A_s x[r]) for each row r whose slot
// row_slots[r] is in `table` ([4, capacity] int64: slot ids, A addresses, B addresses, ranks);
// row_order: the rows sorted by slot; `partial`: fp32 workspace of rows * k_splits *
// maga_lora_max_table_rank() values; k_splits: see ops/lora.py shrink_splits.
MAGA_API int maga_lora_max_table_rank(void);
MAGA_API int maga_lora_apply(int device, void* stream, int dtype, void* out, const void* x,
                             const int64_t* row_slots, const int64_t* row_order, const int64_t* table, int capacity,
                             float* partial, int k_splits, int64_t rows, int64_t in_features, int64_t out_features,
                             int64_t x_stride, int64_t out_stride);
MAGA_API int maga_quantize_rows_fp8(int device, void* stream, int dtype, void* out, float* scale, const void* x,
                                    int64_t rows, int64_t cols, int64_t row_stride);
MAGA_API int maga_row_argmax_logsumexp(int device, void* stream, int64_t* argmax, float* logsumexp,
                                       const float* logits, int64_t rows, int64_t vocab, int64_t row_stride);
