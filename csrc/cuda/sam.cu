// SAM multi-tensor ops, CUDA kernels: grad_sq_norm, sam_perturb_, sam_restore_,
// sam_restore_sgd_, sam_restore_adamw_ (saq_kernels/OPS.md).
//
// One launch covers many tensors, in the manner of apex's multi_tensor_apply: the host fills a
// table of per-tensor pointers and sizes plus, per block, which tensor and which chunk of it the
// block owns, and passes the table BY VALUE as a kernel argument (no host-to-device copy, so the
// launch is capturable in a CUDA graph). A list longer than the table is split into several
// launches. Each block walks its chunk with 16-byte loads when all of that tensor's pointers are
// 16-byte aligned, and a scalar loop for the rest.
//
// Per-step scalars (SAM scale, lr, found_inf, AdamW steps) are read from device memory.
// Rounding: each kernel rounds to the parameter dtype exactly where the reference's torch ops
// round (one rounding per op), and uses the _rn intrinsics where two ops of the reference would
// otherwise be contracted into one FMA, so sam_perturb_ is bit-exact with the reference and the
// optimizer steps stay within an ulp or so of it.
#include "common.cuh"
#include "reduce.cuh"

namespace saq {
namespace cuda {
namespace {

using detail::round_to;
using detail::to_f;

constexpr int kMtThreads = 512;  // 128 elements (8-32 vectors) per thread per 64K-element chunk
constexpr int kMtMaxBlocks = 320;

// Kernel parameters are limited to 4 KB: the block map takes 320 * 5 bytes, pointers and sizes
// share the rest.
template <int D>
struct MtTable {
  static constexpr int kMaxTensors = (3800 - kMtMaxBlocks * 5) / (8 * D + 9);
  void* ptr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMtMaxBlocks];
  uint8_t block_tensor[kMtMaxBlocks];
  uint8_t flag[kMaxTensors];
};
static_assert(sizeof(MtTable<2>) <= 3800 && sizeof(MtTable<3>) <= 3800, "kernel argument size");
static_assert(sizeof(MtTable<4>) <= 3800 && sizeof(MtTable<6>) <= 3800, "kernel argument size");
static_assert(MtTable<2>::kMaxTensors <= 256, "block_tensor is a uint8_t");

// Fills tables over the tensors and calls launch(table, nblocks, first_block) whenever one is
// full (blocks or tensor slots) and once at the end. Empty tensors are skipped. A tensor whose
// chunks straddle two launches keeps its slot-0 entry in the next table.
template <int D, typename Launch>
cudaError_t mt_apply(int64_t num_tensors, void* const* const (&lists)[D], const int64_t* numels,
                     const uint8_t* flags, int64_t chunk, Launch&& launch) {
  MtTable<D> tab;
  int nt = 0;
  int nb = 0;
  int64_t first_block = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t n = numels[t];
    if (n == 0) continue;
    int slot = nt++;
    for (int d = 0; d < D; ++d) tab.ptr[d][slot] = lists[d][t];
    tab.numel[slot] = n;
    tab.flag[slot] = flags != nullptr ? flags[t] : 0;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      tab.block_tensor[nb] = static_cast<uint8_t>(slot);
      tab.block_chunk[nb] = static_cast<int32_t>(ch);
      ++nb;
      const bool last_chunk = ch == nchunks - 1;
      if (nb == kMtMaxBlocks || (last_chunk && nt == MtTable<D>::kMaxTensors)) {
        const cudaError_t err = launch(tab, nb, first_block);
        if (err != cudaSuccess) return err;
        first_block += nb;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the tensor continues in the next table
          for (int d = 0; d < D; ++d) tab.ptr[d][0] = tab.ptr[d][slot];
          tab.numel[0] = tab.numel[slot];
          tab.flag[0] = tab.flag[slot];
          slot = 0;
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) return launch(tab, nb, first_block);
  return cudaSuccess;
}

// This block's tensor slot and element range [start, start + len) of it.
struct Chunk {
  int t;
  int64_t start, len;
};
template <int D>
__device__ __forceinline__ Chunk my_chunk(const MtTable<D>& tab, int64_t chunk) {
  Chunk c;
  c.t = tab.block_tensor[blockIdx.x];
  c.start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * chunk;
  const int64_t rest = tab.numel[c.t] - c.start;
  c.len = rest < chunk ? rest : chunk;
  return c;
}

// ---------------------------------------------------------------------------------------------
// grad_sq_norm: partials[first_block + b] = block b's sum of g^2 or (g * (|p| + eta))^2.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMtThreads)
    grad_sq_norm_kernel(const MtTable<2> tab, float eta, float* __restrict__ partials,
                        int64_t first_block) {
  constexpr int N = detail::Vec<T>::N;
  __shared__ float smem[32];
  const Chunk c = my_chunk(tab, kSamChunk);
  const T* __restrict__ g = static_cast<const T*>(tab.ptr[0][c.t]) + c.start;
  const T* __restrict__ p = static_cast<const T*>(tab.ptr[1][c.t]) + c.start;
  const bool adaptive = tab.flag[c.t] != 0;
  float acc = 0.0f;
  const bool vec = detail::aligned16(g) && (!adaptive || detail::aligned16(p));
  const int64_t nvec = vec ? c.len / N : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float gv[N];
    detail::load_vec<T, N>(g + v * N, gv);
    if (adaptive) {
      float pv[N];
      detail::load_vec<T, N>(p + v * N, pv);
#pragma unroll
      for (int k = 0; k < N; ++k) gv[k] *= fabsf(pv[k]) + eta;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) acc += gv[k] * gv[k];
  }
  for (int64_t i = nvec * N + threadIdx.x; i < c.len; i += blockDim.x) {
    float gv = to_f(g[i]);
    if (adaptive) gv *= fabsf(to_f(p[i])) + eta;
    acc += gv * gv;
  }
  acc = detail::block_sum(acc, smem);
  if (threadIdx.x == 0) partials[first_block + blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kMtThreads)
    grad_sq_norm_finish_kernel(const float* __restrict__ partials, int64_t count,
                               float* __restrict__ norm_sq, float* __restrict__ found_inf) {
  __shared__ double smem[32];
  const double total = detail::ordered_sum(partials, count, smem);
  if (threadIdx.x == 0) {
    const float r = static_cast<float>(total);
    norm_sq[0] = r;
    found_inf[0] = isfinite(r) ? 0.0f : 1.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// sam_perturb_: backup = p; p += e, e = g * s or ((p * p) * g) * s, every op rounded to T.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float perturbed(float p, float g, float s, bool adaptive) {
  float e;
  if (adaptive) {
    e = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(p, p)), g)), s));
  } else {
    e = round_to<T>(__fmul_rn(g, s));
  }
  return __fadd_rn(p, e);  // rounded to T by the store
}

