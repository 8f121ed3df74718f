// CUDA implementations of the native saq ops (namespace saq_C; schemas in saq_kernels/OPS.md, declared
// by TORCH_LIBRARY in csrc/register.cpp). Compiled only with -DWITH_CUDA (setup.py, when a CUDA
// torch and nvcc are present).
//
// Each wrapper validates its arguments (errors name the op, the argument and the fix), makes
// inputs contiguous, allocates outputs and scratch through the caching allocator, and calls the
// raw-pointer launchers of csrc/cuda/launchers.h on the current stream. Nothing here reads device
// memory or synchronizes: per-step scalars stay on the device, so every op can be captured in a
// CUDA graph. Supported element types: float32, float16, bfloat16.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one also includes the cuBLAS /
// cuSPARSE headers, which a minimal CUDA toolkit (nvcc + runtime, as on this project's machines)
// does not have; nothing here uses those libraries.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"

namespace saq {
namespace cuda_register {
namespace {

using at::Tensor;
using at::TensorList;
namespace lc = saq::cuda;

// ---------------------------------------------------------------------------------------------
// checks and conversions
// ---------------------------------------------------------------------------------------------
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "saq_C::", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

lc::DType kernel_dtype(const char* op, const std::string& name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return lc::DType::kFloat;
    case at::kHalf:
      return lc::DType::kHalf;
    case at::kBFloat16:
      return lc::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "saq_C::", op, ": '", name, "' has dtype ", t.scalar_type(),
                  "; the CUDA kernels take float32, float16 or bfloat16 tensors: convert it with ",
                  name, ".float(), or use the reference backend (saq_kernels.use_backend(\"reference\"))");
  }
  return lc::DType::kFloat;  // unreachable
}

lc::DType lc_dtype(at::ScalarType t) {
  return t == at::kHalf ? lc::DType::kHalf : (t == at::kBFloat16 ? lc::DType::kBFloat16 : lc::DType::kFloat);
}

// t is a CUDA tensor on `device`.
void check_device(const char* op, const std::string& name, const Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), "saq_C::", op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "saq_C::", op, ": '", name, "' is on ", t.device(),
              " but this is the CUDA implementation; move it with ", name, ".to('", device, "')");
  TORCH_CHECK(t.device() == device, "saq_C::", op, ": '", name, "' is on ", t.device(),
              " but the data is on ", device, "; move it with ", name, ".to('", device, "')");
}

// The device of the argument that fixes the call's device (x, or a list's first tensor), checked
// before a CUDAGuard is built on it: a CPU tensor there (reached when another argument is on a
// GPU) would make the guard throw a message that names neither the op nor the argument.
at::Device data_device(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), "saq_C::", op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "saq_C::", op, ": '", name, "' is on ", t.device(),
              " while another argument is on a CUDA device; pass all of them on one device (",
              name, ".cuda())");
  return t.device();
}

void check_float_kind(const char* op, const std::string& name, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "saq_C::", op, ": '", name, "' has dtype ",
              t.scalar_type(), "; pass a floating tensor (", name, ".float())");
}

// A one-element parameter (per-tensor scale / zero point / clip, perturb_scale, lr, found_inf)
// as a contiguous tensor of `dtype` on the device: the conversion is a device kernel, no sync.
Tensor scalar_param(const char* op, const char* name, const Tensor& t, const at::Device& device,
                    at::ScalarType dtype) {
  check_device(op, name, t, device);
  check_float_kind(op, name, t);
  TORCH_CHECK(t.numel() == 1, "saq_C::", op, ": '", name,
              "' must hold exactly one value (shape [] or [1]), got shape ", t.sizes());
  return t.to(dtype).contiguous();
}

// Same shape as x.
void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "saq_C::", op, ": '", name, "' has shape ", t.sizes(),
              " but x has shape ", x.sizes(), "; pass a tensor shaped like x");
}

// The perturbation e (x's shape) and its scale s: e keeps x's dtype, or becomes fp32 (exact
// for fp16 / bf16 values, the reference's e.float() for others); s becomes one fp32 value.
struct Perturbation {
  Tensor e, s;
  bool e_fp32 = false;
};

