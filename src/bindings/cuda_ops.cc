// Torch glue of the CUDA kernels: tensors in, raw pointers + shapes + torch's current stream out.
//
// Inputs are validated in Python (maga_transformer/ops/_cuda.py and the ops) before these run,
// and nothing here throws: each function returns the cudaError_t of its launch (0 = success)
// and Python raises. A C++ exception crossing pybind11 once crashed the GPU machine's process.
// Work is queued on the current stream with no host sync and no allocation, so CUDA graphs can
// capture it.
#include "src/bindings/cuda_ops.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "src/kernels/cuda/activation.h"
#include "src/kernels/cuda/gemv.h"
#include "src/kernels/cuda/kv_cache_write.h"
#include "src/kernels/cuda/paged_decode_attention.h"
#include "src/kernels/cuda/quantize.h"
#include "src/kernels/cuda/rms_norm.h"
#include "src/kernels/cuda/rotary.h"
#include "src/kernels/cuda/row_stats.h"

namespace th_transformer {
namespace {

namespace kc = th_transformer::cuda;
using at::Tensor;

bool to_dtype(const Tensor& t, kc::DType* dtype) {
  switch (t.scalar_type()) {
    case at::kFloat: *dtype = kc::DType::kFloat32; return true;
    case at::kHalf: *dtype = kc::DType::kFloat16; return true;
    case at::kBFloat16: *dtype = kc::DType::kBFloat16; return true;
    default: return false;
  }
}

// c10's stream API (what at::cuda::getCurrentCUDAStream forwards to) without ATen/cuda's
// cuBLAS/cuSPARSE headers.
cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

int write_kv_cache(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(k.device());
  kc::KVCacheWriteParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = k.size(0);
  p.kv_heads = k.size(1);
  p.head_dim = k.size(2);
  p.k_token_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_token_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.elem_size = static_cast<int>(k.element_size());
  return static_cast<int>(kc::write_kv_cache(p, current_stream(k)));
}

// A KV cache's element type: the compute dtypes, or a quantized cache's int8 / e4m3.
bool to_cache_dtype(const Tensor& t, kc::DType* dtype) {
  if (t.scalar_type() == at::kChar) {
    *dtype = kc::DType::kInt8;
    return true;
  }
  if (t.scalar_type() == at::kFloat8_e4m3fn) {
    *dtype = kc::DType::kFloat8E4M3;
    return true;
  }
  return to_dtype(t, dtype);
}

int write_kv_cache_quantized(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, Tensor& k_scale,
                             Tensor& v_scale, const Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(k.device());
  kc::KVCacheQuantizedWriteParams p{};
  if (!to_dtype(k, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  p.rows.k = k.data_ptr();
  p.rows.v = v.data_ptr();
  p.rows.k_cache = k_cache.data_ptr();
  p.rows.v_cache = v_cache.data_ptr();
  p.rows.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.rows.num_tokens = k.size(0);
  p.rows.kv_heads = k.size(1);
  p.rows.head_dim = k.size(2);
  p.rows.k_token_stride = k.stride(0);
  p.rows.k_head_stride = k.stride(1);
  p.rows.v_token_stride = v.stride(0);
  p.rows.v_head_stride = v.stride(1);
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  return static_cast<int>(kc::write_kv_cache_quantized(p, current_stream(k)));
}

int paged_decode_attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           const Tensor& block_tables, const Tensor& seq_lens, const c10::optional<Tensor>& partial_out,
                           const c10::optional<Tensor>& partial_max, const c10::optional<Tensor>& partial_sum,
                           int64_t num_splits, double scale, int64_t sliding_window,
                           const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  kc::PagedDecodeParams p{};
  if (!to_dtype(q, &p.dtype) || !to_cache_dtype(k_cache, &p.cache_dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.partial_out = partial_out ? partial_out->data_ptr<float>() : nullptr;
  p.partial_max = partial_max ? partial_max->data_ptr<float>() : nullptr;
  p.partial_sum = partial_sum ? partial_sum->data_ptr<float>() : nullptr;
  p.num_seqs = static_cast<int>(q.size(0));
  p.num_heads = static_cast<int>(q.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.num_splits = static_cast<int>(num_splits);
  p.q_seq_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.scale = static_cast<float>(scale);
  p.sliding_window = static_cast<int>(sliding_window);
  return static_cast<int>(kc::paged_decode_attention(p, current_stream(q)));
}

int rms_norm(Tensor& out, const c10::optional<Tensor>& residual_out, const Tensor& x,
             const c10::optional<Tensor>& residual, const Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  kc::RmsNormParams p{};
  if (!to_dtype(x, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.out = out.data_ptr();
  p.residual_out = residual_out ? residual_out->data_ptr() : nullptr;
  p.x = x.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.rows = x.size(0);
  p.hidden = static_cast<int>(x.size(1));
  p.x_row_stride = x.stride(0);
  p.residual_row_stride = residual ? residual->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  return static_cast<int>(kc::rms_norm(p, current_stream(x)));
}

void fill_target_input(kc::RotaryTarget* t, const Tensor& in) {
  t->in = in.data_ptr();
  t->num_heads = static_cast<int>(in.size(1));
  t->in_token_stride = in.stride(0);
  t->in_head_stride = in.stride(1);
}

void fill_target(kc::RotaryTarget* t, Tensor& out, const Tensor& in) {
  fill_target_input(t, in);
  t->out = out.data_ptr();
  t->out_token_stride = out.stride(0);
  t->out_head_stride = out.stride(1);
}

void fill_cache_target(kc::RotaryTarget* t, Tensor& cache, const Tensor& in) {
  fill_target_input(t, in);
  t->cache = cache.data_ptr();
}

void fill_tables(kc::RotaryParams* p, const Tensor& in, const Tensor& cos, const Tensor& sin, int64_t rotary_dim) {
  p->cos = cos.data_ptr<float>();
  p->sin = sin.data_ptr<float>();
  p->cos_sin_stride = cos.stride(0);
  p->num_tokens = in.size(0);
  p->head_dim = static_cast<int>(in.size(2));
  p->rotary_dim = static_cast<int>(rotary_dim);
}

// Rotates `in0` into `out0` (and `in1` into `out1` when given) in one launch; outputs may be the
// inputs themselves. positions: rows of cos/sin per token, or none for row t = token t.
int apply_rotary(Tensor& out0, const Tensor& in0, c10::optional<Tensor> out1, const c10::optional<Tensor>& in1,
                 const c10::optional<Tensor>& positions, const Tensor& cos, const Tensor& sin, int64_t rotary_dim) {
  const c10::cuda::CUDAGuard guard(in0.device());
  kc::RotaryParams p{};
  if (!to_dtype(in0, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  fill_target(&p.targets[0], out0, in0);
  if (in1 && out1) fill_target(&p.targets[1], *out1, *in1);
  p.positions = positions ? positions->data_ptr<int64_t>() : nullptr;
  fill_tables(&p, in0, cos, sin, rotary_dim);
  return static_cast<int>(kc::apply_rotary(p, current_stream(in0)));
}

// Rotates the first q_out.size(1) heads of qk into q_out and the rest (keys) into k_cache, and
// copies v into v_cache, at slot_mapping's slots: a decode step's rotary and KV-cache write in one
// launch. cos/sin rows are per token.
int rotary_write_kv_cache(Tensor& q_out, const Tensor& qk, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                          const Tensor& slot_mapping, const Tensor& cos, const Tensor& sin, int64_t rotary_dim) {
  const c10::cuda::CUDAGuard guard(qk.device());
  kc::RotaryParams p{};
  if (!to_dtype(qk, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t q_heads = q_out.size(1);
  fill_target(&p.targets[0], q_out, qk.narrow(1, 0, q_heads));
  fill_cache_target(&p.targets[1], k_cache, qk.narrow(1, q_heads, qk.size(1) - q_heads));
  fill_cache_target(&p.targets[2], v_cache, v);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  fill_tables(&p, qk, cos, sin, rotary_dim);
  return static_cast<int>(kc::apply_rotary(p, current_stream(qk)));
}

int gated_activation(Tensor& out, const Tensor& input, int64_t activation) {
  const c10::cuda::CUDAGuard guard(input.device());
  kc::GatedActivationParams p{};
  if (!to_dtype(input, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.out = out.data_ptr();
  p.input = input.data_ptr();
  p.rows = input.size(0);
  p.width = out.size(1);
  p.input_row_stride = input.stride(0);
  p.activation = static_cast<kc::GateActivation>(activation);
  return static_cast<int>(kc::gated_activation(p, current_stream(input)));
}

// Multiprocessors of a device, asked once (an attribute query, no sync; cached for graph capture).
int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (counts[device] == 0) cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
  return counts[device];
}

int gemv(Tensor& out, const Tensor& x, const Tensor& weight) {
  const c10::cuda::CUDAGuard guard(weight.device());
  kc::GemvParams p{};
  if (!to_dtype(weight, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out_features = weight.size(0);
  p.in_features = weight.size(1);
  p.num_sms = sm_count(weight.get_device());
  return static_cast<int>(kc::gemv(p, current_stream(weight)));
}

int gemv_i8(Tensor& out, const Tensor& x, const Tensor& weight, const Tensor& scale) {
  const c10::cuda::CUDAGuard guard(weight.device());
  kc::GemvParams p{};
  if (!to_dtype(x, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out_features = weight.size(0);
  p.in_features = weight.size(1);
  p.num_sms = sm_count(weight.get_device());
  p.int8_weight = true;
  p.scale = scale.data_ptr<float>();
  return static_cast<int>(kc::gemv(p, current_stream(weight)));
}

int quantize_rows_fp8(Tensor& out, Tensor& scale, const Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  kc::QuantizeRowsParams p{};
  if (!to_dtype(x, &p.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.row_stride = x.stride(0);
  return static_cast<int>(kc::quantize_rows_fp8(p, current_stream(x)));
}

int row_argmax_logsumexp(Tensor& argmax, Tensor& logsumexp, const Tensor& logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  kc::RowStatsParams p{};
  p.logits = logits.data_ptr<float>();
  p.argmax = argmax.data_ptr<int64_t>();
  p.logsumexp = logsumexp.data_ptr<float>();
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.row_stride = logits.stride(0);
  return static_cast<int>(kc::row_argmax_logsumexp(p, current_stream(logits)));
}

std::string cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace

void register_cuda_ops(pybind11::module_& m) {
  using pybind11::arg;
  m.def("write_kv_cache", &write_kv_cache, "scatter k, v into paged caches by slot", arg("k"), arg("v"),
        arg("k_cache"), arg("v_cache"), arg("slot_mapping"));
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV (flash-decoding)",
        arg("out"), arg("q"), arg("k_cache"), arg("v_cache"), arg("block_tables"), arg("seq_lens"),
        arg("partial_out"), arg("partial_max"), arg("partial_sum"), arg("num_splits"), arg("scale"),
        arg("sliding_window"), arg("k_scale") = pybind11::none(), arg("v_scale") = pybind11::none());
  m.def("write_kv_cache_quantized", &write_kv_cache_quantized,
        "quantize k, v per token and KV head into int8 / e4m3 paged caches and their scales, by slot", arg("k"),
        arg("v"), arg("k_cache"), arg("v_cache"), arg("k_scale"), arg("v_scale"), arg("slot_mapping"));
  m.attr("quantized_write_max_head_dim") = kc::kQuantizedWriteMaxHeadDim;
  m.def("rms_norm", &rms_norm, "out = weight * rmsnorm(x [+ residual]); residual_out = x + residual", arg("out"),
        arg("residual_out"), arg("x"), arg("residual"), arg("weight"), arg("eps"));
  m.def("apply_rotary", &apply_rotary, "NeoX rotary on one or two tensors", arg("out0"), arg("in0"), arg("out1"),
        arg("in1"), arg("positions"), arg("cos"), arg("sin"), arg("rotary_dim"));
  m.def("rotary_write_kv_cache", &rotary_write_kv_cache,
        "rotary on qk's query heads into q_out, its key heads into k_cache; v into v_cache (by slot)", arg("q_out"),
        arg("qk"), arg("v"), arg("k_cache"), arg("v_cache"), arg("slot_mapping"), arg("cos"), arg("sin"),
        arg("rotary_dim"));
  m.def("gated_activation", &gated_activation, "act(gate) * up; 0 silu, 1 gelu, 2 gelu tanh", arg("out"),
        arg("input"), arg("activation"));
  m.def("gemv", &gemv, "out = x @ weight.T for one row (fp16 / bf16)", arg("out"), arg("x"), arg("weight"));
  m.def("gemv_int8_weight", &gemv_i8, "out = scale * (x @ weight.T) for one fp16 / bf16 row, int8 weight", arg("out"),
        arg("x"), arg("weight"), arg("scale"));
  m.attr("gemv_max_in_features") = kc::kGemvMaxInFeatures;
  m.def("quantize_rows_fp8", &quantize_rows_fp8, "per row: scale = absmax / 448, out = e4m3(x / scale)",
        arg("out"), arg("scale"), arg("x"));
  m.def("row_argmax_logsumexp", &row_argmax_logsumexp, "per fp32 row: first argmax and logsumexp",
        arg("argmax"), arg("logsumexp"), arg("logits"));
  m.def("paged_decode_supports_head_dim", &kc::paged_decode_supports_head_dim, arg("head_dim"));
  m.def("cuda_error_string", &cuda_error_string, arg("code"));
  m.attr("decode_partition_size") = kc::kDecodePartitionSize;
}

}  // namespace th_transformer
