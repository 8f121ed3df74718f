// CPU kernels of the saq_C ops (schemas in csrc/register.cpp and saq_kernels/OPS.md, same argument
// order). Inputs may be non-contiguous: each kernel reads a .contiguous() copy (a no-op for
// contiguous tensors); every output is a new contiguous tensor. Quantizer math is fp32 for
// fp32 / fp16 / bf16 inputs (float64 x is refused: the reference computes it in float64),
// outputs are in the input dtype, gradients of the scale / zero point / clip are fp32. The SAM
// ops work in each parameter's dtype (fp64 included). 0-dim scalars (scale, perturb_scale, lr,
// found_inf) are read on the host, which costs nothing for CPU tensors.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace saq_cpu {

// csrc/cpu/fake_quantize.cpp
at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, double grad_factor,
                         const std::optional<at::Tensor>& perturbation,
                         const std::optional<at::Tensor>& perturb_scale, bool perturb_before,
                         bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor,
    const std::optional<at::Tensor>& perturbation, const std::optional<at::Tensor>& perturb_scale,
    bool perturb_before, bool relu);

// csrc/cpu/liq_quantize.cpp
at::Tensor liq_quantize(const at::Tensor& x, const at::Tensor& clip, int64_t bits, bool is_signed,
                        bool standardize, const std::optional<at::Tensor>& perturbation,
                        const std::optional<at::Tensor>& perturb_scale, bool perturb_before);

std::tuple<at::Tensor, at::Tensor> liq_quantize_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& clip, int64_t bits,
    bool is_signed, bool standardize, const std::optional<at::Tensor>& perturbation,
    const std::optional<at::Tensor>& perturb_scale, bool perturb_before, bool relu);

// csrc/cpu/sam.cpp
std::tuple<at::Tensor, at::Tensor> grad_sq_norm(at::TensorList grads, at::TensorList params,
                                                c10::List<bool> adaptive, double eta);

void sam_perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  const at::Tensor& scale, c10::List<bool> adaptive);

void sam_restore_(at::TensorList params, at::TensorList backups);

void sam_restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                      at::TensorList momentum_buffers, const at::Tensor& lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool first_step,
                      const std::optional<at::Tensor>& found_inf);

void sam_restore_adamw_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                        const at::Tensor& lr, double beta1, double beta2, double eps,
                        double weight_decay, const std::optional<at::Tensor>& found_inf);

}  // namespace saq_cpu