Perturbation prepare_perturbation(const char* op, const Tensor& x,
                                  const std::optional<Tensor>& perturbation,
                                  const std::optional<Tensor>& perturb_scale) {
  Perturbation p;
  TORCH_CHECK(perturbation.has_value() == perturb_scale.has_value(), "saq_C::", op,
              ": pass both 'perturbation' and 'perturb_scale', or neither");
  if (!perturbation.has_value()) return p;
  const Tensor& e = *perturbation;
  check_device(op, "perturbation", e, x.device());
  check_float_kind(op, "perturbation", e);
  check_same_shape(op, "perturbation", e, x);
  if (e.scalar_type() == x.scalar_type()) {
    p.e = e.contiguous();
  } else {
    p.e = e.to(at::kFloat).contiguous();
    p.e_fp32 = true;
  }
  p.s = scalar_param(op, "perturb_scale", *perturb_scale, x.device(), at::kFloat);
  return p;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Scratch bytes on the device (caching allocator: no sync, graph-safe); may be empty.
Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// fake_quantize
// ---------------------------------------------------------------------------------------------
struct FqPrepared {
  Tensor x, scale, zero_point;
  Perturbation pert;
  lc::FakeQuantArgs args;
};

FqPrepared prepare_fq(const char* op, const Tensor& x_in, const Tensor& scale,
                      const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                      std::optional<int64_t> axis, double grad_factor,
                      const std::optional<Tensor>& perturbation,
                      const std::optional<Tensor>& perturb_scale, bool perturb_before,
                      bool relu) {
  FqPrepared p;
  check_device(op, "x", x_in, x_in.device());
  const lc::DType dtype = kernel_dtype(op, "x", x_in);
  TORCH_CHECK(quant_min <= quant_max, "saq_C::", op, ": quant_min=", quant_min, " > quant_max=",
              quant_max, "; pass quant_min <= quant_max (e.g. 0..15 for unsigned 4-bit)");
  p.x = x_in.contiguous();
  const at::Device device = x_in.device();
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"scale", &scale},
                                std::pair<const char*, const Tensor*>{"zero_point", &zero_point}}) {
    check_device(op, name, *t, device);
    check_float_kind(op, name, *t);
  }
  int64_t channels = 1, inner = 1;
  if (axis.has_value()) {
    const int64_t dim = x_in.dim();
    TORCH_CHECK(dim >= 1 && *axis >= -dim && *axis < dim, "saq_C::", op, ": axis=", *axis,
                " is out of range for x with ", dim, " dims");
    const int64_t ax = *axis < 0 ? *axis + dim : *axis;
    channels = x_in.size(ax);
    for (int64_t d = ax + 1; d < dim; ++d) inner *= x_in.size(d);
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"scale", &scale},
                                  std::pair<const char*, const Tensor*>{"zero_point", &zero_point}}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "saq_C::", op, ": per-channel '",
                  name, "' must have shape [", channels, "] (x.shape[", ax, "]), got ", t->sizes());
    }
  } else {
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"scale", &scale},
                                  std::pair<const char*, const Tensor*>{"zero_point", &zero_point}}) {
      TORCH_CHECK(t->numel() == 1 && t->dim() <= 1, "saq_C::", op, ": per-tensor '", name,
                  "' must have shape [1] or [], got ", t->sizes(),
                  "; pass axis=<channel dim> for per-channel quantization");
    }
  }
  p.scale = scale.to(at::kFloat).contiguous();
  p.zero_point = zero_point.to(at::kFloat).contiguous();
  p.pert = prepare_perturbation(op, x_in, perturbation, perturb_scale);
  TORCH_CHECK(!(relu && p.pert.e.defined()), "saq_C::", op, ": relu=True cannot be combined with ",
              "a perturbation (it folds the ReLU in front of an activation quantizer)");

  lc::FakeQuantArgs& a = p.args;
  a.relu = relu;
  a.numel = p.x.numel();
  a.x = p.x.data_ptr();
  a.dtype = dtype;
  a.scale = p.scale.data_ptr<float>();
  a.zero_point = p.zero_point.data_ptr<float>();
  a.per_channel = axis.has_value();
  a.channels = channels;
  a.inner = inner;
  a.quant_min = static_cast<float>(quant_min);
  a.quant_max = static_cast<float>(quant_max);
  a.grad_factor = static_cast<float>(grad_factor);
  if (p.pert.e.defined()) {
    a.perturbation = p.pert.e.data_ptr();
    a.perturbation_fp32 = p.pert.e_fp32;
    a.perturb_scale = p.pert.s.data_ptr<float>();
    a.perturb_before = perturb_before;
  }
  return p;
}