template <typename T>
__global__ void __launch_bounds__(kMtThreads)
    sam_perturb_kernel(const MtTable<3> tab, const T* __restrict__ scale) {
  constexpr int N = detail::Vec<T>::N;
  const Chunk c = my_chunk(tab, kSamChunk);
  T* __restrict__ p = static_cast<T*>(tab.ptr[0][c.t]) + c.start;
  const T* __restrict__ g = static_cast<const T*>(tab.ptr[1][c.t]) + c.start;
  T* __restrict__ b = static_cast<T*>(tab.ptr[2][c.t]) + c.start;
  const bool adaptive = tab.flag[c.t] != 0;
  const float s = to_f(scale[0]);
  const bool vec = detail::aligned16(p) && detail::aligned16(g) && detail::aligned16(b);
  const int64_t nvec = vec ? c.len / N : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 raw = detail::ld16(p + v * N);
    detail::st16(b + v * N, raw);  // the backup is the exact bits of p
    float pv[N], gv[N];
    detail::unpack16<T>(raw, pv);
    detail::load_vec<T, N>(g + v * N, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) pv[k] = perturbed<T>(pv[k], gv[k], s, adaptive);
    detail::store_vec<T, N>(p + v * N, pv);
  }
  for (int64_t i = nvec * N + threadIdx.x; i < c.len; i += blockDim.x) {
    const T pr = p[i];
    b[i] = pr;
    p[i] = detail::from_f<T>(perturbed<T>(to_f(pr), to_f(g[i]), s, adaptive));
  }
}

