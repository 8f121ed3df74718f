// Native schemas of the saq_C ops (saq_kernels/OPS.md, "Native schemas") and their CPU kernels.
//
// The CUDA kernels register under the same schemas in csrc/cuda_register.cpp (built only with
// CUDA). Fakes (meta functions for torch.compile / opcheck) are registered in Python, in the
// module named by set_python_module below, once the library is loaded.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(saq_C, m) {
  m.set_python_module("saq_kernels.backends.native_backend");
  m.def(
      "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis, float grad_factor, Tensor? perturbation, Tensor? perturb_scale, "
      "bool perturb_before, bool relu=False) -> Tensor");
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, int? axis, float grad_factor, Tensor? perturbation, "
      "Tensor? perturb_scale, bool perturb_before, bool relu=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "liq_quantize(Tensor x, Tensor clip, int bits, bool signed, bool standardize, "
      "Tensor? perturbation, Tensor? perturb_scale, bool perturb_before) -> Tensor");
  m.def(
      "liq_quantize_backward(Tensor grad, Tensor x, Tensor clip, int bits, bool signed, "
      "bool standardize, Tensor? perturbation, Tensor? perturb_scale, bool perturb_before, "
      "bool relu=False) -> (Tensor, Tensor)");
  m.def(
      "grad_sq_norm(Tensor[] grads, Tensor[] params, bool[] adaptive, float eta) "
      "-> (Tensor, Tensor)");
  m.def(
      "sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scale, "
      "bool[] adaptive) -> ()");
  m.def("sam_restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "sam_restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool first_step, Tensor? found_inf) -> ()");
  m.def(
      "sam_restore_adamw_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr, "
      "float beta1, float beta2, float eps, float weight_decay, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(saq_C, CPU, m) {
  m.impl("fake_quantize", &saq_cpu::fake_quantize);
  m.impl("fake_quantize_backward", &saq_cpu::fake_quantize_backward);
  m.impl("liq_quantize", &saq_cpu::liq_quantize);
  m.impl("liq_quantize_backward", &saq_cpu::liq_quantize_backward);
  m.impl("grad_sq_norm", &saq_cpu::grad_sq_norm);
  m.impl("sam_perturb_", &saq_cpu::sam_perturb_);
  m.impl("sam_restore_", &saq_cpu::sam_restore_);
  m.impl("sam_restore_sgd_", &saq_cpu::sam_restore_sgd_);
  m.impl("sam_restore_adamw_", &saq_cpu::sam_restore_adamw_);
}

// `import saq_kernels._C` (or the JIT module) runs the registrations above; the module itself
// only says whether CUDA kernels were compiled in. Its init also imports the Python module with
// the fakes (torch only names it in an error when a fake is missing), so a direct import of the
// extension traces under torch.compile too.
#define SAQ_STR2(x) #x
#define SAQ_STR(x) SAQ_STR2(x)
#define SAQ_CAT2(a, b) a##b
#define SAQ_CAT(a, b) SAQ_CAT2(a, b)

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PyMODINIT_FUNC SAQ_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, SAQ_STR(TORCH_EXTENSION_NAME),
                            "saq_C ops (registered with torch.library; call torch.ops.saq_C.*)",
                            -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyObject* fakes = PyImport_ImportModule("saq_kernels.backends.native_backend");
  if (fakes == nullptr) {
    PyErr_Clear();  // the ops work without their fakes; only tracing needs them
  } else {
    Py_DECREF(fakes);
  }
  return mod;
}