Tensor fake_quantize(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                     int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                     double grad_factor, const std::optional<Tensor>& perturbation,
                     const std::optional<Tensor>& perturb_scale, bool perturb_before, bool relu) {
  const char* op = "fake_quantize";
  const c10::cuda::CUDAGuard guard(data_device(op, "x", x));
  FqPrepared p = prepare_fq(op, x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                            perturbation, perturb_scale, perturb_before, relu);
  Tensor y = at::empty_like(p.x, at::MemoryFormat::Contiguous);
  check_launch(lc::fake_quantize_fwd(p.args, y.data_ptr(), current_stream()), op);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> fake_quantize_backward(
    const Tensor& grad, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, double grad_factor,
    const std::optional<Tensor>& perturbation, const std::optional<Tensor>& perturb_scale,
    bool perturb_before, bool relu) {
  const char* op = "fake_quantize_backward";
  const c10::cuda::CUDAGuard guard(data_device(op, "x", x));
  FqPrepared p = prepare_fq(op, x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                            perturbation, perturb_scale, perturb_before, relu);
  check_device(op, "grad", grad, x.device());
  check_same_shape(op, "grad", grad, x);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "saq_C::", op, ": 'grad' has dtype ",
              grad.scalar_type(), " but x has ", x.scalar_type(), "; pass grad.to(x.dtype)");
  const Tensor g = grad.contiguous();
  Tensor dx = at::empty_like(p.x, at::MemoryFormat::Contiguous);
  Tensor dscale = at::empty(scale.sizes(), scale.options().dtype(at::kFloat));
  Tensor dzp = at::empty(zero_point.sizes(), zero_point.options().dtype(at::kFloat));
  Tensor ws = workspace(lc::fake_quantize_bwd_workspace_bytes(p.args), p.x);
  check_launch(lc::fake_quantize_bwd(p.args, g.data_ptr(), dx.data_ptr(), dscale.data_ptr<float>(),
                                     dzp.data_ptr<float>(), ws.data_ptr(), current_stream()),
               op);
  return {dx, dscale, dzp};
}

// ---------------------------------------------------------------------------------------------
// liq_quantize
// ---------------------------------------------------------------------------------------------
struct LiqPrepared {
  Tensor x, clip;
  Perturbation pert;
  lc::LiqArgs args;
};

LiqPrepared prepare_liq(const char* op, const Tensor& x_in, const Tensor& clip, int64_t bits,
                        bool is_signed, bool standardize,
                        const std::optional<Tensor>& perturbation,
                        const std::optional<Tensor>& perturb_scale, bool perturb_before) {
  LiqPrepared p;
  check_device(op, "x", x_in, x_in.device());
  const lc::DType dtype = kernel_dtype(op, "x", x_in);
  TORCH_CHECK(bits >= 1 && bits <= 16, "saq_C::", op, ": bits=", bits,
              " is not supported by the CUDA kernels; use 1..16 (saq uses 2..8)");
  p.x = x_in.contiguous();
  p.clip = scalar_param(op, "clip", clip, x_in.device(), at::kFloat);
  p.pert = prepare_perturbation(op, x_in, perturbation, perturb_scale);
  lc::LiqArgs& a = p.args;
  a.numel = p.x.numel();
  a.x = p.x.data_ptr();
  a.dtype = dtype;
  a.clip = p.clip.data_ptr<float>();
  a.bits = static_cast<int>(bits);
  a.is_signed = is_signed;
  a.standardize = standardize;
  if (p.pert.e.defined()) {
    a.perturbation = p.pert.e.data_ptr();
    a.perturbation_fp32 = p.pert.e_fp32;
    a.perturb_scale = p.pert.s.data_ptr<float>();
    a.perturb_before = perturb_before;
  }
  return p;
}