// ---------------------------------------------------------------------------------------------
// sam_restore_: byte copy (any dtype).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kRestoreChunkBytes = kSamChunk * 4;

__global__ void __launch_bounds__(kMtThreads) sam_restore_kernel(const MtTable<2> tab) {
  const Chunk c = my_chunk(tab, kRestoreChunkBytes);
  uint8_t* __restrict__ p = static_cast<uint8_t*>(tab.ptr[0][c.t]) + c.start;
  const uint8_t* __restrict__ b = static_cast<const uint8_t*>(tab.ptr[1][c.t]) + c.start;
  const bool vec = detail::aligned16(p) && detail::aligned16(b);
  const int64_t nvec = vec ? c.len / 16 : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) detail::st16(p + v * 16, detail::ldg16(b + v * 16));
  for (int64_t i = nvec * 16 + threadIdx.x; i < c.len; i += blockDim.x) p[i] = b[i];
}

// ---------------------------------------------------------------------------------------------
// sam_restore_sgd_: p = backup, then torch.optim.SGD's single-tensor step:
//   d = g + wd * p; buf = d (first step) or momentum * buf + (1 - dampening) * d;
//   d = d + momentum * buf (Nesterov) or buf; p = p - lr * d.
// ---------------------------------------------------------------------------------------------
struct SgdKernelArgs {
  float momentum, one_minus_dampening, weight_decay;
  bool nesterov, first_step;
  const float* found_inf;
};

template <typename T>
__device__ __forceinline__ void sgd_elem(float& p, float g, float& buf, float lr,
                                         const SgdKernelArgs& a) {
  float d = g;
  if (a.weight_decay != 0.0f) d = round_to<T>(g + a.weight_decay * p);  // one torch op
  if (a.momentum != 0.0f) {
    if (a.first_step) {
      buf = d;
    } else {
      const float scaled = round_to<T>(__fmul_rn(buf, a.momentum));
      buf = round_to<T>(scaled + a.one_minus_dampening * d);
    }
    d = a.nesterov ? round_to<T>(d + a.momentum * buf) : buf;
  }
  p = round_to<T>(__fsub_rn(p, round_to<T>(__fmul_rn(lr, d))));
}

template <typename T>
__global__ void __launch_bounds__(kMtThreads)
    sam_restore_sgd_kernel(const MtTable<4> tab, const T* __restrict__ lr_ptr,
                           const SgdKernelArgs a) {
  constexpr int N = detail::Vec<T>::N;
  const Chunk c = my_chunk(tab, kSamChunk);
  // p and b are not __restrict__: a parameter that was not perturbed is stepped with b == p
  // (saq_kernels/OPS.md, backups as a prefix); each element is read through b before p is written.
  T* p = static_cast<T*>(tab.ptr[0][c.t]) + c.start;
  const T* b = static_cast<const T*>(tab.ptr[1][c.t]) + c.start;
  const T* __restrict__ g = static_cast<const T*>(tab.ptr[2][c.t]) + c.start;
  T* __restrict__ buf = static_cast<T*>(tab.ptr[3][c.t]) + c.start;
  const bool skip = a.found_inf != nullptr && __ldg(a.found_inf) != 0.0f;
  const bool use_buf = a.momentum != 0.0f;
  const float lr = to_f(lr_ptr[0]);
  const bool vec = detail::aligned16(p) && detail::aligned16(b) && detail::aligned16(g) &&
                   (!use_buf || detail::aligned16(buf));
  const int64_t nvec = vec ? c.len / N : 0;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const uint4 braw = detail::ld16(b + v * N);  // coherent: b may be p itself
    if (skip) {
      detail::st16(p + v * N, braw);
      continue;
    }
    float pv[N], gv[N], mv[N];
    detail::unpack16<T>(braw, pv);
    detail::load_vec<T, N>(g + v * N, gv);
    if (use_buf && !a.first_step) {
      detail::load_vec_rw<T, N>(buf + v * N, mv);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) mv[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) sgd_elem<T>(pv[k], gv[k], mv[k], lr, a);
    detail::store_vec<T, N>(p + v * N, pv);
    if (use_buf) detail::store_vec<T, N>(buf + v * N, mv);
  }
  for (int64_t i = nvec * N + threadIdx.x; i < c.len; i += blockDim.x) {
    if (skip) {
      p[i] = b[i];
      continue;
    }
    float pv = to_f(b[i]);
    float mv = use_buf && !a.first_step ? to_f(buf[i]) : 0.0f;
    sgd_elem<T>(pv, to_f(g[i]), mv, lr, a);
    p[i] = detail::from_f<T>(pv);
    if (use_buf) buf[i] = detail::from_f<T>(mv);
  }
}

