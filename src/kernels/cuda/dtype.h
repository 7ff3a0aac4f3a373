// Element types the CUDA kernels take, named without torch so the kernels build with nvcc alone
// (Bazel has no torch headers). The bindings map torch's dtypes onto these.
#pragma once

namespace th_transformer {
namespace cuda {

// kInt8 and kFloat8E4M3 are storage types of a quantized KV cache only.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kFloat8E4M3 = 4 };

inline int dtype_size(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : (dtype == DType::kInt8 || dtype == DType::kFloat8E4M3) ? 1 : 2;
}

}  // namespace cuda
}  // namespace th_transformer