Tensor liq_quantize(const Tensor& x, const Tensor& clip, int64_t bits, bool is_signed,
                    bool standardize, const std::optional<Tensor>& perturbation,
                    const std::optional<Tensor>& perturb_scale, bool perturb_before) {
  const char* op = "liq_quantize";
  const c10::cuda::CUDAGuard guard(data_device(op, "x", x));
  LiqPrepared p = prepare_liq(op, x, clip, bits, is_signed, standardize, perturbation,
                              perturb_scale, perturb_before);
  Tensor y = at::empty_like(p.x, at::MemoryFormat::Contiguous);
  Tensor ws = workspace(lc::liq_quantize_workspace_bytes(p.args), p.x);
  check_launch(lc::liq_quantize_fwd(p.args, y.data_ptr(), ws.data_ptr(), current_stream()), op);
  return y;
}

std::tuple<Tensor, Tensor> liq_quantize_backward(const Tensor& grad, const Tensor& x,
                                                 const Tensor& clip, int64_t bits, bool is_signed,
                                                 bool standardize,
                                                 const std::optional<Tensor>& perturbation,
                                                 const std::optional<Tensor>& perturb_scale,
                                                 bool perturb_before, bool relu) {
  const char* op = "liq_quantize_backward";
  TORCH_CHECK(!(relu && is_signed), "saq_C::", op,
              ": relu=True needs an unsigned quantizer (signed=False)");
  const c10::cuda::CUDAGuard guard(data_device(op, "x", x));
  LiqPrepared p = prepare_liq(op, x, clip, bits, is_signed, standardize, perturbation,
                              perturb_scale, perturb_before);
  p.args.relu = relu;
  check_device(op, "grad", grad, x.device());
  check_same_shape(op, "grad", grad, x);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "saq_C::", op, ": 'grad' has dtype ",
              grad.scalar_type(), " but x has ", x.scalar_type(), "; pass grad.to(x.dtype)");
  const Tensor g = grad.contiguous();
  Tensor dx = at::empty_like(p.x, at::MemoryFormat::Contiguous);
  Tensor dclip = at::empty(clip.sizes(), clip.options().dtype(at::kFloat));
  Tensor ws = workspace(lc::liq_quantize_workspace_bytes(p.args), p.x);
  check_launch(lc::liq_quantize_bwd(p.args, g.data_ptr(), dx.data_ptr(), dclip.data_ptr<float>(),
                                    ws.data_ptr(), current_stream()),
               op);
  return {dx, dclip};
}

// ---------------------------------------------------------------------------------------------
// SAM multi-tensor ops
// ---------------------------------------------------------------------------------------------
std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_lengths(const char* op, size_t n, std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& [name, len] : lists) {
    TORCH_CHECK(len == n, "saq_C::", op, ": '", name, "' has ", len, " entries but 'params' has ",
                n, "; pass one per parameter");
  }
}

// saq_kernels/OPS.md: only params[:len(backups)] (the perturbed ones, put first) are restored.
void check_backup_prefix(const char* op, size_t n, size_t nb) {
  TORCH_CHECK(nb <= n, "saq_C::", op, ": 'backups' has ", nb, " entries but 'params' has ", n,
              "; pass at most one per parameter (the perturbed ones first)");
}

// Tensor i of every list: on the device, same shape and dtype as the first (the parameter).
void check_pair(const char* op, const char* name, size_t i, const Tensor& t, const Tensor& ref,
                const char* ref_name, const at::Device& device) {
  check_device(op, item(name, i), t, device);
  TORCH_CHECK(t.sizes() == ref.sizes(), "saq_C::", op, ": '", item(name, i), "' has shape ",
              t.sizes(), " but '", item(ref_name, i), "' has ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "saq_C::", op, ": '", item(name, i),
              "' has dtype ", t.scalar_type(), " but '", item(ref_name, i), "' has ",
              ref.scalar_type(), "; keep them in one dtype");
}

// True when the kernels can work on the tensors' storage directly: all dense (no gaps or
// overlaps) with identical strides, so flat index k is the same element in each.
bool same_dense_layout(std::initializer_list<const Tensor*> ts) {
  const Tensor& first = **ts.begin();
  if (!first.is_non_overlapping_and_dense()) return false;
  for (const Tensor* t : ts) {
    if (!t->is_non_overlapping_and_dense() || t->strides() != first.strides()) return false;
  }
  return true;
}

