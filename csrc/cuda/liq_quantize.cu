// liq_quantize (the LIQ quantizer of SAQ), CUDA kernels: forward and backward, signed / unsigned,
// optional fused weight standardization and SAM perturbation (saq_kernels/OPS.md). Element math is
// saq::liq_forward / saq::liq_backward (csrc/common/saq_math.h).
//
// standardize: a statistics pass sums x and x^2 in fp64 per thread (the variance is
// sum(x^2) - sum(x) * mean, which cancels in fp32 when |mean| >> std), reduces them
// deterministically (reduce.cuh), and a one-block kernel writes (mean, std) as fp32 into the
// workspace; the quantize pass reads them from there. Forward and backward recompute the same
// statistics bit for bit (same grid, same order), so both see the same constants.
#include "common.cuh"
#include "reduce.cuh"

namespace saq {
namespace cuda {
namespace {

using detail::kThreads;
using detail::to_f;
using namespace detail::input_mode;

struct LiqKernelArgs {
  const float* clip;
  const float* s;      // perturbation scale, read when mode != kNoPerturb
  const float* stats;  // (mean, std) when standardize, else unused
  int64_t n;
  float levels;        // 2^bits - 1
  int mode;
  bool is_signed;
  bool relu;  // unsigned only: absorbed ReLU, open lower end of the backward's range
  bool standardize;
};

// The quantizer input: x, or x + s*e formed in fp32 (Case 2).
__device__ __forceinline__ float liq_input(float x, float e, float s, int mode) {
  return mode == kBefore ? saq::add_scaled(x, s, e) : x;
}

template <typename TE, int N>
__device__ __forceinline__ void load_perturbation(const TE* __restrict__ e, int64_t i0, int mode,
                                                  float (&ev)[N]) {
  if (mode != kNoPerturb) {
    detail::load_vec<TE, N>(e + i0, ev);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) ev[k] = 0.0f;
  }
}

// The flags a kernel branches on. kPlain instantiations serve the activation quantizer's case
// (unsigned, not standardized, not perturbed: nearly all of a QAT step's LIQ elements) with the
// flags as compile-time constants, so that loop carries no code or branches of the other cases;
// the other instantiations read them from the arguments.
struct Flags {
  bool is_signed;
  bool standardize;
  int mode;
};

template <bool kPlain>
__device__ __forceinline__ Flags flags(const LiqKernelArgs& a) {
  if (kPlain) return Flags{false, false, kNoPerturb};
  return Flags{a.is_signed, a.standardize, a.mode};
}

// ---------------------------------------------------------------------------------------------
// statistics: partials[b] = sum of the quantizer inputs of block b, partials[G + b] = sum of
// their squares (fp64).
// ---------------------------------------------------------------------------------------------
template <typename T, typename TE>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    liq_stats_kernel(const T* __restrict__ x, const TE* __restrict__ e, const LiqKernelArgs a,
                     double* __restrict__ partials) {
  constexpr int N = detail::Vec<T>::N;
  __shared__ double smem[64];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float s = a.mode == kBefore ? __ldg(a.s) : 0.0f;
  const int mode = a.mode == kBefore ? kBefore : kNoPerturb;  // Case 1/3 standardize x alone
  double sum = 0.0, sq = 0.0;
  const bool vec = detail::aligned16(x) && (mode == kNoPerturb || detail::aligned16(e));
  const int64_t nvec = vec ? a.n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i0 = v * N;
    float xv[N], ev[N];
    detail::load_vec<T, N>(x + i0, xv);
    load_perturbation<TE, N>(e, i0, mode, ev);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const double xp = static_cast<double>(liq_input(xv[k], ev[k], s, mode));
      sum += xp;
      sq += xp * xp;
    }
  }
  for (int64_t i = nvec * N + tid; i < a.n; i += stride) {
    const float ev = mode == kBefore ? to_f(e[i]) : 0.0f;
    const double xp = static_cast<double>(liq_input(to_f(x[i]), ev, s, mode));
    sum += xp;
    sq += xp * xp;
  }
  detail::block_sum2(sum, sq, smem);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum;
    partials[gridDim.x + blockIdx.x] = sq;
  }
}

