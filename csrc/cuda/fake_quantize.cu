// fake_quantize (LSQ / LSQ+ affine fake quantization), CUDA kernels: forward and backward, per
// tensor and per channel, with the optional SAM perturbation (saq_kernels/OPS.md). Element math is
// saq::fq_forward / saq::fq_backward (csrc/common/saq_math.h), identical to the CPU kernels and
// the reference; this file only maps elements to threads.
//
// Memory: 16-byte loads/stores when every pointer is 16-byte aligned (4 fp32 or 8 fp16/bf16 per
// access), grid-stride loops, a scalar loop for the tail and for unaligned inputs. The backward
// writes dx and reduces dscale / dzero_point in the same pass (one read of grad and x), with the
// deterministic two-stage reduction of reduce.cuh (fp64 accumulators: the sums are over up to
// ~1e9 terms of mixed signs).
#include "common.cuh"
#include "reduce.cuh"

namespace saq {
namespace cuda {
namespace {

using detail::FastDivmod;
using detail::kThreads;
using detail::to_f;
using namespace detail::input_mode;

struct FqKernelArgs {
  const float* scale;
  const float* zero_point;
  const float* s;  // perturbation scale (device), read only when reads_e(mode)
  int64_t n;
  int64_t channels;
  int64_t inner;
  FastDivmod div_inner;     // per channel: i -> (i / inner, i % inner)
  FastDivmod div_channels;  // per channel: block -> block % C
  FastDivmod div_inner_vec; // per-channel backward: vector index -> (run, vector in run)
  float qmin, qmax, grad_factor;
  int mode;
};

// Per-(tensor|channel) constants: scale, its fp32 reciprocal, the rounded clamped zero point.
struct QParams {
  float scale, inv, zp;
};

__device__ __forceinline__ QParams load_qparams(const FqKernelArgs& a, int64_t c) {
  QParams q;
  q.scale = __ldg(a.scale + c);
  q.inv = 1.0f / q.scale;  // IEEE division (no fast math): the same inv as torch's 1.0 / scale
  q.zp = saq::clampf(saq::round_half_even(__ldg(a.zero_point + c)), a.qmin, a.qmax);
  return q;
}

// Channel of element i in the contiguous layout, (i / inner) % C, and the position of i inside
// its run of `inner` same-channel elements; next() walks to i + 1 without dividing.
struct ChannelCursor {
  uint64_t c, pos;
  __device__ __forceinline__ void seek(uint64_t i, const FqKernelArgs& a) {
    uint64_t blk, unused;
    a.div_inner.divmod(i, blk, pos);
    a.div_channels.divmod(blk, unused, c);
  }
  __device__ __forceinline__ void next(uint64_t inner, uint64_t channels) {
    if (++pos == inner) {
      pos = 0;
      if (++c == channels) c = 0;
    }
  }
};

__device__ __forceinline__ float fq_elem(float x, float e, float s, int mode, const QParams& q,
                                         float qmin, float qmax) {
  const float xp = mode == kBefore ? saq::add_scaled(x, s, e)
                   : mode == kRelu ? saq::relu_input(x)
                                   : x;
  const float y = saq::fq_forward(xp, q.scale, q.inv, q.zp, qmin, qmax);
  return mode == kAfter ? saq::add_scaled(y, s, e) : y;
}

// ---------------------------------------------------------------------------------------------
// forward: y = Q(x) [+ s*e], or Q(x + s*e)
// ---------------------------------------------------------------------------------------------
template <typename T, typename TE, bool kPerChannel>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    fq_fwd_kernel(const T* __restrict__ x, const TE* __restrict__ e, T* __restrict__ y,
                  const FqKernelArgs a) {
  constexpr int N = detail::Vec<T>::N;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float s = reads_e(a.mode) ? __ldg(a.s) : 0.0f;
  const uint64_t inner = static_cast<uint64_t>(a.inner);
  const uint64_t channels = static_cast<uint64_t>(a.channels);

  QParams q = load_qparams(a, 0);
  uint64_t cached = 0;  // channel whose constants q holds
  ChannelCursor cur{0, 0};

  const bool vec = detail::aligned16(x) && detail::aligned16(y) &&
                   (!reads_e(a.mode) || detail::aligned16(e));
  const int64_t nvec = vec ? a.n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i0 = v * N;
    float xv[N], ev[N], out[N];
    detail::load_vec<T, N>(x + i0, xv);
    if (reads_e(a.mode)) {
      detail::load_vec<TE, N>(e + i0, ev);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) ev[k] = 0.0f;
    }
    if (kPerChannel) cur.seek(static_cast<uint64_t>(i0), a);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (kPerChannel) {
        if (k > 0) cur.next(inner, channels);
        if (cur.c != cached) {
          cached = cur.c;
          q = load_qparams(a, static_cast<int64_t>(cached));
        }
      }
      out[k] = fq_elem(xv[k], ev[k], s, a.mode, q, a.qmin, a.qmax);
    }
    detail::store_vec<T, N>(y + i0, out);
  }
  for (int64_t i = nvec * N + tid; i < a.n; i += stride) {
    if (kPerChannel) {
      cur.seek(static_cast<uint64_t>(i), a);
      if (cur.c != cached) {
        cached = cur.c;
        q = load_qparams(a, static_cast<int64_t>(cached));
      }
    }
    const float ev = reads_e(a.mode) ? to_f(e[i]) : 0.0f;
    y[i] = detail::from_f<T>(fq_elem(to_f(x[i]), ev, s, a.mode, q, a.qmin, a.qmax));
  }
}