// A tensor the kernel writes: its own storage when the layout allows, else a contiguous copy
// written back by finish() (stream-ordered, no sync).
struct Writable {
  Tensor target, work;
  Writable(const Tensor& t, bool direct) : target(t), work(direct ? t : t.contiguous()) {}
  void* ptr() const { return work.data_ptr(); }
  void finish() const {
    if (!work.is_same(target)) target.copy_(work);
  }
};

// Tensors grouped by dtype: one launch sequence per group.
struct Group {
  std::vector<std::vector<void*>> ptrs;  // one vector per list
  std::vector<int64_t> numels;
  std::vector<uint8_t> flags;
  explicit Group(size_t lists = 0) : ptrs(lists) {}
};

std::optional<Tensor> found_inf_param(const char* op, const std::optional<Tensor>& found_inf,
                                      const at::Device& device) {
  if (!found_inf.has_value() || !found_inf->defined()) return std::nullopt;
  const Tensor& f = *found_inf;
  if (at::isIntegralType(f.scalar_type(), /*includeBool=*/true)) {
    // a bool / integer flag (~torch.isfinite(norm), a count): non-zero skips, as on the other
    // backends; converted on the device, no sync
    check_device(op, "found_inf", f, device);
    TORCH_CHECK(f.numel() == 1, "saq_C::", op,
                ": 'found_inf' must hold exactly one value (shape [] or [1]), got shape ", f.sizes());
    return f.ne(0).to(at::kFloat).contiguous();
  }
  return scalar_param(op, "found_inf", f, device, at::kFloat);
}

// The restore + step ops (SGD, AdamW) read, per parameter i, the value to update through its
// backup pointer. A parameter past the backup prefix is "restored" from itself: that pointer is
// p's own, so the same element is read once and written once. Checks p, its backup and its
// gradient; returns the tensor to read (backups[i], or p).
const Tensor& restore_source(const char* op, size_t i, const Tensor& p, TensorList backups,
                             TensorList grads, const at::Device& device) {
  check_device(op, item("params", i), p, device);
  kernel_dtype(op, item("params", i), p);
  const bool has_b = i < backups.size();
  if (has_b) check_pair(op, "backups", i, backups[i], p, "params", device);
  check_pair(op, "grads", i, grads[i], p, "params", device);
  return has_b ? backups[i] : p;
}

// Appends parameter i's first three pointer columns (p, its restore source, its gradient) and
// its size to a restore + step group; contiguous copies of the read-only inputs when the
// parameter's tensors do not share one dense layout (`direct` false) are kept alive in `keep`.
void push_restore_step(Group& grp, std::vector<Tensor>& keep, void* p_ptr, const Tensor& p,
                       const Tensor& source, bool has_backup, const Tensor& grad, bool direct) {
  Tensor b = (direct || !has_backup) ? source : source.contiguous();
  Tensor g = direct ? grad : grad.contiguous();
  keep.push_back(b);
  keep.push_back(g);
  grp.ptrs[0].push_back(p_ptr);
  grp.ptrs[1].push_back(has_backup ? b.data_ptr() : p_ptr);
  grp.ptrs[2].push_back(g.data_ptr());
  grp.numels.push_back(p.numel());
}

