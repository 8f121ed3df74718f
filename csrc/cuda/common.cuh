// Device helpers shared by the saq CUDA kernels: dtype conversion, 16-byte vector loads/stores,
// launch geometry. No torch headers (each .cu compiles with nvcc alone).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "../common/saq_math.h"
#include "launchers.h"

// The pinned numerics (saq_kernels/OPS.md) need IEEE division and rintf: --use_fast_math would make
// 1/scale and x/c approximate and change quantized codes.
#if defined(__USE_FAST_MATH__)
#error "saq CUDA kernels must not be compiled with --use_fast_math (it changes quantized codes)"
#endif

namespace saq {
namespace cuda {
namespace detail {

// 256 threads per block. kMinBlocks = 4 in __launch_bounds__ lets ptxas use up to 64 registers:
// left to itself it may squeeze a kernel to 32 registers (full occupancy) and spill, e.g.
// liq_stats_kernel<f16> on sm_90 with -fmad=false (nvcc 13.0): 4-8 bytes of spills at 32.
// 4 blocks (1024 threads, each with a 16-byte load in flight) already saturate HBM.
constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;

// ---------------------------------------------------------------------------------------------
// Scalar conversions: all math is fp32, storage is T. float -> T rounds to nearest even.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round an fp32 value to T and back: what a torch op computing in fp32 and storing T does.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

// Unpack / pack one 32-bit word: 1 float or 2 halves / bfloat16s (low half first).
template <typename T>
struct Word;
template <>
struct Word<float> {
  static constexpr int kPer = 1;
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) { f[0] = __uint_as_float(w); }
  static __device__ __forceinline__ uint32_t pack(const float* f) { return __float_as_uint(f[0]); }
};
template <>
struct Word<__half> {
  static constexpr int kPer = 2;
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) {
    f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(const float* f) {
    uint32_t lo = __half_as_ushort(__float2half_rn(f[0]));
    uint32_t hi = __half_as_ushort(__float2half_rn(f[1]));
    return lo | (hi << 16);
  }
};
template <>
struct Word<__nv_bfloat16> {
  static constexpr int kPer = 2;
  // bf16 is the top half of an fp32: widening is a shift.
  static __device__ __forceinline__ void unpack(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack(const float* f) {
    uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
    uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[1]));
    return lo | (hi << 16);
  }
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// One 16-byte vector of T (4 floats or 8 halves / bfloat16s).
template <typename T>
struct Vec {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Raw 16-byte accesses; p must be 16-byte aligned. The cache-operator intrinsics emit one
// v4 instruction each. A plain `*(uint4*)p = v` is an aggregate store that the compiler may
// split into four 32-bit stores (seen in fq_bwd_channel_kernel, nvcc 13.0: STG.E x4).
// ldg16: read-only (non-coherent) path, for data the kernel never writes.
// ld16: coherent default-cached load, for data the same kernel later overwrites.
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld16(const void* p) { return __ldca(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { __stwb(reinterpret_cast<uint4*>(p), v); }

// f[0..4*kPer) = the elements of one raw vector.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* f) {
  constexpr int P = Word<T>::kPer;
  Word<T>::unpack(v.x, f);
  Word<T>::unpack(v.y, f + P);
  Word<T>::unpack(v.z, f + 2 * P);
  Word<T>::unpack(v.w, f + 3 * P);
}
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* f) {
  constexpr int P = Word<T>::kPer;
  uint4 v;
  v.x = Word<T>::pack(f);
  v.y = Word<T>::pack(f + P);
  v.z = Word<T>::pack(f + 2 * P);
  v.w = Word<T>::pack(f + 3 * P);
  return v;
}

// Load N consecutive elements of T as floats with 16-byte loads: N * sizeof(T) must be a
// multiple of 16 and p 16-byte aligned (e.g. N = 8 fp32 perturbation values = two loads).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&f)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "load_vec: N elements must fill whole 16-byte vectors");
  constexpr int kLoads = static_cast<int>(N * sizeof(T) / 16);
  constexpr int kPerLoad = N / kLoads;
#pragma unroll
  for (int w = 0; w < kLoads; ++w) unpack16<T>(ldg16(p + w * kPerLoad), f + w * kPerLoad);
}
// The same through coherent loads, for tensors the kernel also writes (ld.global.nc requires
// the data to be read-only for the whole kernel).
template <typename T, int N>
__device__ __forceinline__ void load_vec_rw(const T* __restrict__ p, float (&f)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "load_vec_rw: N elements must fill whole 16-byte vectors");
  constexpr int kLoads = static_cast<int>(N * sizeof(T) / 16);
  constexpr int kPerLoad = N / kLoads;
#pragma unroll
  for (int w = 0; w < kLoads; ++w) unpack16<T>(ld16(p + w * kPerLoad), f + w * kPerLoad);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&f)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "store_vec: N elements must fill whole 16-byte vectors");
  constexpr int kStores = static_cast<int>(N * sizeof(T) / 16);
  constexpr int kPerStore = N / kStores;
