// Host stand-in for <c10/cuda/CUDAStream.h> (tests/kernels/cuda_emu): one null stream.
#pragma once
#include <cuda_runtime_api.h>
namespace c10 {
namespace cuda {
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream(signed char = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
