// Host API of the saq CUDA kernels (csrc/cuda/*.cu), called by csrc/cuda_register.cpp.
//
// Plain C++ over raw device pointers: no torch types, so each .cu compiles with nvcc alone and
// the register file is the only place that knows about at::Tensor. Every launcher enqueues work
// on `stream` and returns the launch status (cudaGetLastError); none synchronizes or reads device
// memory on the host, so all of them can be captured in a CUDA graph. Per-step scalars (scale,
// zero point, clip, perturbation scale, lr, found_inf, steps) are device pointers read inside the
// kernels. Numerics are pinned in saq_kernels/OPS.md and implemented by csrc/common/saq_math.h.
//
// Layout contract: every tensor argument is contiguous (the caller makes it so); pointers need no
// particular alignment (16-byte-aligned ones take the vectorized path, others the scalar one).
// Reductions are deterministic: per-block partials in a caller-provided workspace, then a second
// kernel that sums them in a fixed order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace saq {
namespace cuda {

// Element type of the float tensors (x, grad, params, ...). Scale / zero point / clip / step
// tensors are always fp32.
enum class DType : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// fake_quantize (LSQ / LSQ+), csrc/cuda/fake_quantize.cu
// ---------------------------------------------------------------------------------------------
struct FakeQuantArgs {
  int64_t numel = 0;
  const void* x = nullptr;             // [numel] of dtype (x + s*e formed in fp32 when before)
  DType dtype = DType::kFloat;
  const float* scale = nullptr;        // [channels], fp32, > 0
  const float* zero_point = nullptr;   // [channels], fp32 (rounded half-even and clamped inside)
  bool per_channel = false;
  int64_t channels = 1;                // C = x.shape[axis] per channel, 1 per tensor
  int64_t inner = 1;                   // product of x's sizes after axis: channel = (i / inner) % C
  float quant_min = 0.0f;
  float quant_max = 255.0f;
  float grad_factor = 1.0f;
  const void* perturbation = nullptr;  // e: [numel], of dtype, or fp32 when perturbation_fp32
  bool perturbation_fp32 = false;
  const float* perturb_scale = nullptr;  // s: one fp32 on the device; needed when e is given
  bool perturb_before = false;         // true: Q(x + s*e); false: Q(x) + s*e
  bool relu = false;                   // Q(relu(x)) and its gradients; never with a perturbation
};

// y[numel] (dtype) = fake_quantize(x). Returns the launch status.
cudaError_t fake_quantize_fwd(const FakeQuantArgs& a, void* y, cudaStream_t stream);
// Bytes of scratch fake_quantize_bwd needs (per-block partial sums); may be 0.
size_t fake_quantize_bwd_workspace_bytes(const FakeQuantArgs& a);
// dx[numel] (dtype), dscale[channels] and dzero_point[channels] (fp32, overwritten).
// The perturbation is used only when perturb_before (the backward of Q(x) + s*e ignores e).
cudaError_t fake_quantize_bwd(const FakeQuantArgs& a, const void* grad, void* dx, float* dscale,
                              float* dzero_point, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// liq_quantize (the SAQ LIQ quantizer), csrc/cuda/liq_quantize.cu
// ---------------------------------------------------------------------------------------------
struct LiqArgs {
  int64_t numel = 0;
  const void* x = nullptr;
  DType dtype = DType::kFloat;
  const float* clip = nullptr;         // one fp32 on the device; c = |clip|
  int bits = 4;                        // n = 2^bits - 1 levels
  bool is_signed = true;
  bool relu = false;                   // unsigned, backward only: Q absorbs a ReLU (dx = 0 for x <= 0)
  bool standardize = false;            // (x - mean) / std over the whole tensor, unbiased std
  const void* perturbation = nullptr;
  bool perturbation_fp32 = false;
  const float* perturb_scale = nullptr;
  bool perturb_before = false;
};

size_t liq_quantize_workspace_bytes(const LiqArgs& a);
cudaError_t liq_quantize_fwd(const LiqArgs& a, void* y, void* workspace, cudaStream_t stream);
// dx[numel] (dtype) and dclip[1] (fp32, overwritten).
cudaError_t liq_quantize_bwd(const LiqArgs& a, const void* grad, void* dx, float* dclip,
                             void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// SAM multi-tensor ops, csrc/cuda/sam.cu. One launch covers many tensors (a pointer / size table
// passed by value, split into several launches when the list outgrows the table). Arrays of
// pointers and sizes live on the host; `num_tensors` entries each. All tensors of one call share
// `dtype`; the caller groups mixed-dtype lists.
// ---------------------------------------------------------------------------------------------
// Elements per block-sized chunk of a tensor.
constexpr int64_t kSamChunk = 65536;

// Number of chunks (= partial sums written by grad_sq_norm_partials) of these tensors.
int64_t sam_num_chunks(int64_t num_tensors, const int64_t* numels);

// partials[*offset .. *offset + sam_num_chunks) = per-chunk sums of g^2 or (g * (|p| + eta))^2
// (fp32); *offset is advanced. Several dtype groups share one partial buffer this way.
cudaError_t grad_sq_norm_partials(DType dtype, int64_t num_tensors, const void* const* grads,
                                  const void* const* params, const int64_t* numels,
                                  const uint8_t* adaptive, float eta, float* partials,
                                  int64_t* offset, cudaStream_t stream);
// norm_sq[0] = sum of partials[0..count) in a fixed order; found_inf[0] = !isfinite(norm_sq).
cudaError_t grad_sq_norm_finish(const float* partials, int64_t count, float* norm_sq,
                                float* found_inf, cudaStream_t stream);

// backups[i] = params[i]; params[i] += e with e = g * s, or (p * p) * g * s where adaptive[i],
// every product rounded to dtype as torch does (bit-exact with the reference). scale: one value
// of dtype on the device (the caller casts the 0-dim scale to the parameters' dtype).
cudaError_t sam_perturb(DType dtype, int64_t num_tensors, void* const* params,
                        const void* const* grads, void* const* backups, const int64_t* numels,
                        const uint8_t* adaptive, const void* scale, cudaStream_t stream);

// params[i] = backups[i], byte for byte (any dtype: sizes are in bytes).
cudaError_t sam_restore(int64_t num_tensors, void* const* params, const void* const* backups,
                        const int64_t* nbytes, cudaStream_t stream);

struct SgdArgs {
  const void* lr = nullptr;         // one value of dtype on the device (lr cast to dtype)
  const float* found_inf = nullptr; // optional: non-zero = restore only
  // Python floats of the schema; derived constants (1 - dampening) are formed in double on the
  // host, as the reference does, then rounded to fp32.
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool first_step = false;
};
// Restore then one torch.optim.SGD step in fp32 math; momentum_buffers untouched when
// momentum == 0 (they may then alias grads).
cudaError_t sam_restore_sgd(DType dtype, int64_t num_tensors, void* const* params,
                            const void* const* backups, const void* const* grads,
                            void* const* momentum_buffers, const int64_t* numels,
                            const SgdArgs& a, cudaStream_t stream);

struct AdamWArgs {
  const void* lr = nullptr;         // one value of dtype on the device
  const float* found_inf = nullptr; // optional
  double beta1 = 0.9;               // 1 - beta1, 1 - beta2 are formed in double, as in Python
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};
// Restore then one torch.optim.AdamW step (no amsgrad) in fp32 math; steps[i] (one fp32 each on
// the device) are incremented by a second launch after the update, unless found_inf.
cudaError_t sam_restore_adamw(DType dtype, int64_t num_tensors, void* const* params,
                              const void* const* backups, const void* const* grads,
                              void* const* exp_avgs, void* const* exp_avg_sqs,
                              float* const* steps, const int64_t* numels, const AdamWArgs& a,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace saq