// ---------------------------------------------------------------------------------------------
// sam_restore_adamw_: p = backup, then torch.optim.AdamW's step (no amsgrad), the reference's op
// order:  p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;
//         p -= (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps)),  bc_i = 1 - beta_i^(step + 1).
// The steps are incremented by adamw_steps_kernel after every update launch of the call.
// ---------------------------------------------------------------------------------------------
struct AdamWKernelArgs {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  const float* found_inf;
};

struct AdamWStepConsts {
  float decay;      // 1 - lr * wd, rounded to T
  float step_size;  // lr / bc1, rounded to T
  float bc2_sqrt;   // sqrt(bc2), rounded to T
};

template <typename T>
__device__ __forceinline__ void adamw_elem(float& p, float g, float& m, float& v,
                                           const AdamWKernelArgs& a, const AdamWStepConsts& k) {
  p = round_to<T>(__fmul_rn(p, k.decay));
  // torch.lerp(start, end, w): start + w * (end - start) for |w| < 0.5, else
  // end - (end - start) * (1 - w).
  const float w = a.one_minus_beta1;
  m = round_to<T>(fabsf(w) < 0.5f ? m + w * (g - m) : g - (g - m) * (1.0f - w));
  v = round_to<T>(round_to<T>(__fmul_rn(v, a.beta2)) + a.one_minus_beta2 * g * g);
  const float denom =
      round_to<T>(__fadd_rn(round_to<T>(__fdiv_rn(round_to<T>(sqrtf(v)), k.bc2_sqrt)), a.eps));
  const float update = round_to<T>(__fmul_rn(k.step_size, round_to<T>(__fdiv_rn(m, denom))));
  p = round_to<T>(__fsub_rn(p, update));
}