#pragma unroll
  for (int w = 0; w < kStores; ++w) st16(p + w * kPerStore, pack16<T>(f + w * kPerStore));
}

// Division by a run-time invariant 64-bit divisor without a division instruction sequence
// (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994, fig. 4.1;
// valid for every 0 <= n < 2^64 and 1 <= d < 2^64). The host computes the magic number once per
// launch; the device needs one 64-bit mulhi, two shifts and an add. A plain 64-bit `/` compiles
// to a called subroutine whose ABI spills registers to the stack (seen on sm_80, nvcc 13.0).
struct FastDivmod {
  uint64_t d;
  uint64_t m;
  uint32_t s1, s2;

  static __host__ FastDivmod make(uint64_t divisor) {
    FastDivmod f;
    f.d = divisor < 1 ? 1 : divisor;
    uint32_t l = 0;  // ceil(log2(d))
    while (l < 64 && (static_cast<uint64_t>(1) << l) < f.d) ++l;
    const unsigned __int128 two_l = static_cast<unsigned __int128>(1) << l;
    const unsigned __int128 num = (two_l - f.d) << 64;
    f.m = static_cast<uint64_t>(num / f.d + 1);
    f.s1 = l < 1 ? l : 1;
    f.s2 = l > 0 ? l - 1 : 0;
    return f;
  }

  __device__ __forceinline__ uint64_t div(uint64_t n) const {
    const uint64_t t = __umul64hi(m, n);
    return (t + ((n - t) >> s1)) >> s2;
  }
  __device__ __forceinline__ void divmod(uint64_t n, uint64_t& q, uint64_t& r) const {
    q = div(n);
    r = n - q * d;
  }
};

// ---------------------------------------------------------------------------------------------
// Host-side launch geometry.
// ---------------------------------------------------------------------------------------------
// Multiprocessors of the current device, cached per device. cudaDeviceGetAttribute is not a
// stream operation, so this is legal during CUDA-graph capture. Grids (and with them the number
// of partial sums of a reduction) depend on it, so results are reproducible per device model.
inline int num_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // zero-initialized: static storage
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();  // do not leave this error for the launch check to report
    return 1;
  }
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v < 1) {
      (void)cudaGetLastError();
      v = 1;
    }
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Blocks for a grid-stride loop over `work` items with `threads` per block: enough to fill the
// device once (blocks_per_sm resident blocks per SM), never more than the work needs.
inline int grid_for(int64_t work, int threads, int blocks_per_sm) {
  int64_t need = (work + threads - 1) / threads;
  int64_t cap = static_cast<int64_t>(num_sms()) * blocks_per_sm;
  int64_t g = need < cap ? need : cap;
  return static_cast<int>(g < 1 ? 1 : g);
}

// ---------------------------------------------------------------------------------------------
// How a quantizer kernel reads its input: x, x + s*e (Case 2), Q(x) + s*e (Cases 1/3), or
// relu(x) (fake_quantize(relu=True); never with a perturbation).
// ---------------------------------------------------------------------------------------------
namespace input_mode {  // `using namespace detail::input_mode;` in the quantizer .cu files
enum InputMode : int { kNoPerturb = 0, kBefore = 1, kAfter = 2, kRelu = 3 };

// Only the perturbed modes read e and s (their pointers are null otherwise).
__host__ __device__ __forceinline__ bool reads_e(int mode) {
  return mode == kBefore || mode == kAfter;
}
}  // namespace input_mode

// The mode of a perturbed (or plain) launch; the backward of Q(x) + s*e does not read e.
inline int perturb_mode(const void* perturbation, bool before, bool backward) {
  using namespace input_mode;
  if (perturbation == nullptr) return kNoPerturb;
  if (before) return kBefore;
  return backward ? kNoPerturb : kAfter;
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch of the launchers: f(Tag<T>{}) with T the kernel's element type
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the element type T of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(Tag<float>{});
    case DType::kHalf:
      return f(Tag<__half>{});
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Tag<T>{}, Tag<TE>{}) for the element type T of x and the perturbation type TE (T, or
// float when the perturbation is fp32 and x is not): the quantizers' launchers.
template <typename F>
cudaError_t dispatch_x_e(DType dtype, bool e_fp32, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(Tag<float>{}, Tag<float>{});
    case DType::kHalf:
      return e_fp32 ? f(Tag<__half>{}, Tag<float>{}) : f(Tag<__half>{}, Tag<__half>{});
    case DType::kBFloat16:
      return e_fp32 ? f(Tag<__nv_bfloat16>{}, Tag<float>{})
                    : f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace cuda
}  // namespace saq
