// fake_quantize (LSQ / LSQ+ affine fake quantization) on CPU: forward and backward.
//
// x is viewed as [outer, C, inner] (C = x.shape[axis]; per tensor C = 1 and inner = numel).
// Two layouts of the work, both cut into items of a fixed size (see kernel_utils.h):
//  * rows (per tensor, or inner >= kRowMin): a run of `inner` contiguous elements shares one
//    channel; an item is a kBlock slice of one row and the kernels take scalar parameters;
//  * periodic (inner < kRowMin, e.g. axis = -1): the parameters change along the contiguous dim
//    with period P = C * inner, so they are expanded to per-position arrays; an item is a block
//    of rows times a tile of <= kTile columns, and the backward accumulates per column.
// Math per element: saq::fq_forward / saq::fq_backward (csrc/common/saq_math.h).
#include <ATen/ops/empty.h>

#include <vector>

#include "kernel_utils.h"
#include "ops.h"

namespace saq_cpu {
namespace {

constexpr int64_t kRowMin = 256;  // shorter channel runs use the periodic layout
// Rows per periodic item, at least: bounds the backward's per-column partials to numel / 4 bytes.
constexpr int64_t kMinRowsPerItem = 64;

// ---------------------------------------------------------------------------------------------
// fp32 kernels (one clone per ISA)
// ---------------------------------------------------------------------------------------------
struct Uni {  // one parameter value for the whole run
  float v;
  SAQ_INLINE float operator[](int64_t) const { return v; }
};
struct Arr {  // one parameter value per element of the run
  const float* p;
  SAQ_INLINE float operator[](int64_t i) const { return p[i]; }
};

template <int MODE, class P>
SAQ_INLINE void fwd_loop(const float* __restrict x, const float* __restrict e, float s,
                         float* __restrict y, int64_t n, P scale, P inv, P zp, float qmin,
                         float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float xp = MODE == kPerturbBefore ? saq::add_scaled(x[i], s, e[i])
                     : MODE == kReluInput    ? saq::relu_input(x[i])
                                             : x[i];
    const float q = saq::fq_forward(xp, scale[i], inv[i], zp[i], qmin, qmax);
    y[i] = MODE == kPerturbAfter ? saq::add_scaled(q, s, e[i]) : q;
  }
}

template <class P>
SAQ_INLINE void fwd_modes(int mode, const float* x, const float* e, float s, float* y, int64_t n,
                          P scale, P inv, P zp, float qmin, float qmax) {
  if (mode == kPerturbBefore) {
    fwd_loop<kPerturbBefore>(x, e, s, y, n, scale, inv, zp, qmin, qmax);
  } else if (mode == kPerturbAfter) {
    fwd_loop<kPerturbAfter>(x, e, s, y, n, scale, inv, zp, qmin, qmax);
  } else if (mode == kReluInput) {
    fwd_loop<kReluInput>(x, e, s, y, n, scale, inv, zp, qmin, qmax);
  } else {
    fwd_loop<kNoPerturb>(x, e, s, y, n, scale, inv, zp, qmin, qmax);
  }
}

SAQ_CLONES void fwd_uniform(const float* x, const float* e, float s, int mode, float* y,
                            int64_t n, float scale, float inv, float zp, float qmin, float qmax) {
  fwd_modes(mode, x, e, s, y, n, Uni{scale}, Uni{inv}, Uni{zp}, qmin, qmax);
}

SAQ_CLONES void fwd_periodic(const float* x, const float* e, float s, int mode, float* y,
                             int64_t n, const float* scale, const float* inv, const float* zp,
                             float qmin, float qmax) {
  fwd_modes(mode, x, e, s, y, n, Arr{scale}, Arr{inv}, Arr{zp}, qmin, qmax);
}

// Periodic layout: dx and the per-element scale / zero-point terms into scratch arrays, which
// the caller sums per column. MODE: kNoPerturb, kPerturbBefore or kReluInput (the backward of
// Q(x) + s*e does not read e).
template <int MODE, class P>
SAQ_INLINE void bwd_loop(const float* __restrict x, const float* __restrict e, float s,
                         const float* __restrict g, float* __restrict dx, float* __restrict ds,
                         float* __restrict dz, int64_t n, P scale, P inv, P zp, float qmin,
                         float qmax, float gf) {
  for (int64_t i = 0; i < n; ++i) {
    const float xp = MODE == kPerturbBefore ? saq::add_scaled(x[i], s, e[i]) : x[i];
    float a, b, c;
    saq::fq_backward(xp, g[i], scale[i], inv[i], zp[i], qmin, qmax, gf, &a, &b, &c,
                     MODE == kReluInput);
    dx[i] = a;
    ds[i] = b;
    dz[i] = c;
  }
}

// Rows layout: dx, and the scale / zero-point terms summed straight into kLanes double
// accumulators (lane l takes the elements i = l mod kLanes of the run, in order). Fusing the sum
// into this loop instead of a second pass over a scratch tile: 0.78 -> 0.52 ms per 2^20 fp32
// elements, one thread, warm buffers (Sapphire Rapids VM, AVX-512 clone, gcc 12).
template <int MODE>
SAQ_INLINE void bwd_sum_loop(const float* __restrict x, const float* __restrict e, float s,
                             const float* __restrict g, float* __restrict dx, int64_t n,
                             float scale, float inv, float zp, float qmin, float qmax, float gf,
                             double* lanes_ds, double* lanes_dz) {
  auto term = [&](int64_t i, double& sum_ds, double& sum_dz) SAQ_LAMBDA_INLINE {
    const float xp = MODE == kPerturbBefore ? saq::add_scaled(x[i], s, e[i]) : x[i];
    float a, b, c;
    saq::fq_backward(xp, g[i], scale, inv, zp, qmin, qmax, gf, &a, &b, &c, MODE == kReluInput);
    dx[i] = a;
    sum_ds += static_cast<double>(b);
    sum_dz += static_cast<double>(c);
  };
  lane_sum2(n, lanes_ds, lanes_dz, term);
}

SAQ_CLONES void bwd_uniform(const float* x, const float* e, float s, int mode, const float* g,
                            float* dx, int64_t n, float scale, float inv, float zp, float qmin,
                            float qmax, float gf, double* lanes_ds, double* lanes_dz) {
  if (mode == kPerturbBefore) {
    bwd_sum_loop<kPerturbBefore>(x, e, s, g, dx, n, scale, inv, zp, qmin, qmax, gf, lanes_ds,
                                 lanes_dz);
  } else if (mode == kReluInput) {
    bwd_sum_loop<kReluInput>(x, e, s, g, dx, n, scale, inv, zp, qmin, qmax, gf, lanes_ds,
                             lanes_dz);
  } else {
    bwd_sum_loop<kNoPerturb>(x, e, s, g, dx, n, scale, inv, zp, qmin, qmax, gf, lanes_ds,
                             lanes_dz);
  }
}

SAQ_CLONES void bwd_periodic(const float* x, const float* e, float s, int mode, const float* g,
                             float* dx, float* ds, float* dz, int64_t n, const float* scale,
                             const float* inv, const float* zp, float qmin, float qmax, float gf) {
  const Arr sc{scale}, iv{inv}, z{zp};
  if (mode == kPerturbBefore) {
    bwd_loop<kPerturbBefore>(x, e, s, g, dx, ds, dz, n, sc, iv, z, qmin, qmax, gf);
  } else if (mode == kReluInput) {
    bwd_loop<kReluInput>(x, e, s, g, dx, ds, dz, n, sc, iv, z, qmin, qmax, gf);
  } else {
    bwd_loop<kNoPerturb>(x, e, s, g, dx, ds, dz, n, sc, iv, z, qmin, qmax, gf);
  }
}

// acc[j] += t[j]: per-column sums of the periodic layout (vertical adds, vectorizable as is).
SAQ_CLONES void col_add(const float* __restrict t, int64_t n, double* __restrict acc) {
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(t[j]);
}

// ---------------------------------------------------------------------------------------------
// Layout, parameters, work items
// ---------------------------------------------------------------------------------------------
struct Layout {
  int64_t numel = 0, outer = 1, C = 1, inner = 1;
  bool periodic = false;
  int64_t items = 0;       // work items
  int64_t item_elems = 1;  // elements per item (the last ones may hold fewer)
  // rows layout
  int64_t row_slices = 1;  // kBlock slices per row
  // periodic layout
  int64_t P = 1;              // period: C * inner
  int64_t T = 1;              // columns per tile
  int64_t col_tiles = 1;      // tiles across P
  int64_t rows_per_call = 1;  // whole rows per kernel call when P <= kTile
  int64_t rows_per_item = 1;
};

Layout make_layout(const at::Tensor& x, std::optional<int64_t> axis) {
  Layout L;
  L.numel = x.numel();
  L.inner = L.numel;
  if (axis.has_value()) {
    const int64_t dim = x.dim();
    const int64_t ax = *axis < 0 ? *axis + dim : *axis;
    L.C = x.size(ax);
    if (L.C > 1) {
      L.outer = 1;
      for (int64_t d = 0; d < ax; ++d) L.outer *= x.size(d);
      L.inner = 1;
      for (int64_t d = ax + 1; d < dim; ++d) L.inner *= x.size(d);
    }
  }
  if (L.C <= 1) {  // per tensor, or a single channel: one run of numel elements
    L.C = 1;
    L.outer = 1;
    L.inner = L.numel;
  }
  // (an empty tensor takes the rows layout: its period C * inner would be 0, a divisor below)
  L.periodic = L.C > 1 && L.inner < kRowMin && L.numel > 0;
  if (!L.periodic) {
    L.row_slices = std::max<int64_t>(1, ceil_div(L.inner, kBlock));
    L.items = L.outer * L.C * L.row_slices;
    L.item_elems = std::max<int64_t>(1, std::min(L.inner, kBlock));
  } else {
    L.P = L.C * L.inner;
    if (L.P <= kTile) {
      L.T = L.P;
      L.col_tiles = 1;
      L.rows_per_call = kTile / L.P;
    } else {
      L.T = kTile;
      L.col_tiles = ceil_div(L.P, kTile);
      L.rows_per_call = 1;
    }
    int64_t rpi = std::max(kMinRowsPerItem, ceil_div(kBlock, L.T));
    L.rows_per_item = ceil_div(rpi, L.rows_per_call) * L.rows_per_call;
    L.items = ceil_div(L.outer, L.rows_per_item) * L.col_tiles;
    L.item_elems = L.rows_per_item * L.T;
  }
  return L;
}

// Per-channel parameters (rows layout: C entries) or per-position ones (periodic layout: one
// entry per column of a kernel call, i.e. rows_per_call * P, or P when tiled).
struct Params {
  std::vector<float> scale, inv, zp;
  float qmin = 0.0f, qmax = 0.0f, gf = 1.0f;
};

Params make_params(const char* op, const Layout& L, const at::Tensor& scale,
                   const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                   double grad_factor, bool per_channel, int64_t channels) {
  TORCH_CHECK(scale.device().is_cpu() && zero_point.device().is_cpu(), op,
              ": 'scale' and 'zero_point' must be CPU tensors for the CPU kernel");
  TORCH_CHECK(quant_min <= quant_max, op, ": quant_min=", quant_min, " > quant_max=", quant_max);
  const int64_t want = per_channel ? channels : 1;
  TORCH_CHECK(scale.numel() == want && zero_point.numel() == want, op, ": 'scale' and ",
              "'zero_point' must have ", want, " element(s) (",
              per_channel ? "x.shape[axis]" : "per tensor: shape [1] or []", "), got ",
              scale.sizes(), " and ", zero_point.sizes());
  Params p;
  p.qmin = static_cast<float>(quant_min);
  p.qmax = static_cast<float>(quant_max);
  p.gf = static_cast<float>(grad_factor);
  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  const at::Tensor z32 = zero_point.to(at::kFloat).contiguous();
  const float* sp = s32.data_ptr<float>();
  const float* zq = z32.data_ptr<float>();
  // Per channel values: inv = 1/scale in fp32, zp = clamp(round_half_even(zero_point)).
  std::vector<float> cs(want), ci(want), cz(want);
  for (int64_t c = 0; c < want; ++c) {
    cs[c] = sp[c];
    ci[c] = 1.0f / sp[c];
    cz[c] = saq::clampf(saq::round_half_even(zq[c]), p.qmin, p.qmax);
  }
  if (!L.periodic) {
    p.scale = std::move(cs);
    p.inv = std::move(ci);
    p.zp = std::move(cz);
    return p;
  }
  const int64_t len = L.col_tiles == 1 ? L.rows_per_call * L.P : L.P;
  p.scale.resize(len);
  p.inv.resize(len);
  p.zp.resize(len);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = (j % L.P) / L.inner;
    p.scale[j] = cs[c];
    p.inv[j] = ci[c];
    p.zp[j] = cz[c];
  }
  return p;
}

