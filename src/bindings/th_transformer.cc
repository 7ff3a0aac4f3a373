// The one Python module of the C++ runtime; only maga_transformer/ops imports it.
#include <torch/extension.h>

#include "src/kernels/cpu/decode_ops.h"
#include "src/kernels/cpu/gemv.h"

// The CUDA build (ops/_compiled.py on a machine with CUDA torch + nvcc) defines MAGA_WITH_CUDA and
// adds the CUDA sources; the CPU build compiles exactly what it did before.
#ifdef MAGA_WITH_CUDA
#include "src/bindings/cuda_ops.h"
#endif

namespace {

// An optional fp32 bias of `out` values, contiguous (undefined when absent).
torch::Tensor checked_bias(const c10::optional<torch::Tensor>& bias, int64_t out, const char* op) {
  if (!bias.has_value()) return torch::Tensor();
  auto bc = bias->contiguous();
  TORCH_CHECK(bc.scalar_type() == torch::kFloat && bc.numel() == out, op, ": bias [out] fp32");
  return bc;
}

torch::Tensor gemv_f32(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv_f32: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "gemv_f32: fp32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv_f32: shapes [rows, in] x [out, in]");
  TORCH_CHECK(x.size(0) <= th_transformer::kMaxGemvRows, "gemv_f32: at most ", th_transformer::kMaxGemvRows, " rows");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  torch::Tensor bc = checked_bias(bias, w.size(0), "gemv_f32");
  const float* bias_ptr = bc.defined() ? bc.data_ptr<float>() : nullptr;
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  th_transformer::gemv_f32(xc.data_ptr<float>(), wc.data_ptr<float>(), bias_ptr, y.data_ptr<float>(), x.size(0),
                           w.size(1), w.size(0));
  return y;
}

torch::Tensor gemv_i8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                      const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "gemv_i8: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kChar && scale.scalar_type() == torch::kFloat,
              "gemv_i8: fp32 x, int8 w, fp32 scale");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv_i8: shapes [rows, in] x [out, in]");
  TORCH_CHECK(scale.numel() == w.size(0), "gemv_i8: one scale per output row");
  TORCH_CHECK(x.size(0) <= th_transformer::kMaxGemvRows, "gemv_i8: at most ", th_transformer::kMaxGemvRows, " rows");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  torch::Tensor bc = checked_bias(bias, w.size(0), "gemv_i8");
  const float* bias_ptr = bc.defined() ? bc.data_ptr<float>() : nullptr;
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  th_transformer::gemv_i8(xc.data_ptr<float>(), wc.data_ptr<int8_t>(), sc.data_ptr<float>(), bias_ptr,
                          y.data_ptr<float>(), x.size(0), w.size(1), w.size(0));
  return y;
}

bool cpu_f32(const torch::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == torch::kFloat; }

// Rows of `hidden` values with unit stride inside a row (any row stride).
bool rows_of(const torch::Tensor& t, int64_t rows, int64_t hidden) {
  return t.dim() == 2 && t.size(0) == rows && t.size(1) == hidden && t.stride(1) == 1;
}

void rms_norm_f32(torch::Tensor& out, const c10::optional<torch::Tensor>& summed, const torch::Tensor& x,
                  const c10::optional<torch::Tensor>& residual, const torch::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(cpu_f32(x) && cpu_f32(out) && cpu_f32(weight) && rows_of(x, rows, hidden) && out.is_contiguous() &&
                  rows_of(out, rows, hidden) && weight.is_contiguous() && weight.numel() == hidden,
              "rms_norm_f32: fp32 CPU x [rows, hidden], contiguous out and weight [hidden]");
  TORCH_CHECK(residual.has_value() == summed.has_value(), "rms_norm_f32: residual and summed come together");
  if (residual.has_value()) {
    TORCH_CHECK(cpu_f32(*residual) && cpu_f32(*summed) && rows_of(*residual, rows, hidden) && summed->is_contiguous() &&
                    rows_of(*summed, rows, hidden),
                "rms_norm_f32: residual / summed like x");
  }
  th_transformer::rms_norm_f32(x.data_ptr<float>(), x.stride(0), residual ? residual->data_ptr<float>() : nullptr,
                               residual ? residual->stride(0) : 0, weight.data_ptr<float>(), out.data_ptr<float>(),
                               summed ? summed->data_ptr<float>() : nullptr, rows, hidden, static_cast<float>(eps));
}

void silu_and_mul_f32(torch::Tensor& out, const torch::Tensor& gate_up) {
  TORCH_CHECK(cpu_f32(out) && cpu_f32(gate_up) && gate_up.dim() == 2 && gate_up.stride(1) == 1 &&
                  gate_up.size(1) % 2 == 0 && out.is_contiguous() && rows_of(out, gate_up.size(0), gate_up.size(1) / 2),
              "silu_and_mul_f32: fp32 CPU gate_up [rows, 2 * width], out [rows, width]");
  th_transformer::silu_and_mul_f32(gate_up.data_ptr<float>(), gate_up.stride(0), out.data_ptr<float>(),
                                   gate_up.size(0), gate_up.size(1) / 2);
}

bool heads_rows(const torch::Tensor& t, int64_t rows, int64_t heads, int64_t head_dim) {
  return t.dim() == 3 && t.size(0) == rows && t.size(1) == heads && t.size(2) == head_dim && t.stride(2) == 1 &&
         t.stride(1) == head_dim;
}