// ---------------------------------------------------------------------------------------------
// backward. mode is kNoPerturb, kBefore or kRelu (the backward of Q(x) + s*e ignores e).
// ---------------------------------------------------------------------------------------------
// One element: writes dx, accumulates the dscale / dzp terms.
__device__ __forceinline__ float fq_bwd_elem(float x, float e, float g, float s, int mode,
                                             const QParams& q, const FqKernelArgs& a, float& ds,
                                             float& dz) {
  const float xp = mode == kBefore ? saq::add_scaled(x, s, e) : x;
  float dx, dsk, dzk;
  saq::fq_backward(xp, g, q.scale, q.inv, q.zp, a.qmin, a.qmax, a.grad_factor, &dx, &dsk, &dzk,
                   mode == kRelu);
  ds += dsk;
  dz += dzk;
  return dx;
}

// Per tensor: grid-stride over all elements; partials[b] = dscale of block b,
// partials[gridDim.x + b] = dzero_point of block b.
template <typename T, typename TE>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    fq_bwd_tensor_kernel(const T* __restrict__ g, const T* __restrict__ x,
                         const TE* __restrict__ e, T* __restrict__ dx, const FqKernelArgs a,
                         double* __restrict__ partials) {
  constexpr int N = detail::Vec<T>::N;
  __shared__ double smem[64];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float s = a.mode == kBefore ? __ldg(a.s) : 0.0f;
  const QParams q = load_qparams(a, 0);
  double ds = 0.0, dz = 0.0;

  const bool vec = detail::aligned16(g) && detail::aligned16(x) && detail::aligned16(dx) &&
                   (a.mode != kBefore || detail::aligned16(e));
  const int64_t nvec = vec ? a.n / N : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i0 = v * N;
    float gv[N], xv[N], ev[N], out[N];
    detail::load_vec<T, N>(g + i0, gv);
    detail::load_vec<T, N>(x + i0, xv);
    if (a.mode == kBefore) {
      detail::load_vec<TE, N>(e + i0, ev);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) ev[k] = 0.0f;
    }
    float ds_v = 0.0f, dz_v = 0.0f;  // N terms in fp32, then one fp64 add per vector
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fq_bwd_elem(xv[k], ev[k], gv[k], s, a.mode, q, a, ds_v, dz_v);
    detail::store_vec<T, N>(dx + i0, out);
    ds += ds_v;
    dz += dz_v;
  }
  for (int64_t i = nvec * N + tid; i < a.n; i += stride) {
    float ds_v = 0.0f, dz_v = 0.0f;
    const float ev = a.mode == kBefore ? to_f(e[i]) : 0.0f;
    dx[i] = detail::from_f<T>(fq_bwd_elem(to_f(x[i]), ev, to_f(g[i]), s, a.mode, q, a, ds_v, dz_v));
    ds += ds_v;
    dz += dz_v;
  }
  detail::block_sum2(ds, dz, smem);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = ds;
    partials[gridDim.x + blockIdx.x] = dz;
  }
}

__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    fq_bwd_tensor_finish(const double* __restrict__ partials, int nblocks,
                         float* __restrict__ dscale, float* __restrict__ dzp) {
  __shared__ double smem[32];
  const double a = detail::ordered_sum(partials, nblocks, smem);
  const double b = detail::ordered_sum(partials + nblocks, nblocks, smem);
  if (threadIdx.x == 0) {
    dscale[0] = static_cast<float>(a);
    dzp[0] = static_cast<float>(b);
  }
}