// Calls fn(offset, length, param_offset) for the contiguous runs of work item k, in a fixed
// order. Runs of the periodic layout are <= kTile long; runs of the rows layout <= kBlock.
template <class F>
SAQ_INLINE void for_each_run(const Layout& L, int64_t k, const F& fn) {
  if (!L.periodic) {
    const int64_t r = k / L.row_slices, b = k % L.row_slices;
    const int64_t start = r * L.inner + b * kBlock;
    fn(start, std::min(kBlock, L.inner - b * kBlock), r % L.C);
    return;
  }
  const int64_t rb = k / L.col_tiles, t = k % L.col_tiles;
  const int64_t r0 = rb * L.rows_per_item, r1 = std::min(L.outer, r0 + L.rows_per_item);
  if (L.col_tiles == 1) {
    for (int64_t r = r0; r < r1; r += L.rows_per_call) {
      fn(r * L.P, std::min(L.rows_per_call, r1 - r) * L.P, int64_t{0});
    }
  } else {
    const int64_t c0 = t * L.T, w = std::min(L.T, L.P - c0);
    for (int64_t r = r0; r < r1; ++r) fn(r * L.P + c0, w, c0);
  }
}

// The loops' input mode: the perturbation's, or kReluInput (exclusive with a perturbation).
int input_mode(const char* op, const Perturbation& pert, bool relu) {
  if (!relu) return pert.mode;
  TORCH_CHECK(pert.mode == kNoPerturb, op, ": relu=True cannot be combined with a perturbation ",
              "(it folds the ReLU in front of an activation quantizer)");
  return kReluInput;
}

