// Host stand-in for <cuda_runtime_api.h> (tests/kernels/cuda_emu): the slice of the runtime API
// the saq launchers call. Launches run synchronously on the calling thread; the "device" has
// SAQ_CUDA_EMU_SMS multiprocessors (default 3), which sets the grid of the grid-stride kernels
// (few SMs: few blocks, so every block loops several times).
#pragma once
#include <cstddef>
#include <cstdlib>
#include <cstring>

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  const char* e = std::getenv("SAQ_CUDA_EMU_SMS");
  *v = e ? std::atoi(e) : 3;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
