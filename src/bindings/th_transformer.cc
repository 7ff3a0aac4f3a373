// The one Python module of the C++ runtime; only maga_transformer/ops imports it.
#include <torch/extension.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maga_transformer C++ runtime: CPU kernels, and the CUDA kernels in the CUDA build";
  m.def("gemv_f32", &gemv_f32, "y = x @ w.T (+ bias) for at most 16 fp32 rows", pybind11::arg("x"),
        pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("gemv_i8", &gemv_i8, "y = scale * (x @ w.T) (+ bias), int8 w, for at most 16 fp32 rows",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scale"), pybind11::arg("bias") = pybind11::none());
  m.attr("max_gemv_rows") = th_transformer::kMaxGemvRows;
#ifdef MAGA_WITH_CUDA
  th_transformer::register_cuda_ops(m);
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