template <typename T>
__global__ void __launch_bounds__(kMtThreads)
    sam_restore_adamw_kernel(const MtTable<6> tab, const T* __restrict__ lr_ptr,
                             const AdamWKernelArgs a) {
  constexpr int N = detail::Vec<T>::N;
  const Chunk c = my_chunk(tab, kSamChunk);
  T* p = static_cast<T*>(tab.ptr[0][c.t]) + c.start;  // may alias b: see the SGD kernel
  const T* b = static_cast<const T*>(tab.ptr[1][c.t]) + c.start;
  const T* __restrict__ g = static_cast<const T*>(tab.ptr[2][c.t]) + c.start;
  T* __restrict__ m = static_cast<T*>(tab.ptr[3][c.t]) + c.start;
  T* __restrict__ v = static_cast<T*>(tab.ptr[4][c.t]) + c.start;
  const float* step_ptr = static_cast<const float*>(tab.ptr[5][c.t]);
  const bool skip = a.found_inf != nullptr && __ldg(a.found_inf) != 0.0f;

  AdamWStepConsts k;
  {
    const float lr = to_f(lr_ptr[0]);
    const float step = __ldg(step_ptr) + 1.0f;  // the increment lands after this launch
    const float bc1 = 1.0f - powf(a.beta1, step);
    const float bc2 = 1.0f - powf(a.beta2, step);
    k.decay = round_to<T>(1.0f - round_to<T>(__fmul_rn(lr, a.weight_decay)));
    k.step_size = round_to<T>(__fdiv_rn(lr, bc1));
    k.bc2_sqrt = round_to<T>(sqrtf(bc2));
  }

  const bool vec = detail::aligned16(p) && detail::aligned16(b) && detail::aligned16(g) &&
                   detail::aligned16(m) && detail::aligned16(v);
  const int64_t nvec = vec ? c.len / N : 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 braw = detail::ld16(b + i * N);  // coherent: b may be p itself
    if (skip) {
      detail::st16(p + i * N, braw);
      continue;
    }
    float pv[N], gv[N], mv[N], vv[N];
    detail::unpack16<T>(braw, pv);
    detail::load_vec<T, N>(g + i * N, gv);
    detail::load_vec_rw<T, N>(m + i * N, mv);
    detail::load_vec_rw<T, N>(v + i * N, vv);
#pragma unroll
    for (int j = 0; j < N; ++j) adamw_elem<T>(pv[j], gv[j], mv[j], vv[j], a, k);
    detail::store_vec<T, N>(p + i * N, pv);
    detail::store_vec<T, N>(m + i * N, mv);
    detail::store_vec<T, N>(v + i * N, vv);
  }
  for (int64_t i = nvec * N + threadIdx.x; i < c.len; i += blockDim.x) {
    if (skip) {
      p[i] = b[i];
      continue;
    }
    float pv = to_f(b[i]), mv = to_f(m[i]), vv = to_f(v[i]);
    adamw_elem<T>(pv, to_f(g[i]), mv, vv, a, k);
    p[i] = detail::from_f<T>(pv);
    m[i] = detail::from_f<T>(mv);
    v[i] = detail::from_f<T>(vv);
  }
}

constexpr int kMaxSteps = 480;  // 3.8 KB of pointers per launch
struct StepTable {
  float* step[kMaxSteps];
  int count;
};

__global__ void __launch_bounds__(kMtThreads)
    adamw_steps_kernel(const StepTable tab, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && __ldg(found_inf) != 0.0f) return;
  for (int i = threadIdx.x; i < tab.count; i += blockDim.x) tab.step[i][0] += 1.0f;
}

}  // namespace

int64_t sam_num_chunks(int64_t num_tensors, const int64_t* numels) {
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) total += (numels[t] + kSamChunk - 1) / kSamChunk;
  return total;
}

cudaError_t grad_sq_norm_partials(DType dtype, int64_t num_tensors, const void* const* grads,
                                  const void* const* params, const int64_t* numels,
                                  const uint8_t* adaptive, float eta, float* partials,
                                  int64_t* offset, cudaStream_t stream) {
  void* const* const lists[2] = {const_cast<void* const*>(grads), const_cast<void* const*>(params)};
  const int64_t base = *offset;
  *offset += sam_num_chunks(num_tensors, numels);
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return mt_apply<2>(num_tensors, lists, numels, adaptive, kSamChunk,
                       [&](const MtTable<2>& tab, int nblocks, int64_t first) {
                         grad_sq_norm_kernel<T><<<nblocks, kMtThreads, 0, stream>>>(
                             tab, eta, partials, base + first);
                         return cudaGetLastError();
                       });
  });
}

cudaError_t grad_sq_norm_finish(const float* partials, int64_t count, float* norm_sq,
                                float* found_inf, cudaStream_t stream) {
  grad_sq_norm_finish_kernel<<<1, kMtThreads, 0, stream>>>(partials, count, norm_sq, found_inf);
  return cudaGetLastError();
}