int64_t grain_items(const Layout& L) { return std::max<int64_t>(1, kGrain / L.item_elems); }

void check_axis(const char* op, const at::Tensor& x, std::optional<int64_t> axis) {
  if (!axis.has_value()) return;
  const int64_t dim = x.dim();
  TORCH_CHECK(*axis >= -dim && *axis < dim, op, ": axis=", *axis, " is out of range for x with ",
              dim, " dims");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         std::optional<int64_t> axis, double grad_factor,
                         const std::optional<at::Tensor>& perturbation,
                         const std::optional<at::Tensor>& perturb_scale, bool perturb_before,
                         bool relu) {
  const char* op = "saq_C::fake_quantize";
  check_compute_input(op, "x", x);
  check_axis(op, x, axis);
  const Layout L = make_layout(x, axis);
  const int64_t channels = axis.has_value() ? x.size(*axis < 0 ? *axis + x.dim() : *axis) : 1;
  const Params p = make_params(op, L, scale, zero_point, quant_min, quant_max, grad_factor,
                               axis.has_value(), channels);
  const Perturbation pert = make_perturbation(op, x, perturbation, perturb_scale, perturb_before);
  const int mode = input_mode(op, pert, relu);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (L.numel == 0) return y;
  const In xin = in_of(xc);
  const Out yout = out_of(y);

  at::parallel_for(0, L.items, grain_items(L), [&](int64_t k0, int64_t k1) {
    alignas(64) float bx[kTile], be[kTile], by[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      for_each_run(L, k, [&](int64_t start, int64_t len, int64_t pi) {
        for (int64_t off = 0; off < len; off += kTile) {
          const int64_t n = std::min(kTile, len - off), o = start + off;
          const float* xf = load(xin, o, n, bx);
          const float* ef = load(pert.in, o, n, be);
          float* yf = out_ptr(yout, o, by);
          if (!L.periodic) {
            fwd_uniform(xf, ef, pert.s, mode, yf, n, p.scale[pi], p.inv[pi], p.zp[pi],
                        p.qmin, p.qmax);
          } else {
            const int64_t q = pi + off;
            fwd_periodic(xf, ef, pert.s, mode, yf, n, p.scale.data() + q, p.inv.data() + q,
                         p.zp.data() + q, p.qmin, p.qmax);
          }
          commit(yout, o, n, by);
        }
      });
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor,
    const std::optional<at::Tensor>& perturbation, const std::optional<at::Tensor>& perturb_scale,
    bool perturb_before, bool relu) {
  const char* op = "saq_C::fake_quantize_backward";
  check_compute_input(op, "x", x);
  check_float_cpu(op, "grad", grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": 'grad' has shape ", grad.sizes(), " but x has ",
              x.sizes());
  check_axis(op, x, axis);
  const Layout L = make_layout(x, axis);
  const int64_t channels = axis.has_value() ? x.size(*axis < 0 ? *axis + x.dim() : *axis) : 1;
  const Params p = make_params(op, L, scale, zero_point, quant_min, quant_max, grad_factor,
                               axis.has_value(), channels);
  const Perturbation pert = make_perturbation(op, x, perturbation, perturb_scale, perturb_before);
  // The backward of Q(x) + s*e does not depend on e.
  int mode = input_mode(op, pert, relu);
  if (mode == kPerturbAfter) mode = kNoPerturb;
  const In ein = mode == kPerturbBefore ? pert.in : In{};
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto f32 = scale.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dscale = at::empty(scale.sizes(), f32);
  at::Tensor dzp = at::empty(zero_point.sizes(), f32);
  float* ds_out = dscale.data_ptr<float>();
  float* dz_out = dzp.data_ptr<float>();
  const int64_t nparams = scale.numel();
  if (L.numel == 0) {
    std::fill(ds_out, ds_out + nparams, 0.0f);
    std::fill(dz_out, dz_out + nparams, 0.0f);
    return {dx, dscale, dzp};
  }
  const In xin = in_of(xc), gin = in_of(gc);
  const Out dxout = out_of(dx);

  // Partial sums: one (ds, dz) pair per item (rows), or per column per row block (periodic).
  const int64_t row_blocks = L.periodic ? L.items / L.col_tiles : 0;
  std::vector<double> part_ds(L.periodic ? row_blocks * L.P : L.items);
  std::vector<double> part_dz(part_ds.size());

  at::parallel_for(0, L.items, grain_items(L), [&](int64_t k0, int64_t k1) {
    alignas(64) float bx[kTile], be[kTile], bg[kTile], bdx[kTile], tds[kTile], tdz[kTile];
    alignas(64) double acc_ds[kTile], acc_dz[kTile];
    for (int64_t k = k0; k < k1; ++k) {
      double lanes_ds[kLanes] = {0.0}, lanes_dz[kLanes] = {0.0};
      if (L.periodic) {
        std::fill(acc_ds, acc_ds + kTile, 0.0);
        std::fill(acc_dz, acc_dz + kTile, 0.0);
      }
      for_each_run(L, k, [&](int64_t start, int64_t len, int64_t pi) {
        for (int64_t off = 0; off < len; off += kTile) {
          const int64_t n = std::min(kTile, len - off), o = start + off;
          const float* xf = load(xin, o, n, bx);
          const float* ef = load(ein, o, n, be);
          const float* gf = load(gin, o, n, bg);
          float* dxf = out_ptr(dxout, o, bdx);
          if (!L.periodic) {
            bwd_uniform(xf, ef, pert.s, mode, gf, dxf, n, p.scale[pi], p.inv[pi], p.zp[pi],
                        p.qmin, p.qmax, p.gf, lanes_ds, lanes_dz);
          } else {
            const int64_t q = pi + off;
            bwd_periodic(xf, ef, pert.s, mode, gf, dxf, tds, tdz, n, p.scale.data() + q,
                         p.inv.data() + q, p.zp.data() + q, p.qmin, p.qmax, p.gf);
            col_add(tds, n, acc_ds);
            col_add(tdz, n, acc_dz);
          }
          commit(dxout, o, n, bdx);
        }
      });
      if (!L.periodic) {
        part_ds[k] = lane_total(lanes_ds);
        part_dz[k] = lane_total(lanes_dz);
      } else if (L.col_tiles == 1) {
        // Fold the rows_per_call copies of the period onto the P columns of this row block.
        double* pds = part_ds.data() + (k / L.col_tiles) * L.P;
        double* pdz = part_dz.data() + (k / L.col_tiles) * L.P;
        for (int64_t j = 0; j < L.P; ++j) {
          double a = 0.0, b = 0.0;
          for (int64_t r = 0; r < L.rows_per_call; ++r) {
            a += acc_ds[r * L.P + j];
            b += acc_dz[r * L.P + j];
          }
          pds[j] = a;
          pdz[j] = b;
        }
      } else {
        const int64_t c0 = (k % L.col_tiles) * L.T, w = std::min(L.T, L.P - c0);
        double* pds = part_ds.data() + (k / L.col_tiles) * L.P + c0;
        double* pdz = part_dz.data() + (k / L.col_tiles) * L.P + c0;
        std::copy(acc_ds, acc_ds + w, pds);
        std::copy(acc_dz, acc_dz + w, pdz);
      }
    }
  });

  // Combine the partials in a fixed order: per channel, rows (or row blocks) in order.
  if (!L.periodic) {
    for (int64_t c = 0; c < L.C; ++c) {
      double a = 0.0, b = 0.0;
      for (int64_t o = 0; o < L.outer; ++o) {
        const int64_t base = (o * L.C + c) * L.row_slices;
        for (int64_t s = 0; s < L.row_slices; ++s) {
          a += part_ds[base + s];
          b += part_dz[base + s];
        }
      }
      ds_out[c] = static_cast<float>(a);
      dz_out[c] = static_cast<float>(b);
    }
  } else {
    for (int64_t c = 0; c < L.C; ++c) {
      double a = 0.0, b = 0.0;
      for (int64_t i = 0; i < L.inner; ++i) {
        const int64_t col = c * L.inner + i;
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
          a += part_ds[rb * L.P + col];
          b += part_dz[rb * L.P + col];
        }
      }
      ds_out[c] = static_cast<float>(a);
      dz_out[c] = static_cast<float>(b);
    }
  }
  return {dx, dscale, dzp};
}

}  // namespace saq_cpu