std::tuple<Tensor, Tensor> grad_sq_norm(TensorList grads, TensorList params,
                                        c10::List<bool> adaptive, double eta) {
  const char* op = "grad_sq_norm";
  TORCH_CHECK(params.size() == grads.size() && adaptive.size() == grads.size(), "saq_C::", op,
              ": 'grads', 'params' and 'adaptive' must have one entry per tensor, got ",
              grads.size(), ", ", params.size(), " and ", adaptive.size());
  if (grads.empty()) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    return {at::zeros({}, opts), at::zeros({}, opts)};
  }
  const at::Device device = data_device(op, "grads[0]", grads[0]);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> keep;
  std::map<at::ScalarType, Group> groups;
  for (size_t i = 0; i < grads.size(); ++i) {
    const bool ad = adaptive.get(i);
    Tensor g = grads[i];
    check_device(op, item("grads", i), g, device);
    kernel_dtype(op, item("grads", i), g);
    Tensor p = g;  // read only where adaptive
    if (ad) {
      check_device(op, item("params", i), params[i], device);
      TORCH_CHECK(params[i].sizes() == g.sizes(), "saq_C::", op, ": 'params[", i,
                  "]' has shape ", params[i].sizes(), " but 'grads[", i, "]' has ", g.sizes());
      p = params[i];
      if (!is_kernel_dtype(p.scalar_type()) || p.scalar_type() != g.scalar_type()) {
        check_float_kind(op, item("params", i), p);
        p = p.to(at::kFloat);  // the reference computes |p| + eta in fp32 anyway
        g = g.to(at::kFloat);
      }
      if (!same_dense_layout({&g, &p})) {
        g = g.contiguous();
        p = p.contiguous();
      }
    } else if (!g.is_non_overlapping_and_dense()) {
      g = g.contiguous();
    }
    keep.push_back(g);
    keep.push_back(p);
    Group& grp = groups.try_emplace(g.scalar_type(), 2).first->second;
    grp.ptrs[0].push_back(g.data_ptr());
    grp.ptrs[1].push_back(p.data_ptr());
    grp.numels.push_back(g.numel());
    grp.flags.push_back(ad ? 1 : 0);
  }
  int64_t count = 0;
  for (auto& [dt, grp] : groups) count += lc::sam_num_chunks(grp.numels.size(), grp.numels.data());
  const auto fopts = grads[0].options().dtype(at::kFloat);
  Tensor partials = at::empty({count > 0 ? count : 1}, fopts);
  Tensor norm_sq = at::empty({}, fopts);
  Tensor found_inf = at::empty({}, fopts);
  const cudaStream_t stream = current_stream();
  int64_t offset = 0;
  for (auto& [dt, grp] : groups) {
    check_launch(lc::grad_sq_norm_partials(lc_dtype(dt), grp.numels.size(), grp.ptrs[0].data(),
                                           grp.ptrs[1].data(), grp.numels.data(),
                                           grp.flags.data(), static_cast<float>(eta),
                                           partials.data_ptr<float>(), &offset, stream),
                 op);
  }
  check_launch(lc::grad_sq_norm_finish(partials.data_ptr<float>(), count, norm_sq.data_ptr<float>(),
                                       found_inf.data_ptr<float>(), stream),
               op);
  return {norm_sq, found_inf};
}

void sam_perturb_(TensorList params, TensorList grads, TensorList backups, const Tensor& scale,
                  c10::List<bool> adaptive) {
  const char* op = "sam_perturb_";
  const size_t n = params.size();
  check_lengths(op, n, {{"grads", grads.size()}, {"backups", backups.size()}, {"adaptive", adaptive.size()}});
  if (n == 0) return;
  const at::Device device = data_device(op, "params[0]", params[0]);
  const c10::cuda::CUDAGuard guard(device);
  check_device(op, "scale", scale, device);
  std::vector<Tensor> keep;
  std::vector<Writable> writes;
  writes.reserve(2 * n);
  std::map<at::ScalarType, Group> groups;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_device(op, item("params", i), p, device);
    kernel_dtype(op, item("params", i), p);
    check_pair(op, "grads", i, grads[i], p, "params", device);
    check_pair(op, "backups", i, backups[i], p, "params", device);
    const bool direct = same_dense_layout({&p, &grads[i], &backups[i]});
    writes.emplace_back(p, direct);
    void* p_ptr = writes.back().ptr();
    writes.emplace_back(backups[i], direct);
    void* b_ptr = writes.back().ptr();
    Tensor g = direct ? grads[i] : grads[i].contiguous();
    keep.push_back(g);
    Group& grp = groups.try_emplace(p.scalar_type(), 3).first->second;
    grp.ptrs[0].push_back(p_ptr);
    grp.ptrs[1].push_back(g.data_ptr());
    grp.ptrs[2].push_back(b_ptr);
    grp.numels.push_back(p.numel());
    grp.flags.push_back(adaptive.get(i) ? 1 : 0);
  }
  const cudaStream_t stream = current_stream();
  for (auto& [dt, grp] : groups) {
    // The reference casts the 0-dim scale to the parameter dtype: scale.to(p.dtype).
    const Tensor s = scalar_param(op, "scale", scale, device, dt);
    keep.push_back(s);
    check_launch(lc::sam_perturb(lc_dtype(dt), grp.numels.size(), grp.ptrs[0].data(),
                                 grp.ptrs[1].data(), grp.ptrs[2].data(), grp.numels.data(),
                                 grp.flags.data(),
                                 s.data_ptr(), stream),
                 op);
  }
  for (const Writable& w : writes) w.finish();
}

