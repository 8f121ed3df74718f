// Native autograd for the two quantizers: saq_C::liq_quantize_autograd and
// saq_C::fake_quantize_autograd.
//
// Why: the "saq" custom ops (saq_kernels/ops.py) carry their autograd formula in Python, which
// costs about 0.2 ms of interpreter and dispatcher work per quantizer call, forward plus backward.
// A pre-act ResNet-20 step has 43 quantizer calls (86 with SAQ's two passes): 4-8 % of the whole
// CPU step, as much as the kernels themselves on the small layers. These ops do the same thing in
// C++: forward = saq_C::<op> (CPU or CUDA kernel, by the dispatcher), backward =
// saq_C::<op>_backward, and the perturbation gradient of ops.py's _perturbation_grad:
//     de = s * dL/dy          (perturb_before = false: y = Q(x) + s*e)
//     de = s * dL/d(x + s*e)  (perturb_before = true:  y = Q(x + s*e))
// only when e requires grad (saq.SAQ's ascent "probe"). Same kernels, same arguments: results are
// bit-identical to the Python path.
//
// ops.py calls them only in plain eager mode when the selected backend is "cpp" or "cuda"; under
// torch.compile, export, fake tensors or any Python dispatch mode the "saq" custom ops (which have
// fakes and a traceable autograd formula) stay the path. Double backward is not supported, as on
// the Python path: under create_graph=True the kernels' gradients get a grad_fn that raises when a
// second backward reaches it (mark_no_double_backward); one that does not reach it (a gradient
// penalty on other parameters) runs.
//
// The value check of the Python wrapper (scale / clip finite and > 0, torch._assert_async) is done
// here for CPU tensors when check_values is true (saq_kernels.validate.CHECK_VALUES), where reading
// them is free; the message is the Python one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <cmath>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The CPU-side value check of saq_kernels/validate.py:check_values_positive.
void check_positive(const char* op, const char* name, const Tensor& t, bool absolute) {
  if (!t.device().is_cpu()) return;  // on a GPU reading it would be a host sync; Python skips too
  const Tensor v = t.detach().to(at::kFloat).contiguous();
  const float* p = v.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    const float a = absolute ? std::fabs(p[i]) : p[i];
    TORCH_CHECK(std::isfinite(a) && a > 0.0f, "saq::", op, ": '", name, "' must be finite and ",
                absolute ? "|" : "", name, absolute ? "|" : "",
                " > 0, got a non-positive or non-finite value; re-initialize it (e.g. from the data "
                "range) or lower the learning rate of the quantizer parameters");
  }
}

// A grad_fn's pointer type: std::shared_ptr<Node> in torch 2.11, c10::intrusive_ptr<Node> in 2.13.
using NodePtr = std::decay_t<decltype(std::declval<const Tensor&>().grad_fn())>;

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The quantizers' backward has no derivative of its own (as on the custom-op path, which raises
// when a second backward reaches it). Under create_graph=True the engine runs backward with grad
// mode on: the kernels then run with it off (through the autograd fallback they would give zero
// second derivatives with only a warning), and their outputs get a grad_fn that depends on
// `deps` and raises only if a second backward reaches it.
void mark_no_double_backward(const char* op, const std::vector<Tensor*>& outs,
                             const variable_list& deps) {
  bool any = false;
  for (const Tensor& d : deps) any = any || (d.defined() && d.requires_grad());
  if (!any) return;
  const NodePtr node = make_node<torch::autograd::Error>(
      std::string("saq::") + op +
          ": double backward is not supported: a second derivative through the quantizer's "
          "backward was requested (create_graph=True), which has no derivative of its own",
      torch::autograd::collect_next_edges(deps));
  for (Tensor* t : outs) {
    if (t->defined()) torch::autograd::set_history(*t, node);
  }
}

Tensor opt_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

