// Python bindings of the CUDA kernels (compiled only in the CUDA build of th_transformer).
#pragma once

#include <torch/extension.h>

namespace th_transformer {

void register_cuda_ops(pybind11::module_& m);

}  // namespace th_transformer