void sam_restore_(TensorList params, TensorList backups) {
  const char* op = "sam_restore_";
  const size_t n = params.size();
  check_lengths(op, n, {{"backups", backups.size()}});
  if (n == 0) return;
  const at::Device device = data_device(op, "params[0]", params[0]);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<void*> dst, src;
  std::vector<int64_t> nbytes;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_device(op, item("params", i), p, device);
    check_pair(op, "backups", i, backups[i], p, "params", device);
    if (same_dense_layout({&p, &backups[i]})) {
      dst.push_back(p.data_ptr());
      src.push_back(backups[i].data_ptr());
      nbytes.push_back(p.numel() * static_cast<int64_t>(p.element_size()));
    } else {
      p.copy_(backups[i]);  // rare layouts: a plain copy is just as exact
    }
  }
  check_launch(lc::sam_restore(dst.size(), dst.data(), src.data(), nbytes.data(), current_stream()),
               op);
}

void sam_restore_sgd_(TensorList params, TensorList backups, TensorList grads,
                      TensorList momentum_buffers, const Tensor& lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool first_step,
                      const std::optional<Tensor>& found_inf) {
  const char* op = "sam_restore_sgd_";
  const size_t n = params.size();
  const bool use_buf = momentum != 0.0;
  check_lengths(op, n, {{"grads", grads.size()}});
  check_backup_prefix(op, n, backups.size());
  if (use_buf) check_lengths(op, n, {{"momentum_buffers", momentum_buffers.size()}});
  if (n == 0) return;
  const at::Device device = data_device(op, "params[0]", params[0]);
  const c10::cuda::CUDAGuard guard(device);
  check_device(op, "lr", lr, device);
  const std::optional<Tensor> fi = found_inf_param(op, found_inf, device);
  std::vector<Tensor> keep;
  std::vector<Writable> writes;
  writes.reserve(2 * n);
  std::map<at::ScalarType, Group> groups;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& bk = restore_source(op, i, p, backups, grads, device);
    // Without momentum the buffers are never touched (the Python wrapper passes grads there).
    const Tensor& buf = use_buf ? momentum_buffers[i] : grads[i];
    if (use_buf) check_pair(op, "momentum_buffers", i, buf, p, "params", device);
    const bool direct = same_dense_layout({&p, &bk, &grads[i], &buf});
    writes.emplace_back(p, direct);
    void* p_ptr = writes.back().ptr();
    void* buf_ptr = nullptr;
    if (use_buf) {
      writes.emplace_back(buf, direct);
      buf_ptr = writes.back().ptr();
    }
    Group& grp = groups.try_emplace(p.scalar_type(), 4).first->second;
    push_restore_step(grp, keep, p_ptr, p, bk, i < backups.size(), grads[i], direct);
    grp.ptrs[3].push_back(use_buf ? buf_ptr : grp.ptrs[2].back());
  }
  const cudaStream_t stream = current_stream();
  for (auto& [dt, grp] : groups) {
    const Tensor lr_t = scalar_param(op, "lr", lr, device, dt);  // lr.to(p.dtype), as the reference
    keep.push_back(lr_t);
    lc::SgdArgs a;
    a.lr = lr_t.data_ptr();
    a.found_inf = fi.has_value() ? fi->data_ptr<float>() : nullptr;
    a.momentum = momentum;
    a.dampening = dampening;
    a.weight_decay = weight_decay;
    a.nesterov = nesterov;
    a.first_step = first_step;
    check_launch(lc::sam_restore_sgd(lc_dtype(dt), grp.numels.size(), grp.ptrs[0].data(),
                                     grp.ptrs[1].data(), grp.ptrs[2].data(), grp.ptrs[3].data(),
                                     grp.numels.data(), a, stream),
                 op);
  }
  for (const Writable& w : writes) w.finish();
}