OptTensor undefined_to_opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// d/de of the perturbed quantizer (see the file comment); undefined when e needs no gradient.
// `edge` counts tensor arguments only (an absent optional has no edge): e's index among them.
Tensor perturbation_grad(AutogradContext* ctx, size_t edge, const Tensor& grad, const Tensor& dx,
                         const Tensor& e, const Tensor& s, bool before) {
  if (!e.defined() || !ctx->needs_input_grad(edge)) return Tensor();
  return (before ? dx : grad).mul(s).to(e.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// liq_quantize
// ------------------------------------------------------------------------------------------------
Tensor liq_forward(const Tensor& x, const Tensor& clip, int64_t bits, bool is_signed,
                   bool standardize, const OptTensor& e, const OptTensor& s, bool before) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("saq_C::liq_quantize", "")
                       .typed<Tensor(const Tensor&, const Tensor&, int64_t, bool, bool,
                                     const OptTensor&, const OptTensor&, bool)>();
  return op.call(x, clip, bits, is_signed, standardize, e, s, before);
}

std::tuple<Tensor, Tensor> liq_backward(const Tensor& grad, const Tensor& x, const Tensor& clip,
                                        int64_t bits, bool is_signed, bool standardize,
                                        const OptTensor& e, const OptTensor& s, bool before,
                                        bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("saq_C::liq_quantize_backward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, int64_t, bool, bool,
                                                         const OptTensor&, const OptTensor&, bool,
                                                         bool)>();
  return op.call(grad, x, clip, bits, is_signed, standardize, e, s, before, relu);
}

struct LiqQuantizeFunction : public torch::autograd::Function<LiqQuantizeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& clip, int64_t bits,
                        bool is_signed, bool standardize, const OptTensor& e, const OptTensor& s,
                        bool before, bool relu) {
    ctx->save_for_backward({x, clip, opt_or_undefined(e), opt_or_undefined(s)});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["standardize"] = standardize;
    ctx->saved_data["before"] = before;
    ctx->saved_data["relu"] = relu;
    at::AutoDispatchBelowADInplaceOrView guard;
    return liq_forward(x, clip, bits, is_signed, standardize, e, s, before);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &clip = saved[1], &e = saved[2], &s = saved[3];
    const bool before = ctx->saved_data["before"].toBool();
    const bool create_graph = at::GradMode::is_enabled();
    Tensor dx, dclip;
    {
      at::AutoGradMode no_grad(false);
      std::tie(dx, dclip) =
          liq_backward(grads[0], x, clip, ctx->saved_data["bits"].toInt(),
                       ctx->saved_data["signed"].toBool(), ctx->saved_data["standardize"].toBool(),
                       undefined_to_opt(e), undefined_to_opt(s), before,
                       ctx->saved_data["relu"].toBool());
      dclip = dclip.to(clip.scalar_type());
    }
    if (create_graph) mark_no_double_backward("liq_quantize", {&dx, &dclip}, {grads[0], x, clip, e, s});
    Tensor de = perturbation_grad(ctx, /*edge of e after x, clip*/ 2, grads[0], dx, e, s, before);
    return {dx, dclip, Tensor(), Tensor(), Tensor(), de, Tensor(), Tensor(), Tensor()};
  }
};

Tensor liq_quantize_autograd(const Tensor& x, const Tensor& clip, int64_t bits, bool is_signed,
                             bool standardize, const OptTensor& e, const OptTensor& s,
                             bool before, bool relu, bool check_values) {
  if (check_values) check_positive("liq_quantize", "clip", clip, /*absolute=*/true);
  return LiqQuantizeFunction::apply(x, clip, bits, is_signed, standardize, e, s, before, relu);
}

// ------------------------------------------------------------------------------------------------
// fake_quantize
// ------------------------------------------------------------------------------------------------
Tensor fq_forward(const Tensor& x, const Tensor& scale, const Tensor& zp, int64_t qmin,
                  int64_t qmax, std::optional<int64_t> axis, double gf, const OptTensor& e,
                  const OptTensor& s, bool before, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("saq_C::fake_quantize", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                     std::optional<int64_t>, double, const OptTensor&,
                                     const OptTensor&, bool, bool)>();
  return op.call(x, scale, zp, qmin, qmax, axis, gf, e, s, before, relu);
}