// stats[0] = mean, stats[1] = unbiased std (NaN for a single element, as torch.std).
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    liq_stats_finish(const double* __restrict__ partials, int nblocks, int64_t n,
                     float* __restrict__ stats) {
  __shared__ double smem[32];
  const double sum = detail::ordered_sum(partials, nblocks, smem);
  const double sq = detail::ordered_sum(partials + nblocks, nblocks, smem);
  if (threadIdx.x == 0) {
    const double count = static_cast<double>(n);
    const double mean = sum / count;
    double var = (sq - sum * mean) / (count - 1.0);  // 0/0 = NaN when n == 1
    if (var < 0.0) var = 0.0;                        // rounding of a constant tensor
    stats[0] = static_cast<float>(mean);
    stats[1] = static_cast<float>(sqrt(var));
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename T, typename TE, bool kPlain>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    liq_fwd_kernel(const T* __restrict__ x, const TE* __restrict__ e, T* __restrict__ y,
                   const LiqKernelArgs a) {
  constexpr int N = detail::Vec<T>::N;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const Flags f = flags<kPlain>(a);
  const float s = f.mode != kNoPerturb ? __ldg(a.s) : 0.0f;
  const float c = fabsf(__ldg(a.clip));
  const float mean = f.standardize ? __ldg(a.stats) : 0.0f;
  const float stdv = f.standardize ? __ldg(a.stats + 1) : 1.0f;

  auto elem = [&](float x, float e) {
    float xs = liq_input(x, e, s, f.mode);
    if (f.standardize) xs = (xs - mean) / stdv;
    const float yv = saq::liq_forward(xs, c, a.levels, f.is_signed);
    return f.mode == kAfter ? saq::add_scaled(yv, s, e) : yv;
  };

  const bool vec = detail::aligned16(x) && detail::aligned16(y) &&
                   (f.mode == kNoPerturb || detail::aligned16(e));
  const int64_t nvec = vec ? a.n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i0 = v * N;
    float xv[N], ev[N], out[N];
    detail::load_vec<T, N>(x + i0, xv);
    load_perturbation<TE, N>(e, i0, f.mode, ev);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = elem(xv[k], ev[k]);
    detail::store_vec<T, N>(y + i0, out);
  }
  for (int64_t i = nvec * N + tid; i < a.n; i += stride) {
    const float ev = f.mode != kNoPerturb ? to_f(e[i]) : 0.0f;
    y[i] = detail::from_f<T>(elem(to_f(x[i]), ev));
  }
}

// ---------------------------------------------------------------------------------------------
// backward: dx, and partials[b] = block b's sum of the clip-gradient terms (fp64). mode is
// kNoPerturb or kBefore.
// ---------------------------------------------------------------------------------------------
template <typename T, typename TE, bool kPlain>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    liq_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const TE* __restrict__ e,
                   T* __restrict__ dx, const LiqKernelArgs a, double* __restrict__ partials) {
  constexpr int N = detail::Vec<T>::N;
  __shared__ double smem[32];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const Flags f = flags<kPlain>(a);
  const float s = f.mode == kBefore ? __ldg(a.s) : 0.0f;
  const float c = fabsf(__ldg(a.clip));
  const float mean = f.standardize ? __ldg(a.stats) : 0.0f;
  const float stdv = f.standardize ? __ldg(a.stats + 1) : 1.0f;

  auto elem = [&](float x, float e, float gv, float& acc) {
    float xs = liq_input(x, e, s, f.mode);
    if (f.standardize) xs = (xs - mean) / stdv;
    float d, dc;
    saq::liq_backward(xs, gv, c, a.levels, f.is_signed, &d, &dc, a.relu);
    acc += dc;
    return f.standardize ? d / stdv : d;  // statistics are constants of the backward
  };

  double acc = 0.0;
  const bool vec = detail::aligned16(g) && detail::aligned16(x) && detail::aligned16(dx) &&
                   (f.mode == kNoPerturb || detail::aligned16(e));
  const int64_t nvec = vec ? a.n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i0 = v * N;
    float gv[N], xv[N], ev[N], out[N];
    detail::load_vec<T, N>(g + i0, gv);
    detail::load_vec<T, N>(x + i0, xv);
    load_perturbation<TE, N>(e, i0, f.mode, ev);
    float acc_v = 0.0f;  // N terms in fp32, one fp64 add per vector
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = elem(xv[k], ev[k], gv[k], acc_v);
    detail::store_vec<T, N>(dx + i0, out);
    acc += acc_v;
  }
  for (int64_t i = nvec * N + tid; i < a.n; i += stride) {
    const float ev = f.mode == kBefore ? to_f(e[i]) : 0.0f;
    float acc_v = 0.0f;
    dx[i] = detail::from_f<T>(elem(to_f(x[i]), ev, to_f(g[i]), acc_v));
    acc += acc_v;
  }
  acc = detail::block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// dclip = sum(partials) * sign(clip).
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    liq_bwd_finish(const double* __restrict__ partials, int nblocks,
                   const float* __restrict__ clip, float* __restrict__ dclip) {
  __shared__ double smem[32];
  const double sum = detail::ordered_sum(partials, nblocks, smem);
  if (threadIdx.x == 0) {
    const float cl = clip[0];
    const float sign = cl > 0.0f ? 1.0f : (cl < 0.0f ? -1.0f : 0.0f);
    dclip[0] = static_cast<float>(sum) * sign;
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
// Blocks of every LIQ kernel of one call (the same for the statistics of forward and backward).
int liq_grid(const LiqArgs& a) {
  const int64_t n_per_vec = a.dtype == DType::kFloat ? 4 : 8;
  return detail::grid_for((a.numel + n_per_vec - 1) / n_per_vec, kThreads, 8);
}

// Workspace layout (bytes): [0, 16G) statistics partials (2G doubles), [16G, 16G + 16) (mean,
// std) fp32, [16G + 16, 24G + 16) backward partials (G doubles).
struct Workspace {
  double* stats_partials;
  float* stats;
  double* bwd_partials;
};

Workspace carve(void* base, int grid) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.stats_partials = reinterpret_cast<double*>(p);
  w.stats = reinterpret_cast<float*>(p + 16 * static_cast<size_t>(grid));
  w.bwd_partials = reinterpret_cast<double*>(p + 16 * static_cast<size_t>(grid) + 16);
  return w;
}

LiqKernelArgs kernel_args(const LiqArgs& a, const Workspace& w, bool backward) {
  LiqKernelArgs k;
  k.clip = a.clip;
  k.s = a.perturb_scale;
  k.stats = w.stats;
  k.n = a.numel;
  k.levels = static_cast<float>((1 << a.bits) - 1);
  k.is_signed = a.is_signed;
  k.relu = a.relu;
  k.standardize = a.standardize;
  k.mode = detail::perturb_mode(a.perturbation, a.perturb_before, backward);
  return k;
}

// The activation quantizer's case, served by the kPlain kernels.
bool is_plain(const LiqKernelArgs& k) {
  return !k.is_signed && !k.standardize && k.mode == kNoPerturb;
}

template <typename T, typename TE>
cudaError_t launch_stats(const LiqArgs& a, const LiqKernelArgs& k, const Workspace& w, int grid,
                         cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const TE* e = static_cast<const TE*>(a.perturbation);
  liq_stats_kernel<T, TE><<<grid, kThreads, 0, stream>>>(x, e, k, w.stats_partials);
  liq_stats_finish<<<1, kThreads, 0, stream>>>(w.stats_partials, grid, a.numel, w.stats);
  return cudaGetLastError();
}

}  // namespace

