// liq_quantize (the LIQ quantizer of SAQ) on CPU: forward and backward.
//
// Work items are kBlock slices of the flat tensor. With `standardize`, two deterministic passes
// first compute mean and unbiased std of x (or x + s*e) in double: sum -> mean, then the sum of
// squared deviations from that mean (the two-pass formula, no cancellation); both are rounded
// to fp32 once and then used like the reference's fp32 statistics. They are correctly rounded,
// while torch's fp32 mean may be off in the last bit, so on rare elements next to a rounding
// boundary the code can differ by one level (saq_kernels/OPS.md allows this for standardize).
// Math per element: saq::liq_forward / saq::liq_backward (csrc/common/saq_math.h).
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

#include "kernel_utils.h"
#include "ops.h"

namespace saq_cpu {
namespace {

struct Stats {
  bool on = false;
  float mean = 0.0f, std = 1.0f;
};

// ---------------------------------------------------------------------------------------------
// fp32 kernels (one clone per ISA)
// ---------------------------------------------------------------------------------------------
template <bool BEFORE>
SAQ_INLINE float perturbed(const float* __restrict x, const float* __restrict e, float s,
                           int64_t i) {
  return BEFORE ? saq::add_scaled(x[i], s, e[i]) : x[i];
}

template <int MODE, bool STD>
SAQ_INLINE void fwd_loop(const float* __restrict x, const float* __restrict e, float s,
                         float* __restrict y, int64_t n, float c, float levels, bool is_signed,
                         float mean, float std) {
  for (int64_t i = 0; i < n; ++i) {
    const float xp = perturbed<MODE == kPerturbBefore>(x, e, s, i);
    const float xs = STD ? (xp - mean) / std : xp;
    const float q = saq::liq_forward(xs, c, levels, is_signed);
    y[i] = MODE == kPerturbAfter ? saq::add_scaled(q, s, e[i]) : q;
  }
}

template <int MODE, bool STD>
SAQ_INLINE void fwd_signs(const float* x, const float* e, float s, float* y, int64_t n, float c,
                          float levels, bool is_signed, float mean, float std) {
  // Separate loops per sign so each one is a straight line the vectorizer takes.
  if (is_signed) {
    fwd_loop<MODE, STD>(x, e, s, y, n, c, levels, true, mean, std);
  } else {
    fwd_loop<MODE, STD>(x, e, s, y, n, c, levels, false, mean, std);
  }
}

template <bool STD>
SAQ_INLINE void fwd_modes(int mode, const float* x, const float* e, float s, float* y, int64_t n,
                          float c, float levels, bool is_signed, float mean, float std) {
  if (mode == kPerturbBefore) {
    fwd_signs<kPerturbBefore, STD>(x, e, s, y, n, c, levels, is_signed, mean, std);
  } else if (mode == kPerturbAfter) {
    fwd_signs<kPerturbAfter, STD>(x, e, s, y, n, c, levels, is_signed, mean, std);
  } else {
    fwd_signs<kNoPerturb, STD>(x, e, s, y, n, c, levels, is_signed, mean, std);
  }
}

SAQ_CLONES void fwd_kernel(const float* x, const float* e, float s, int mode, float* y, int64_t n,
                           float c, float levels, bool is_signed, bool standardize, float mean,
                           float std) {
  if (standardize) {
    fwd_modes<true>(mode, x, e, s, y, n, c, levels, is_signed, mean, std);
  } else {
    fwd_modes<false>(mode, x, e, s, y, n, c, levels, is_signed, mean, std);
  }
}

// dx (/ std when standardized), and the clip-gradient terms summed into kLanes double
// accumulators (lane l takes the elements i = l mod kLanes, in order), fused as in
// fake_quantize's backward.
template <bool BEFORE, bool STD, bool SIGNED, bool RELU>
SAQ_INLINE void bwd_loop(const float* __restrict x, const float* __restrict e, float s,
                         const float* __restrict g, float* __restrict dx, int64_t n, float c,
                         float levels, float mean, float std, double* lanes) {
  lane_sum(n, lanes, [&](int64_t i) SAQ_LAMBDA_INLINE {
    const float xp = perturbed<BEFORE>(x, e, s, i);
    const float xs = STD ? (xp - mean) / std : xp;
    float d, t;
    saq::liq_backward(xs, g[i], c, levels, SIGNED, &d, &t, RELU);
    dx[i] = STD ? d / std : d;
    return static_cast<double>(t);
  });
}

// relu is only ever set for unsigned quantizers (the Python wrapper refuses it otherwise).
template <bool BEFORE, bool STD>
SAQ_INLINE void bwd_signs(const float* x, const float* e, float s, const float* g, float* dx,
                          int64_t n, float c, float levels, bool is_signed, bool relu, float mean,
                          float std, double* lanes) {
  if (is_signed) {
    bwd_loop<BEFORE, STD, true, false>(x, e, s, g, dx, n, c, levels, mean, std, lanes);
  } else if (relu) {
    bwd_loop<BEFORE, STD, false, true>(x, e, s, g, dx, n, c, levels, mean, std, lanes);
  } else {
    bwd_loop<BEFORE, STD, false, false>(x, e, s, g, dx, n, c, levels, mean, std, lanes);
  }
}

SAQ_CLONES void bwd_kernel(const float* x, const float* e, float s, bool before, const float* g,
                           float* dx, int64_t n, float c, float levels, bool is_signed, bool relu,
                           bool standardize, float mean, float std, double* lanes) {
  if (before) {
    if (standardize) {
      bwd_signs<true, true>(x, e, s, g, dx, n, c, levels, is_signed, relu, mean, std, lanes);
    } else {
      bwd_signs<true, false>(x, e, s, g, dx, n, c, levels, is_signed, relu, mean, std, lanes);
    }
  } else if (standardize) {
    bwd_signs<false, true>(x, e, s, g, dx, n, c, levels, is_signed, relu, mean, std, lanes);
  } else {
    bwd_signs<false, false>(x, e, s, g, dx, n, c, levels, is_signed, relu, mean, std, lanes);
  }
}

// lanes += xp (pass 1 of the statistics).
template <bool BEFORE>
SAQ_INLINE void sum_loop(const float* __restrict x, const float* __restrict e, float s, int64_t n,
                         double* lanes) {
  lane_sum(n, lanes, [&](int64_t i) SAQ_LAMBDA_INLINE {
    return static_cast<double>(perturbed<BEFORE>(x, e, s, i));
  });
}

SAQ_CLONES void sum_kernel(const float* x, const float* e, float s, bool before, int64_t n,
                           double* lanes) {
  if (before) {
    sum_loop<true>(x, e, s, n, lanes);
  } else {
    sum_loop<false>(x, e, s, n, lanes);
  }
}

// lanes += (xp - mean)^2 in double (pass 2).
template <bool BEFORE>
SAQ_INLINE void sqdev_loop(const float* __restrict x, const float* __restrict e, float s,
                           int64_t n, double mean, double* lanes) {
  lane_sum(n, lanes, [&](int64_t i) SAQ_LAMBDA_INLINE {
    const double d = static_cast<double>(perturbed<BEFORE>(x, e, s, i)) - mean;
    return d * d;
  });
}

SAQ_CLONES void sqdev_kernel(const float* x, const float* e, float s, bool before, int64_t n,
                             double mean, double* lanes) {
  if (before) {
    sqdev_loop<true>(x, e, s, n, mean, lanes);
  } else {
    sqdev_loop<false>(x, e, s, n, mean, lanes);
  }
}

// ---------------------------------------------------------------------------------------------
// Driver helpers
// ---------------------------------------------------------------------------------------------
int64_t n_items(int64_t numel) { return ceil_div(numel, kBlock); }
int64_t grain() { return std::max<int64_t>(1, kGrain / kBlock); }

// Sum over all elements of a per-tile lane reduction, deterministic: items in order.
template <class TileFn>
double reduce_items(int64_t numel, const TileFn& tile_fn) {
  const int64_t items = n_items(numel);
  std::vector<double> part(items);
  at::parallel_for(0, items, grain(), [&](int64_t k0, int64_t k1) {
    alignas(64) float bx[kTile], be[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      double lanes[kLanes] = {0.0};
      const int64_t start = k * kBlock, len = std::min(kBlock, numel - start);
      for (int64_t off = 0; off < len; off += kTile) {
        tile_fn(start + off, std::min(kTile, len - off), bx, be, lanes);
      }
      part[k] = lane_total(lanes);
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

Stats compute_stats(const In& xin, const Perturbation& pert, int64_t numel) {
  Stats st;
  st.on = true;
  const bool before = pert.mode == kPerturbBefore;
  const In ein = before ? pert.in : In{};
  const double sum = reduce_items(numel, [&](int64_t o, int64_t n, float* bx, float* be,
                                             double* lanes) {
    sum_kernel(load(xin, o, n, bx), load(ein, o, n, be), pert.s, before, n, lanes);
  });
  const double mean = sum / static_cast<double>(numel);
  const double m2 = reduce_items(numel, [&](int64_t o, int64_t n, float* bx, float* be,
                                            double* lanes) {
    sqdev_kernel(load(xin, o, n, bx), load(ein, o, n, be), pert.s, before, n, mean, lanes);
  });
  // Unbiased: numel == 1 gives 0/0 = NaN, as torch.std does.
  st.mean = static_cast<float>(mean);
  st.std = static_cast<float>(std::sqrt(m2 / static_cast<double>(numel - 1)));
  return st;
}

struct ClipInfo {
  float c = 1.0f;     // |clip|
  float sign = 1.0f;  // sign(clip)
  float levels = 1.0f;
};

ClipInfo make_clip(const char* op, const at::Tensor& clip, int64_t bits) {
  TORCH_CHECK(clip.device().is_cpu(), op, ": 'clip' is on ", clip.device(),
              "; the CPU kernel needs it on the CPU");
  TORCH_CHECK(bits >= 1 && bits <= 16, op, ": bits=", bits,
              " is not supported by the kernel; use 2..8 (bits=32 is handled by the Python "
              "wrapper, which skips quantization)");
  ClipInfo ci;
  const float v = scalar_f32(op, "clip", clip);
  ci.c = std::fabs(v);
  ci.sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
  ci.levels = static_cast<float>((int64_t{1} << bits) - 1);
  return ci;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
at::Tensor liq_quantize(const at::Tensor& x, const at::Tensor& clip, int64_t bits, bool is_signed,
                        bool standardize, const std::optional<at::Tensor>& perturbation,
                        const std::optional<at::Tensor>& perturb_scale, bool perturb_before) {
  const char* op = "saq_C::liq_quantize";
  check_compute_input(op, "x", x);
  const ClipInfo ci = make_clip(op, clip, bits);
  const Perturbation pert = make_perturbation(op, x, perturbation, perturb_scale, perturb_before);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  const In xin = in_of(xc);
  const Out yout = out_of(y);
  const Stats st = standardize ? compute_stats(xin, pert, numel) : Stats{};

  at::parallel_for(0, n_items(numel), grain(), [&](int64_t k0, int64_t k1) {
    alignas(64) float bx[kTile], be[kTile], by[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t start = k * kBlock, len = std::min(kBlock, numel - start);
      for (int64_t off = 0; off < len; off += kTile) {
        const int64_t n = std::min(kTile, len - off), o = start + off;
        float* yf = out_ptr(yout, o, by);
        fwd_kernel(load(xin, o, n, bx), load(pert.in, o, n, be), pert.s, pert.mode, yf, n, ci.c,
                   ci.levels, is_signed, st.on, st.mean, st.std);
        commit(yout, o, n, by);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> liq_quantize_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& clip, int64_t bits,
    bool is_signed, bool standardize, const std::optional<at::Tensor>& perturbation,
    const std::optional<at::Tensor>& perturb_scale, bool perturb_before, bool relu) {
  const char* op = "saq_C::liq_quantize_backward";
  TORCH_CHECK(!(relu && is_signed), op, ": relu=True needs an unsigned quantizer (signed=False)");
  check_compute_input(op, "x", x);
  check_float_cpu(op, "grad", grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": 'grad' has shape ", grad.sizes(), " but x has ",
              x.sizes());
  const ClipInfo ci = make_clip(op, clip, bits);
  const Perturbation pert = make_perturbation(op, x, perturbation, perturb_scale, perturb_before);
  const bool before = pert.mode == kPerturbBefore;
  const In ein = before ? pert.in : In{};  // Q(x) + s*e: the backward ignores e
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dclip = at::empty(
      clip.sizes(), clip.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = x.numel();
  if (numel == 0) {
    dclip.data_ptr<float>()[0] = 0.0f;
    return {dx, dclip};
  }
  const In xin = in_of(xc), gin = in_of(gc);
  const Out dxout = out_of(dx);
  const Stats st = standardize ? compute_stats(xin, pert, numel) : Stats{};

  const int64_t items = n_items(numel);
  std::vector<double> part(items);
  at::parallel_for(0, items, grain(), [&](int64_t k0, int64_t k1) {
    alignas(64) float bx[kTile], be[kTile], bg[kTile], bdx[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      double lanes[kLanes] = {0.0};
      const int64_t start = k * kBlock, len = std::min(kBlock, numel - start);
      for (int64_t off = 0; off < len; off += kTile) {
        const int64_t n = std::min(kTile, len - off), o = start + off;
        float* dxf = out_ptr(dxout, o, bdx);
        bwd_kernel(load(xin, o, n, bx), load(ein, o, n, be), pert.s, before, load(gin, o, n, bg),
                   dxf, n, ci.c, ci.levels, is_signed, relu, st.on, st.mean, st.std, lanes);
        commit(dxout, o, n, bdx);
      }
      part[k] = lane_total(lanes);
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  // Reference: sum(g * local) in fp32, times sign(clip) in fp32.
  dclip.data_ptr<float>()[0] = static_cast<float>(total) * ci.sign;
  return {dx, dclip};
}

}  // namespace saq_cpu