std::tuple<Tensor, Tensor, Tensor> fq_backward(const Tensor& grad, const Tensor& x,
                                               const Tensor& scale, const Tensor& zp, int64_t qmin,
                                               int64_t qmax, std::optional<int64_t> axis, double gf,
                                               const OptTensor& e, const OptTensor& s,
                                               bool before, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("saq_C::fake_quantize_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                           int64_t, std::optional<int64_t>, double, const OptTensor&,
                           const OptTensor&, bool, bool)>();
  return op.call(grad, x, scale, zp, qmin, qmax, axis, gf, e, s, before, relu);
}

struct FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale,
                        const Tensor& zp, int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                        double gf, const OptTensor& e, const OptTensor& s, bool before,
                        bool relu) {
    ctx->save_for_backward({x, scale, zp, opt_or_undefined(e), opt_or_undefined(s)});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["axis"] = axis.has_value() ? *axis : int64_t{-1};  // normalized: >= 0
    ctx->saved_data["gf"] = gf;
    ctx->saved_data["before"] = before;
    ctx->saved_data["relu"] = relu;
    at::AutoDispatchBelowADInplaceOrView guard;
    return fq_forward(x, scale, zp, qmin, qmax, axis, gf, e, s, before, relu);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &scale = saved[1], &zp = saved[2], &e = saved[3], &s = saved[4];
    const int64_t a = ctx->saved_data["axis"].toInt();
    const bool before = ctx->saved_data["before"].toBool();
    const bool create_graph = at::GradMode::is_enabled();
    Tensor dx, dscale, dzp;
    {
      at::AutoGradMode no_grad(false);
      std::tie(dx, dscale, dzp) = fq_backward(
          grads[0], x, scale, zp, ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt(),
          a < 0 ? std::nullopt : std::optional<int64_t>(a), ctx->saved_data["gf"].toDouble(),
          undefined_to_opt(e), undefined_to_opt(s), before, ctx->saved_data["relu"].toBool());
      dscale = dscale.to(scale.scalar_type());
      dzp = dzp.to(zp.scalar_type());
    }
    if (create_graph) {
      mark_no_double_backward("fake_quantize", {&dx, &dscale, &dzp}, {grads[0], x, scale, zp, e, s});
    }
    Tensor de = perturbation_grad(ctx, /*edge of e after x, scale, zp*/ 3, grads[0], dx, e, s, before);
    return {dx,       dscale,   dzp, Tensor(), Tensor(), Tensor(),
            Tensor(), de,       Tensor(), Tensor(), Tensor()};
  }
};

Tensor fake_quantize_autograd(const Tensor& x, const Tensor& scale, const Tensor& zp,
                              int64_t qmin, int64_t qmax, std::optional<int64_t> axis, double gf,
                              const OptTensor& e, const OptTensor& s, bool before, bool relu,
                              bool check_values) {
  TORCH_CHECK(!axis.has_value() || *axis >= 0,
              "saq_C::fake_quantize_autograd: axis must be normalized (>= 0), got ", *axis);
  if (check_values) check_positive("fake_quantize", "scale", scale, /*absolute=*/false);
  return FakeQuantizeFunction::apply(x, scale, zp, qmin, qmax, axis, gf, e, s, before, relu);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saq_C, m) {
  m.def(
      "liq_quantize_autograd(Tensor x, Tensor clip, int bits, bool signed, bool standardize, "
      "Tensor? perturbation, Tensor? perturb_scale, bool perturb_before, bool relu, "
      "bool check_values) -> Tensor");
  m.def(
      "fake_quantize_autograd(Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis, float grad_factor, Tensor? perturbation, Tensor? perturb_scale, "
      "bool perturb_before, bool relu, bool check_values) -> Tensor");
}

// One Autograd kernel serves CPU and CUDA tensors: the inner saq_C ops dispatch by device.
TORCH_LIBRARY_IMPL(saq_C, Autograd, m) {
  m.impl("liq_quantize_autograd", &liq_quantize_autograd);
  m.impl("fake_quantize_autograd", &fake_quantize_autograd);
}
