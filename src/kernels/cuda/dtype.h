// Element types the CUDA kernels take, named without torch so the kernels build with nvcc alone
// (Bazel has no torch headers). The bindings map torch's dtypes onto these.
#pragma once

namespace th_transformer {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace cuda
}  // namespace th_transformer