// Per channel. x is viewed as [outer, C, inner]; channel c owns outer runs of `inner`
// contiguous elements. Block (b, cy) handles channels cy, cy + gridDim.y, ...; for each, the
// gridDim.x blocks of a channel split its outer * inner elements (16-byte vectors inside a run
// when inner % N == 0 and the pointers are aligned) and block b writes
// partials[c * splits + b] (dscale) and partials[(C + c) * splits + b] (dzero_point).
template <typename T, typename TE>
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    fq_bwd_channel_kernel(const T* __restrict__ g, const T* __restrict__ x,
                          const TE* __restrict__ e, T* __restrict__ dx, const FqKernelArgs a,
                          int64_t outer, double* __restrict__ partials) {
  constexpr int N = detail::Vec<T>::N;
  __shared__ double smem[64];
  const int64_t splits = gridDim.x;
  const int64_t stride = splits * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float s = a.mode == kBefore ? __ldg(a.s) : 0.0f;
  const int64_t C = a.channels;
  const int64_t inner = a.inner;
  const bool vec = (inner % N) == 0 && detail::aligned16(g) && detail::aligned16(x) &&
                   detail::aligned16(dx) && (a.mode != kBefore || detail::aligned16(e));

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const QParams q = load_qparams(a, c);
    double ds = 0.0, dz = 0.0;
    if (vec) {
      const uint64_t inner_v = static_cast<uint64_t>(inner / N);
      const int64_t mv = outer * static_cast<int64_t>(inner_v);
      for (int64_t m = first; m < mv; m += stride) {
        uint64_t o, j;
        a.div_inner_vec.divmod(static_cast<uint64_t>(m), o, j);
        const int64_t i0 = (static_cast<int64_t>(o) * C + c) * inner + static_cast<int64_t>(j) * N;
        float gv[N], xv[N], ev[N], out[N];
        detail::load_vec<T, N>(g + i0, gv);
        detail::load_vec<T, N>(x + i0, xv);
        if (a.mode == kBefore) {
          detail::load_vec<TE, N>(e + i0, ev);
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k) ev[k] = 0.0f;
        }
        float ds_v = 0.0f, dz_v = 0.0f;
#pragma unroll
        for (int k = 0; k < N; ++k)
          out[k] = fq_bwd_elem(xv[k], ev[k], gv[k], s, a.mode, q, a, ds_v, dz_v);
        detail::store_vec<T, N>(dx + i0, out);
        ds += ds_v;
        dz += dz_v;
      }
    } else {
      const int64_t m_total = outer * inner;
      for (int64_t m = first; m < m_total; m += stride) {
        uint64_t o, j;
        a.div_inner.divmod(static_cast<uint64_t>(m), o, j);
        const int64_t i = (static_cast<int64_t>(o) * C + c) * inner + static_cast<int64_t>(j);
        float ds_v = 0.0f, dz_v = 0.0f;
        const float ev = a.mode == kBefore ? to_f(e[i]) : 0.0f;
        dx[i] = detail::from_f<T>(fq_bwd_elem(to_f(x[i]), ev, to_f(g[i]), s, a.mode, q, a, ds_v, dz_v));
        ds += ds_v;
        dz += dz_v;
      }
    }
    detail::block_sum2(ds, dz, smem);  // ends with a barrier: smem is free for the next channel
    if (threadIdx.x == 0) {
      partials[c * splits + blockIdx.x] = ds;
      partials[(C + c) * splits + blockIdx.x] = dz;
    }
  }
}

// One thread per channel sums its splits in order.
__global__ void __launch_bounds__(kThreads, detail::kMinBlocks)
    fq_bwd_channel_finish(const double* __restrict__ partials, int64_t channels, int64_t splits,
                          float* __restrict__ dscale, float* __restrict__ dzp) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0.0, b = 0.0;
  for (int64_t k = 0; k < splits; ++k) {
    a += partials[c * splits + k];
    b += partials[(channels + c) * splits + k];
  }
  dscale[c] = static_cast<float>(a);
  dzp[c] = static_cast<float>(b);
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
int vec_width(DType dtype) { return dtype == DType::kFloat ? 4 : 8; }

FqKernelArgs kernel_args(const FakeQuantArgs& a, bool backward) {
  FqKernelArgs k;
  k.scale = a.scale;
  k.zero_point = a.zero_point;
  k.s = a.perturb_scale;
  k.n = a.numel;
  k.channels = a.per_channel ? a.channels : 1;
  k.inner = a.per_channel ? a.inner : 1;
  k.qmin = a.quant_min;
  k.qmax = a.quant_max;
  k.grad_factor = a.grad_factor;
  k.div_inner = FastDivmod::make(static_cast<uint64_t>(k.inner));
  k.div_channels = FastDivmod::make(static_cast<uint64_t>(k.channels));
  const int64_t n_per_vec = vec_width(a.dtype);
  k.div_inner_vec = FastDivmod::make(static_cast<uint64_t>(k.inner >= n_per_vec ? k.inner / n_per_vec : 1));
  // relu: the host refused it with a perturbation
  k.mode = a.relu ? kRelu : detail::perturb_mode(a.perturbation, a.perturb_before, backward);
  return k;
}