void sam_restore_adamw_(TensorList params, TensorList backups, TensorList grads,
                        TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                        const Tensor& lr, double beta1, double beta2, double eps,
                        double weight_decay, const std::optional<Tensor>& found_inf) {
  const char* op = "sam_restore_adamw_";
  const size_t n = params.size();
  check_lengths(op, n, {{"grads", grads.size()}, {"exp_avgs", exp_avgs.size()},
                        {"exp_avg_sqs", exp_avg_sqs.size()}, {"steps", steps.size()}});
  check_backup_prefix(op, n, backups.size());
  if (n == 0) return;
  const at::Device device = data_device(op, "params[0]", params[0]);
  const c10::cuda::CUDAGuard guard(device);
  check_device(op, "lr", lr, device);
  const std::optional<Tensor> fi = found_inf_param(op, found_inf, device);
  std::vector<Tensor> keep;
  std::vector<Writable> writes;
  writes.reserve(3 * n);
  std::map<at::ScalarType, Group> groups;
  std::map<at::ScalarType, std::vector<float*>> group_steps;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Tensor& bk = restore_source(op, i, p, backups, grads, device);
    check_pair(op, "exp_avgs", i, exp_avgs[i], p, "params", device);
    check_pair(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, "params", device);
    const Tensor& st = steps[i];
    TORCH_CHECK(st.defined() && st.is_cuda() && st.device() == device, "saq_C::", op, ": 'steps[",
                i, "]' must be a 0-dim float32 tensor on ", device, " (torch.optim.AdamW keeps its "
                "steps on the CPU unless capturable=True or fused=True); move it with .to('",
                device, "')");
    TORCH_CHECK(st.scalar_type() == at::kFloat && st.numel() == 1, "saq_C::", op, ": 'steps[", i,
                "]' must be a float32 tensor with one element, got ", st.scalar_type(), " of shape ",
                st.sizes());
    const bool direct = same_dense_layout({&p, &bk, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]});
    writes.emplace_back(p, direct);
    void* p_ptr = writes.back().ptr();
    writes.emplace_back(exp_avgs[i], direct);
    void* m_ptr = writes.back().ptr();
    writes.emplace_back(exp_avg_sqs[i], direct);
    void* v_ptr = writes.back().ptr();
    Group& grp = groups.try_emplace(p.scalar_type(), 5).first->second;
    push_restore_step(grp, keep, p_ptr, p, bk, i < backups.size(), grads[i], direct);
    grp.ptrs[3].push_back(m_ptr);
    grp.ptrs[4].push_back(v_ptr);
    group_steps[p.scalar_type()].push_back(st.data_ptr<float>());
  }
  const cudaStream_t stream = current_stream();
  for (auto& [dt, grp] : groups) {
    const Tensor lr_t = scalar_param(op, "lr", lr, device, dt);
    keep.push_back(lr_t);
    lc::AdamWArgs a;
    a.lr = lr_t.data_ptr();
    a.found_inf = fi.has_value() ? fi->data_ptr<float>() : nullptr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.weight_decay = weight_decay;
    check_launch(lc::sam_restore_adamw(lc_dtype(dt), grp.numels.size(), grp.ptrs[0].data(),
                                       grp.ptrs[1].data(), grp.ptrs[2].data(), grp.ptrs[3].data(),
                                       grp.ptrs[4].data(),
                                       group_steps[dt].data(), grp.numels.data(), a, stream),
                 op);
  }
  for (const Writable& w : writes) w.finish();
}

}  // namespace
}  // namespace cuda_register
}  // namespace saq

TORCH_LIBRARY_IMPL(saq_C, CUDA, m) {
  namespace r = saq::cuda_register;
  m.impl("fake_quantize", &r::fake_quantize);
  m.impl("fake_quantize_backward", &r::fake_quantize_backward);
  m.impl("liq_quantize", &r::liq_quantize);
  m.impl("liq_quantize_backward", &r::liq_quantize_backward);
  m.impl("grad_sq_norm", &r::grad_sq_norm);
  m.impl("sam_perturb_", &r::sam_perturb_);
  m.impl("sam_restore_", &r::sam_restore_);
  m.impl("sam_restore_sgd_", &r::sam_restore_sgd_);
  m.impl("sam_restore_adamw_", &r::sam_restore_adamw_);
}

#endif  // WITH_CUDA