size_t liq_quantize_workspace_bytes(const LiqArgs& a) {
  if (a.numel == 0) return 0;
  return 24 * static_cast<size_t>(liq_grid(a)) + 16;
}

cudaError_t liq_quantize_fwd(const LiqArgs& a, void* y, void* workspace, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  if (a.bits < 1 || a.bits > 16) return cudaErrorInvalidValue;
  const int grid = liq_grid(a);
  const Workspace w = carve(workspace, grid);
  const LiqKernelArgs k = kernel_args(a, w, /*backward=*/false);
  return detail::dispatch_x_e(a.dtype, k.mode != kNoPerturb && a.perturbation_fp32, [&](auto t, auto te) {
    using T = typename decltype(t)::type;
    using TE = typename decltype(te)::type;
    if (a.standardize) {
      const cudaError_t err = launch_stats<T, TE>(a, k, w, grid, stream);
      if (err != cudaSuccess) return err;
    }
    if (is_plain(k)) {
      liq_fwd_kernel<T, T, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(a.x), nullptr, static_cast<T*>(y), k);
    } else {
      liq_fwd_kernel<T, TE, false><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(a.x), static_cast<const TE*>(a.perturbation), static_cast<T*>(y), k);
    }
    return cudaGetLastError();
  });
}

cudaError_t liq_quantize_bwd(const LiqArgs& a, const void* grad, void* dx, float* dclip,
                             void* workspace, cudaStream_t stream) {
  if (a.numel == 0) return cudaMemsetAsync(dclip, 0, sizeof(float), stream);
  if (a.bits < 1 || a.bits > 16) return cudaErrorInvalidValue;
  const int grid = liq_grid(a);
  const Workspace w = carve(workspace, grid);
  const LiqKernelArgs k = kernel_args(a, w, /*backward=*/true);
  const void* e_ptr = k.mode == kBefore ? a.perturbation : nullptr;
  return detail::dispatch_x_e(a.dtype, k.mode == kBefore && a.perturbation_fp32, [&](auto t, auto te) {
    using T = typename decltype(t)::type;
    using TE = typename decltype(te)::type;
    if (a.standardize) {
      const cudaError_t err = launch_stats<T, TE>(a, k, w, grid, stream);
      if (err != cudaSuccess) return err;
    }
    if (is_plain(k)) {
      liq_bwd_kernel<T, T, true><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(a.x), nullptr, static_cast<T*>(dx),
          k, w.bwd_partials);
    } else {
      liq_bwd_kernel<T, TE, false><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(a.x), static_cast<const TE*>(e_ptr),
          static_cast<T*>(dx), k, w.bwd_partials);
    }
    liq_bwd_finish<<<1, kThreads, 0, stream>>>(w.bwd_partials, grid, a.clip, dclip);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace saq
