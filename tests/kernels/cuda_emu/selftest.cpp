// Self-test of the CUDA emulation (include/emu_device.h), without torch: each case is one launch
// that a GPU would run correctly (ok_*) or fault / hang on (the others, which must abort with
// the emulator's message). tests/kernels/test_cuda_emulation.py runs every case.
//   selftest CASE   ->  exit 0 and "ok <value>" on stdout, or abort with "cuda_emu: ..." on stderr
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "reduce.cuh"  // the real block reduction of csrc/cuda

using saq::cuda::detail::block_sum;

// Sum of in[0..n) by a grid-stride loop and the real block_sum: one partial per block.
__global__ void partial_sums(const double* in, long n, double* partials) {
  __shared__ double smem[32];
  double acc = 0.0;
  for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) acc += in[i];
  const double r = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

// Thread 0 skips the barrier that the others wait at.
__global__ void divergent_sync(int* out) {
  if (threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = 1;
}

// Half a warp shuffles.
__global__ void partial_warp_shuffle(float* out) {
  float v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void misaligned_load(const char* base, unsigned* out) {
  const uint4 v = __ldca(reinterpret_cast<const uint4*>(base + 4));
  out[threadIdx.x] = v.x;
}

int main(int argc, char** argv) {
  const std::string c = argc > 1 ? argv[1] : "";
  if (c == "ok_block_sum") {
    const long n = 100003;
    std::vector<double> in(n);
    for (long i = 0; i < n; ++i) in[i] = static_cast<double>(i % 97);
    std::vector<double> partials(5, 0.0);
    emu_launch(dim3(5), dim3(256), [&] { partial_sums(in.data(), n, partials.data()); });
    double total = 0.0;
    for (double p : partials) total += p;
    std::printf("ok %.0f\n", total);
    return 0;
  }
  std::vector<int> ints(1024);
  std::vector<float> floats(1024);
  alignas(16) char bytes[64] = {};
  std::vector<unsigned> words(64);
  if (c == "divergent_sync") {
    emu_launch(dim3(2), dim3(64), [&] { divergent_sync(ints.data()); });
  } else if (c == "partial_warp_shuffle") {
    emu_launch(dim3(1), dim3(64), [&] { partial_warp_shuffle(floats.data()); });
  } else if (c == "misaligned_load") {
    emu_launch(dim3(1), dim3(32), [&] { misaligned_load(bytes, words.data()); });
  } else if (c == "block_too_large") {
    emu_launch(dim3(1), dim3(2048), [&] { divergent_sync(ints.data()); });
  } else if (c == "block_not_warp_multiple") {
    emu_launch(dim3(1), dim3(48), [&] { divergent_sync(ints.data()); });
  } else if (c == "grid_y_too_large") {
    emu_launch(dim3(1, 70000), dim3(32), [&] { divergent_sync(ints.data()); });
  } else if (c == "empty_grid") {
    emu_launch(dim3(0), dim3(32), [&] { divergent_sync(ints.data()); });
  } else {
    std::fprintf(stderr, "selftest: unknown case '%s'\n", c.c_str());
    return 2;
  }
  std::printf("no fault\n");
  return 0;
}
