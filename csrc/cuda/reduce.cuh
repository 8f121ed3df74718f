// Deterministic block reductions for the saq CUDA kernels.
//
// A reduction over many elements runs in two stages: each block of the main kernel sums its
// threads' private accumulators (warp shuffles in a fixed tree, then the per-warp results through
// shared memory) and writes ONE partial per block; a second tiny kernel sums the partials in a
// fixed order. Nothing uses atomics, so a result depends only on the grid size, and the grid
// depends only on the problem size and the device's multiprocessor count: the same inputs give
// the same bits on every run, and the forward and backward of one call agree.
#pragma once

#include <cuda_runtime.h>

namespace saq {
namespace cuda {
namespace detail {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in
// thread 0 only. All threads must call it. smem: at least 32 T of shared memory. Ends with a
// barrier, so the caller may reuse smem right after.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) {
    r = lane < nwarps ? smem[lane] : T(0);
    r = warp_sum(r);
  }
  __syncthreads();
  return r;
}

// Two sums at once (one barrier pair for both).
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* smem /* >= 64 T */) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < nwarps ? smem[lane] : T(0));
    b = warp_sum(lane < nwarps ? smem[32 + lane] : T(0));
  }
  __syncthreads();
}

// Second stage: out = sum of in[0..count) in a fixed order (thread t sums t, t + blockDim, ...
// sequentially, then the fixed block tree). Launch with ONE block. Accumulates in Acc.
template <typename T, typename Acc>
__device__ __forceinline__ Acc ordered_sum(const T* __restrict__ in, int64_t count, Acc* smem) {
  Acc acc = Acc(0);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += static_cast<Acc>(in[i]);
  return block_sum(acc, smem);
}

}  // namespace detail
}  // namespace cuda
}  // namespace saq
