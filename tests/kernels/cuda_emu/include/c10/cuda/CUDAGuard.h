// Host stand-in for <c10/cuda/CUDAGuard.h> (tests/kernels/cuda_emu): one device, nothing to switch.
#pragma once
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(const c10::Device&) {}
};
}  // namespace cuda
}  // namespace c10