// Backward geometry, from sizes only (the workspace size must not depend on pointers).
struct BwdGeom {
  int grid_x;  // per tensor: blocks; per channel: splits of one channel
  int grid_y;  // per channel: blocks along channels
  int64_t outer;
};

BwdGeom bwd_geom(const FakeQuantArgs& a) {
  BwdGeom geo{1, 1, 1};
  const int n_per_vec = vec_width(a.dtype);
  if (!a.per_channel) {
    geo.grid_x = detail::grid_for((a.numel + n_per_vec - 1) / n_per_vec, kThreads, 8);
    return geo;
  }
  const int64_t per_channel = a.numel / a.channels;
  geo.outer = per_channel / a.inner;
  geo.grid_y = static_cast<int>(a.channels < 65535 ? a.channels : 65535);
  const int64_t target = static_cast<int64_t>(detail::num_sms()) * 8;
  int64_t splits = (target + geo.grid_y - 1) / geo.grid_y;
  const int64_t work = (per_channel + n_per_vec - 1) / n_per_vec;
  const int64_t useful = (work + kThreads - 1) / kThreads;
  if (splits > useful) splits = useful;
  geo.grid_x = static_cast<int>(splits < 1 ? 1 : splits);
  return geo;
}

}  // namespace

cudaError_t fake_quantize_fwd(const FakeQuantArgs& a, void* y, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  const FqKernelArgs k = kernel_args(a, /*backward=*/false);
  const int n_per_vec = vec_width(a.dtype);
  const int grid = detail::grid_for((a.numel + n_per_vec - 1) / n_per_vec, kThreads, 8);
  return detail::dispatch_x_e(a.dtype, a.perturbation_fp32, [&](auto t, auto te) {
    using T = typename decltype(t)::type;
    using TE = typename decltype(te)::type;
    const T* x = static_cast<const T*>(a.x);
    const TE* e = static_cast<const TE*>(a.perturbation);
    if (a.per_channel) {
      fq_fwd_kernel<T, TE, true><<<grid, kThreads, 0, stream>>>(x, e, static_cast<T*>(y), k);
    } else {
      fq_fwd_kernel<T, TE, false><<<grid, kThreads, 0, stream>>>(x, e, static_cast<T*>(y), k);
    }
    return cudaGetLastError();
  });
}

size_t fake_quantize_bwd_workspace_bytes(const FakeQuantArgs& a) {
  if (a.numel == 0) return 0;
  const BwdGeom geo = bwd_geom(a);
  const int64_t channels = a.per_channel ? a.channels : 1;
  return static_cast<size_t>(2 * channels * geo.grid_x) * sizeof(double);
}

cudaError_t fake_quantize_bwd(const FakeQuantArgs& a, const void* grad, void* dx, float* dscale,
                              float* dzero_point, void* workspace, cudaStream_t stream) {
  const int64_t channels = a.per_channel ? a.channels : 1;
  if (a.numel == 0) {
    if (channels == 0) return cudaSuccess;  // nothing to zero (and the pointers may be null)
    cudaError_t err = cudaMemsetAsync(dscale, 0, channels * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(dzero_point, 0, channels * sizeof(float), stream);
  }
  const FqKernelArgs k = kernel_args(a, /*backward=*/true);
  const BwdGeom geo = bwd_geom(a);
  double* partials = static_cast<double*>(workspace);
  // Only Case 2 (perturb_before) reads the perturbation in the backward.
  const bool e_fp32 = k.mode == kBefore && a.perturbation_fp32;
  return detail::dispatch_x_e(a.dtype, e_fp32, [&](auto t, auto te) {
    using T = typename decltype(t)::type;
    using TE = typename decltype(te)::type;
    const T* g = static_cast<const T*>(grad);
    const T* x = static_cast<const T*>(a.x);
    const TE* e = k.mode == kBefore ? static_cast<const TE*>(a.perturbation) : nullptr;
    T* out = static_cast<T*>(dx);
    if (!a.per_channel) {
      fq_bwd_tensor_kernel<T, TE><<<geo.grid_x, kThreads, 0, stream>>>(g, x, e, out, k, partials);
      fq_bwd_tensor_finish<<<1, kThreads, 0, stream>>>(partials, geo.grid_x, dscale, dzero_point);
    } else {
      const dim3 grid(geo.grid_x, geo.grid_y);
      fq_bwd_channel_kernel<T, TE><<<grid, kThreads, 0, stream>>>(g, x, e, out, k, geo.outer, partials);
      const int fin = static_cast<int>((channels + kThreads - 1) / kThreads);
      fq_bwd_channel_finish<<<fin, kThreads, 0, stream>>>(partials, channels, geo.grid_x, dscale,
                                                           dzero_point);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace saq