void rotary_write_kv_f32(torch::Tensor& q, const torch::Tensor& qk, const torch::Tensor& v, torch::Tensor& k_cache,
                         torch::Tensor& v_cache, const torch::Tensor& slots, const torch::Tensor& cos,
                         const torch::Tensor& sin, int64_t rotary_dim) {
  const int64_t tokens = qk.size(0), q_heads = q.size(1), head_dim = qk.size(2), kv_heads = v.size(1);
  TORCH_CHECK(cpu_f32(q) && cpu_f32(qk) && cpu_f32(v) && cpu_f32(k_cache) && cpu_f32(v_cache) && cpu_f32(cos) &&
                  cpu_f32(sin),
              "rotary_write_kv_f32: fp32 CPU tensors");
  TORCH_CHECK(heads_rows(qk, tokens, q_heads + kv_heads, head_dim) && heads_rows(v, tokens, kv_heads, head_dim) &&
                  q.is_contiguous() && heads_rows(q, tokens, q_heads, head_dim),
              "rotary_write_kv_f32: qk [tokens, q_heads + kv_heads, head_dim], v [tokens, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.dim() == 4 && k_cache.size(2) == kv_heads && k_cache.size(3) == head_dim,
              "rotary_write_kv_f32: contiguous caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == torch::kLong && slots.is_contiguous() &&
                  slots.numel() == tokens,
              "rotary_write_kv_f32: slot_mapping [tokens] int64");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == tokens && cos.size(1) >= rotary_dim / 2 &&
                  cos.stride(1) == 1 && sin.stride(1) == 1 && cos.stride(0) == sin.stride(0),
              "rotary_write_kv_f32: cos / sin [tokens, >= rotary_dim / 2], one row stride");
  th_transformer::RotaryKvArgs args{qk.data_ptr<float>(), qk.stride(0), v.data_ptr<float>(), v.stride(0),
                                    cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0),
                                    slots.data_ptr<int64_t>(), q.data_ptr<float>(), k_cache.data_ptr<float>(),
                                    v_cache.data_ptr<float>(), tokens, q_heads, kv_heads, head_dim, rotary_dim};
  th_transformer::rotary_write_kv_f32(args);
}

void paged_decode_attention_f32(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                                const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                const torch::Tensor& seq_lens, double scale, int64_t window) {
  const int64_t seqs = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(cpu_f32(out) && cpu_f32(q) && cpu_f32(k_cache) && cpu_f32(v_cache), "paged_decode_attention_f32: fp32 CPU");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == head_dim && out.is_contiguous() &&
                  out.sizes() == q.sizes(),
              "paged_decode_attention_f32: q [seqs, heads, head_dim] (heads contiguous), out like q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.dim() == 4 && k_cache.size(3) == head_dim && heads % k_cache.size(2) == 0,
              "paged_decode_attention_f32: contiguous caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.scalar_type() == torch::kInt &&
                  block_tables.is_contiguous() && block_tables.dim() == 2 && block_tables.size(0) == seqs &&
                  seq_lens.device().is_cpu() && seq_lens.scalar_type() == torch::kInt && seq_lens.is_contiguous() &&
                  seq_lens.numel() == seqs,
              "paged_decode_attention_f32: block_tables [seqs, max_blocks] and seq_lens [seqs] int32");
  th_transformer::DecodeAttentionArgs args{q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(),
                                           v_cache.data_ptr<float>(), block_tables.data_ptr<int32_t>(),
                                           block_tables.size(1), seq_lens.data_ptr<int32_t>(), out.data_ptr<float>(),
                                           seqs, heads, k_cache.size(2), head_dim, k_cache.size(1),
                                           static_cast<float>(scale), window};
  th_transformer::paged_decode_attention_f32(args);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maga_transformer C++ runtime: CPU kernels, and the CUDA kernels in the CUDA build";
  m.def("gemv_f32", &gemv_f32, "y = x @ w.T (+ bias) for at most 16 fp32 rows", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("gemv_i8", &gemv_i8, "y = scale * (x @ w.T) (+ bias), int8 w, for at most 16 fp32 rows",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scale"), pybind11::arg("bias") = pybind11::none());
  m.attr("max_gemv_rows") = th_transformer::kMaxGemvRows;
  m.def("rms_norm_f32", &rms_norm_f32, "out = rms_norm(x (+ residual -> summed)) * weight, fp32 rows",
        pybind11::arg("out"), pybind11::arg("summed"), pybind11::arg("x"), pybind11::arg("residual"),
        pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("silu_and_mul_f32", &silu_and_mul_f32, "out = silu(gate) * up for fp32 rows of [gate | up]",
        pybind11::arg("out"), pybind11::arg("gate_up"));
  m.def("rotary_write_kv_f32", &rotary_write_kv_f32, "NeoX rotary of q and k, rotated k and v written to the caches",
        pybind11::arg("q"), pybind11::arg("qk"), pybind11::arg("v"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("slot_mapping"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("rotary_dim"));
  m.def("paged_decode_attention_f32", &paged_decode_attention_f32, "one query per sequence over its paged keys",
        pybind11::arg("out"), pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("block_tables"), pybind11::arg("seq_lens"), pybind11::arg("scale"), pybind11::arg("window"));
#ifdef MAGA_WITH_CUDA
  th_transformer::register_cuda_ops(m);
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