cudaError_t sam_perturb(DType dtype, int64_t num_tensors, void* const* params,
                        const void* const* grads, void* const* backups, const int64_t* numels,
                        const uint8_t* adaptive, const void* scale, cudaStream_t stream) {
  void* const* const lists[3] = {params, const_cast<void* const*>(grads), backups};
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return mt_apply<3>(num_tensors, lists, numels, adaptive, kSamChunk,
                       [&](const MtTable<3>& tab, int nblocks, int64_t) {
                         sam_perturb_kernel<T><<<nblocks, kMtThreads, 0, stream>>>(
                             tab, static_cast<const T*>(scale));
                         return cudaGetLastError();
                       });
  });
}

cudaError_t sam_restore(int64_t num_tensors, void* const* params, const void* const* backups,
                        const int64_t* nbytes, cudaStream_t stream) {
  void* const* const lists[2] = {params, const_cast<void* const*>(backups)};
  return mt_apply<2>(num_tensors, lists, nbytes, nullptr, kRestoreChunkBytes,
                     [&](const MtTable<2>& tab, int nblocks, int64_t) {
                       sam_restore_kernel<<<nblocks, kMtThreads, 0, stream>>>(tab);
                       return cudaGetLastError();
                     });
}

cudaError_t sam_restore_sgd(DType dtype, int64_t num_tensors, void* const* params,
                            const void* const* backups, const void* const* grads,
                            void* const* momentum_buffers, const int64_t* numels,
                            const SgdArgs& a, cudaStream_t stream) {
  void* const* const lists[4] = {params, const_cast<void* const*>(backups),
                                 const_cast<void* const*>(grads), momentum_buffers};
  SgdKernelArgs k;
  k.momentum = static_cast<float>(a.momentum);
  k.one_minus_dampening = static_cast<float>(1.0 - a.dampening);
  k.weight_decay = static_cast<float>(a.weight_decay);
  k.nesterov = a.nesterov;
  k.first_step = a.first_step;
  k.found_inf = a.found_inf;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return mt_apply<4>(num_tensors, lists, numels, nullptr, kSamChunk,
                       [&](const MtTable<4>& tab, int nblocks, int64_t) {
                         sam_restore_sgd_kernel<T><<<nblocks, kMtThreads, 0, stream>>>(
                             tab, static_cast<const T*>(a.lr), k);
                         return cudaGetLastError();
                       });
  });
}

cudaError_t sam_restore_adamw(DType dtype, int64_t num_tensors, void* const* params,
                              const void* const* backups, const void* const* grads,
                              void* const* exp_avgs, void* const* exp_avg_sqs,
                              float* const* steps, const int64_t* numels, const AdamWArgs& a,
                              cudaStream_t stream) {
  void* const* const lists[6] = {params,
                                 const_cast<void* const*>(backups),
                                 const_cast<void* const*>(grads),
                                 exp_avgs,
                                 exp_avg_sqs,
                                 reinterpret_cast<void* const*>(steps)};
  AdamWKernelArgs k;
  k.beta1 = static_cast<float>(a.beta1);
  k.beta2 = static_cast<float>(a.beta2);
  k.one_minus_beta1 = static_cast<float>(1.0 - a.beta1);
  k.one_minus_beta2 = static_cast<float>(1.0 - a.beta2);
  k.eps = static_cast<float>(a.eps);
  k.weight_decay = static_cast<float>(a.weight_decay);
  k.found_inf = a.found_inf;
  cudaError_t err = detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return mt_apply<6>(num_tensors, lists, numels, nullptr, kSamChunk,
                       [&](const MtTable<6>& tab, int nblocks, int64_t) {
                         sam_restore_adamw_kernel<T><<<nblocks, kMtThreads, 0, stream>>>(
                             tab, static_cast<const T*>(a.lr), k);
                         return cudaGetLastError();
                       });
  });
  if (err != cudaSuccess) return err;
  // Every update launch above has read the old steps; now bump them (empty tensors too: torch
  // counts a step for every parameter with a gradient).
  StepTable st;
  st.count = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    st.step[st.count++] = steps[t];
    if (st.count == kMaxSteps || t == num_tensors - 1) {
      adamw_steps_kernel<<<1, kMtThreads, 0, stream>>>(st, a.found_inf);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      st.count = 0;
    }
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace saq
