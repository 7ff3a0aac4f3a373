// Kernel launches with programmatic dependent launch (PDL, compute capability 9.0 and up).
//
// A batch-1 decode step is ~11 small kernels a layer, and between two of them the GPU drains one
// grid and ramps up the next. With PDL a kernel may start while its predecessor in the stream is
// still running: it does what does not depend on earlier kernels (the GEMV starts streaming its
// weight), then waits in `wait_for_upstream()` until the predecessor has finished and its writes
// are visible. The same holds inside CUDA graphs (stream capture keeps the edges programmatic).
//
// Rules for a kernel launched through `launch_kernel`:
// - before `wait_for_upstream()` it reads only data that no kernel launched this way writes: model
//   weights, and a step's metadata (sequence lengths, block tables), which copies and torch ops
//   write before the step's first kernel. A kernel that starts early may overlap kernels further
//   upstream than its direct predecessor, but never an ordinarily launched kernel or a copy: those
//   complete before anything after them starts;
// - it writes nothing before `wait_for_upstream()`;
// - every CTA calls `wait_for_upstream()` before it reads or writes activations, and at least one
//   CTA of every launch calls it, so the kernel's completion implies its predecessor's (the
//   ordering downstream kernels rely on).
// `allow_downstream_launch()` lets the next kernel's CTAs be scheduled; without it that happens as
// this kernel's CTAs exit. MAGA_DISABLE_PDL=1 launches plainly (A/B measurements); devices below
// 9.0 always do.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace th_transformer {
namespace cuda {

__device__ __forceinline__ void wait_for_upstream() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_downstream_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether kernels on the current device launch with PDL (cached per device).
inline bool pdl_enabled() {
  static const bool disabled = [] {
    const char* env = std::getenv("MAGA_DISABLE_PDL");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  if (disabled) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> capable[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  int state = capable[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    state = major >= 9 ? 2 : 1;
    capable[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL where enabled; returns the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace th_transformer
