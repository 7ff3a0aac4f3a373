// The CPU kernels behind the C ABI (c_api.h): argument records filled, kernels called. Shapes were
// checked in Python (maga_transformer/ops/_native.py); the few checks here only keep a bad call from
// reading out of bounds.
#include "src/bindings/c_api.h"
#include "src/bindings/c_api_identity.h"
#include "src/kernels/cpu/decode_ops.h"
#include "src/kernels/cpu/gemv.h"

MAGA_API const char* maga_build_info(void) {
#ifdef MAGA_CPU_ARCH
  return "cpu kernels, " MAGA_STR(MAGA_CPU_ARCH);
#else
  return "cpu kernels";
#endif
}

MAGA_API int maga_max_gemv_rows(void) { return static_cast<int>(th_transformer::kMaxGemvRows); }

MAGA_API int maga_gemv_f32(const float* x, const float* w, const float* bias_opt, float* y, int64_t rows, int64_t in,
                           int64_t out) {
  if (rows < 0 || rows > th_transformer::kMaxGemvRows || in <= 0 || out <= 0) return kMagaInvalidArgument;
  th_transformer::gemv_f32(x, w, bias_opt, y, rows, in, out);
  return 0;
}

MAGA_API int maga_gemv_i8(const float* x, const int8_t* w, const float* scale, const float* bias_opt, float* y,
                          int64_t rows, int64_t in, int64_t out) {
  if (rows < 0 || rows > th_transformer::kMaxGemvRows || in <= 0 || out <= 0) return kMagaInvalidArgument;
  th_transformer::gemv_i8(x, w, scale, bias_opt, y, rows, in, out);
  return 0;
}

MAGA_API int maga_rms_norm_f32(const float* x, int64_t x_stride, const float* residual_opt, int64_t residual_stride,
                               const float* weight, float* out, float* summed_opt, int64_t rows, int64_t hidden,
                               double eps) {
  if ((residual_opt == nullptr) != (summed_opt == nullptr) || rows < 0 || hidden <= 0) return kMagaInvalidArgument;
  th_transformer::rms_norm_f32(x, x_stride, residual_opt, residual_stride, weight, out, summed_opt, rows, hidden,
                               static_cast<float>(eps));
  return 0;
}

MAGA_API int maga_silu_and_mul_f32(const float* gate_up, int64_t gate_up_stride, float* out, int64_t rows,
                                   int64_t width) {
  if (rows < 0 || width <= 0) return kMagaInvalidArgument;
  th_transformer::silu_and_mul_f32(gate_up, gate_up_stride, out, rows, width);
  return 0;
}

MAGA_API int maga_rotary_write_kv_f32(const float* qk, int64_t qk_stride, const float* v, int64_t v_stride,
                                      const float* cos, const float* sin, int64_t table_stride, const int64_t* slots,
                                      float* q_out, float* k_cache, float* v_cache, int64_t tokens, int64_t q_heads,
                                      int64_t kv_heads, int64_t head_dim, int64_t rotary_dim) {
  if (rotary_dim <= 0 || rotary_dim % 2 || rotary_dim > head_dim || tokens < 0) return kMagaInvalidArgument;
  const th_transformer::RotaryKvArgs args{qk,    qk_stride, v,       v_stride, cos,     sin,     table_stride, slots,
                                          q_out, k_cache,   v_cache, tokens,   q_heads, kv_heads, head_dim,    rotary_dim};
  th_transformer::rotary_write_kv_f32(args);
  return 0;
}

MAGA_API int maga_paged_decode_attention_f32(const float* q, int64_t q_stride, const float* k_cache,
                                             const float* v_cache, const int32_t* block_tables, int64_t max_blocks,
                                             const int32_t* seq_lens, float* out, int64_t seqs, int64_t heads,
                                             int64_t kv_heads, int64_t head_dim, int64_t block_size, double scale,
                                             int64_t window) {
  if (seqs < 0 || kv_heads <= 0 || heads % kv_heads || block_size <= 0 || max_blocks <= 0) return kMagaInvalidArgument;
  const th_transformer::DecodeAttentionArgs args{q,     q_stride, k_cache,  v_cache,  block_tables,
                                                 max_blocks, seq_lens, out, seqs, heads,
                                                 kv_heads,   head_dim, block_size, static_cast<float>(scale), window};
  th_transformer::paged_decode_attention_f32(args);
  return 0;
}
