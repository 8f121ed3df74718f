// SAM multi-tensor ops on CPU: grad_sq_norm, sam_perturb_, sam_restore_ and the restores fused
// with an SGD or AdamW step (whose backups may be a prefix: params[:len(backups)] are restored,
// all are stepped).
//
// Every op makes one parallel pass over all tensors: each tensor is cut into chunks of at most
// kBlock elements and at::parallel_for runs over the chunk list (fixed chunking, so the norm is
// the same for any thread count). Tensors that are not contiguous are processed through a
// contiguous copy that is written back afterwards.
//
// Rounding: sam_perturb_ repeats the reference's per-op rounding in the parameter's dtype
// (c10::Half / c10::BFloat16 arithmetic rounds after every operation, like torch's CPU ops), so
// it is bit-exact; sam_restore_ is a memcpy. The fused optimizer steps compute in the op-math
// type (fp32 for fp16 / bf16 / fp32, fp64 for fp64) and round to the tensor dtype at the points
// where the reference's torch ops do; they follow the reference's operation order but not
// torch's use of fma inside some of its kernels, so they agree to fp32 rounding, not bitwise.
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernel_utils.h"
#include "ops.h"

namespace saq_cpu {
namespace {

// A contiguous working view of a tensor: the tensor itself, or a copy written back by finish().
struct Slot {
  at::Tensor orig, work;
  Slot() = default;
  explicit Slot(const at::Tensor& t) : orig(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() const {
    if (orig.defined() && !work.is_same(orig)) orig.copy_(work);
  }
  void* data() const { return work.data_ptr(); }
};

struct Chunk {
  int64_t t;      // tensor index
  int64_t start;  // first element
  int64_t len;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> out;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t s = 0; s < numels[t]; s += kBlock) {
      out.push_back(Chunk{static_cast<int64_t>(t), s, std::min(kBlock, numels[t] - s)});
    }
  }
  return out;
}

int64_t chunk_grain(const std::vector<Chunk>& chunks) {
  int64_t total = 0;
  for (const auto& c : chunks) total += c.len;
  const int64_t avg = chunks.empty() ? 1 : std::max<int64_t>(1, total / chunks.size());
  return std::max<int64_t>(1, kGrain / avg);
}

template <class F>
void for_chunks(const std::vector<Chunk>& chunks, const F& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks),
                   [&](int64_t k0, int64_t k1) {
                     for (int64_t k = k0; k < k1; ++k) fn(k, chunks[k]);
                   });
}

// list[i] pairs with params[i]; with prefix, list may be shorter (it pairs with the first ones).
void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params,
                bool prefix = false) {
  if (prefix) {
    TORCH_CHECK(list.size() <= params.size(), op, ": ", list.size(), " ", name, " for ",
                params.size(), " params; pass at most one per parameter (the perturbed ones, "
                "placed first)");
  } else {
    TORCH_CHECK(list.size() == params.size(), op, ": '", name, "' has ", list.size(),
                " tensors but 'params' has ", params.size(), "; pass one per parameter");
  }
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device().is_cpu(), op, ": '", name, "[", i, "]' is on ", list[i].device(),
                "; the CPU kernel needs CPU tensors");
    TORCH_CHECK(list[i].sizes() == params[i].sizes(), op, ": '", name, "[", i, "]' has shape ",
                list[i].sizes(), ", 'params[", i, "]' has ", params[i].sizes());
    TORCH_CHECK(list[i].scalar_type() == params[i].scalar_type(), op, ": '", name,
                "[", i, "]' has dtype ", list[i].scalar_type(), " but 'params[", i, "]' has ",
                params[i].scalar_type(), "; keep the optimizer state in the parameter's dtype");
  }
}

void check_params(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    check_float_cpu(op, "params", params[i]);
  }
}

std::vector<int64_t> numels_of(at::TensorList ts) {
  std::vector<int64_t> n;
  for (const auto& t : ts) n.push_back(t.numel());
  return n;
}

#define SAQ_DISPATCH_FLOAT(dtype, op, ...)                                          \
  switch (dtype) {                                                                  \
    case at::kFloat: {                                                              \
      using scalar_t = float;                                                       \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    case at::kHalf: {                                                               \
      using scalar_t = c10::Half;                                                   \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    case at::kBFloat16: {                                                           \
      using scalar_t = c10::BFloat16;                                               \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    case at::kDouble: {                                                             \
      using scalar_t = double;                                                      \
      __VA_ARGS__();                                                                \
      break;                                                                        \
    }                                                                               \
    default:                                                                        \
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype,                         \
                  "; SAM ops take float32, float16, bfloat16 or float64 tensors");  \
  }

// A 0-dim tensor converted to dtype, as tensor.to(dtype) rounds it, widened to double.
double value_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.reshape({}).to(dtype).item().toDouble();
}

// Value cache per dtype (a step has at most four parameter dtypes).
struct PerDtype {
  at::Tensor src;
  double vals[4];
  bool have[4] = {false, false, false, false};
  static int slot(at::ScalarType d) {
    return d == at::kFloat ? 0 : d == at::kHalf ? 1 : d == at::kBFloat16 ? 2 : 3;
  }
  double get(at::ScalarType d) {
    const int s = slot(d);
    if (!have[s]) {
      vals[s] = value_as(src, d);
      have[s] = true;
    }
    return vals[s];
  }
};

// ---------------------------------------------------------------------------------------------
// grad_sq_norm kernels: lanes += fp32(t * t), t = g or g * (|p| + eta) in fp32
// ---------------------------------------------------------------------------------------------
SAQ_CLONES void sq_plain(const float* __restrict g, int64_t n, double* lanes) {
  lane_sum(n, lanes, [&](int64_t i) SAQ_LAMBDA_INLINE { return static_cast<double>(g[i] * g[i]); });
}

SAQ_CLONES void sq_adaptive(const float* __restrict g, const float* __restrict p, float eta,
                            int64_t n, double* lanes) {
  lane_sum(n, lanes, [&](int64_t i) SAQ_LAMBDA_INLINE {
    const float t = g[i] * (std::fabs(p[i]) + eta);
    return static_cast<double>(t * t);
  });
}

// ---------------------------------------------------------------------------------------------
// sam_perturb_: b = p; p += (p * p) * g * s or g * s, every op rounded to T as torch does
// ---------------------------------------------------------------------------------------------
// fp16: the same terms over op-math tiles, converted with F16C where present (T's operators go
// through c10's scalar conversion: 2.9x a copy on the ResNet-18 list, torch's ops 1.8x).
template <typename T>
SAQ_INLINE void perturb_tiles(T* p, const T* g, T* b, float sv, bool adaptive, int64_t n) {
  float pv[kTile], gv[kTile], e[kTile];
  for (int64_t s = 0; s < n; s += kTile) {
    const int64_t m = std::min(kTile, n - s);
    std::memcpy(b + s, p + s, m * sizeof(T));
    widen_tile<T>(p + s, pv, m);
    widen_tile<T>(g + s, gv, m);
    if (adaptive) {  // e = ((p * p) * g) * s
      set_rounded<T>(e, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return pv[i] * pv[i]; });
      set_rounded<T>(e, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return e[i] * gv[i]; });
      set_rounded<T>(e, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return e[i] * sv; });
    } else {  // e = g * s
      set_rounded<T>(e, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return gv[i] * sv; });
    }
    for (int64_t i = 0; i < m; ++i) e[i] = pv[i] + e[i];
    narrow_tile<T>(e, p + s, m);
  }
}

template <typename T>
SAQ_CLONES void perturb_kernel(T* __restrict p, const T* __restrict g, T* __restrict b, T s,
                               bool adaptive, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    perturb_tiles<T>(p, g, b, static_cast<float>(s), adaptive, n);
  } else if (adaptive) {
    for (int64_t i = 0; i < n; ++i) {
      const T pv = p[i];
      b[i] = pv;
      const T pp = pv * pv;
      const T ppg = pp * g[i];
      const T e = ppg * s;
      p[i] = pv + e;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T pv = p[i];
      b[i] = pv;
      const T e = g[i] * s;
      p[i] = pv + e;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fused SGD: restore, then torch.optim.SGD's single-tensor update
// ---------------------------------------------------------------------------------------------
struct SgdConst {
  double lr, momentum, damp1, wd;  // op-math values (exact in the op-math type)
  bool nesterov, first_step;
};

template <typename T>
SAQ_INLINE at::opmath_type<T> rt(at::opmath_type<T> v) {  // round to T, as a torch op's output
  return round_to<T>(v);
}

// fp32 / fp64: one fused loop per (momentum, restore) pair; gcc if-converts the flag tests.
template <typename T, bool MOM, bool RESTORE>
SAQ_INLINE void sgd_loop(T* __restrict p, const T* __restrict b, const T* __restrict g,
                         T* __restrict buf, int64_t n, const SgdConst& k) {
  const T lr = static_cast<T>(k.lr), mom = static_cast<T>(k.momentum);
  const T damp1 = static_cast<T>(k.damp1), wd = static_cast<T>(k.wd);
  const bool has_wd = k.wd != 0.0, nesterov = k.nesterov, first = k.first_step;
  for (int64_t i = 0; i < n; ++i) {
    const T pv = RESTORE ? b[i] : p[i];
    T d = g[i];
    if (has_wd) d = d + wd * pv;
    if (MOM) {
      const T bv = first ? d : buf[i] * mom + damp1 * d;
      buf[i] = bv;
      d = nesterov ? d + mom * bv : bv;
    }
    p[i] = pv - lr * d;
  }
}

// fp16 / bf16: every term is rounded to T, as the torch op computing it rounds it. As one loop
// (flag tests around the roundings, buf loaded under a condition) gcc left this scalar, 13x
// slower than fp32; it runs tile by tile instead (kTile op-math values on the stack), one simple
// loop per term, the flags tested outside the loops, fp16 converted with F16C where present.
template <typename T>
SAQ_INLINE void sgd_tiles(T* p, const T* b, const T* g, T* buf, int64_t n, const SgdConst& k) {
  static_assert(std::is_same_v<at::opmath_type<T>, float>, "fp16 / bf16 only");
  const float lr = static_cast<float>(k.lr), mom = static_cast<float>(k.momentum);
  const float damp1 = static_cast<float>(k.damp1), wd = static_cast<float>(k.wd);
  float pv[kTile], d[kTile], bv[kTile];
  for (int64_t s = 0; s < n; s += kTile) {
    const int64_t m = std::min(kTile, n - s);
    widen_tile<T>((b ? b : p) + s, pv, m);
    widen_tile<T>(g + s, d, m);
    if (k.wd != 0.0) {  // d = g + wd * p
      set_rounded<T>(d, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return d[i] + wd * pv[i]; });
    }
    if (buf) {
      T* bb = buf + s;
      if (k.first_step) {  // buf = d
        std::copy(d, d + m, bv);
      } else {  // buf = buf * momentum + (1 - dampening) * d
        widen_tile<T>(bb, bv, m);
        set_rounded<T>(bv, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return bv[i] * mom; });
        set_rounded<T>(bv, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return bv[i] + damp1 * d[i]; });
      }
      narrow_tile<T>(bv, bb, m);
      if (k.nesterov) {  // d = d + momentum * buf
        set_rounded<T>(d, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return d[i] + mom * bv[i]; });
      } else {  // d = buf
        std::copy(bv, bv + m, d);
      }
    }
    // p = p - lr * d
    set_rounded<T>(d, m, [&](int64_t i) SAQ_LAMBDA_INLINE { return lr * d[i]; });
    for (int64_t i = 0; i < m; ++i) d[i] = pv[i] - d[i];
    narrow_tile<T>(d, p + s, m);
  }
}

// b == nullptr: a parameter without backup (not perturbed), stepped from its current value.
// buf == nullptr: no momentum.
template <typename T>
SAQ_CLONES void sgd_kernel(T* p, const T* b, const T* g, T* buf, int64_t n, const SgdConst& k) {
  if constexpr (!std::is_same_v<T, at::opmath_type<T>>) {
    sgd_tiles<T>(p, b, g, buf, n, k);
  } else if (buf) {
    if (b) {
      sgd_loop<T, true, true>(p, b, g, buf, n, k);
    } else {
      sgd_loop<T, true, false>(p, b, g, buf, n, k);
    }
  } else if (b) {
    sgd_loop<T, false, true>(p, b, g, buf, n, k);
  } else {
    sgd_loop<T, false, false>(p, b, g, buf, n, k);
  }
}

// ---------------------------------------------------------------------------------------------
// fused AdamW: restore, then torch.optim.AdamW's single-tensor update (no amsgrad)
// ---------------------------------------------------------------------------------------------
struct AdamConst {
  double decay;      // 1 - lr * wd (rounded as the reference's 0-dim ops)
  double w;          // lerp weight 1 - beta1
  double beta2, omb2;
  double step_size;  // lr / (1 - beta1^step)
  double bc2s;       // sqrt(1 - beta2^step)
  double eps;
};

// One fused loop: its only choice (the lerp formula) is a select, so it vectorizes as it is
// (tiling it like the SGD step costs 1.7x in fp32 and gains nothing in bf16).
template <typename T, bool RESTORE>
SAQ_INLINE void adamw_loop(T* __restrict p, const T* __restrict b, const T* __restrict g,
                           T* __restrict m, T* __restrict v, int64_t n, const AdamConst& k) {
  using acc = at::opmath_type<T>;
  const acc decay = static_cast<acc>(k.decay), w = static_cast<acc>(k.w);
  const acc beta2 = static_cast<acc>(k.beta2), omb2 = static_cast<acc>(k.omb2);
  const acc step_size = static_cast<acc>(k.step_size), bc2s = static_cast<acc>(k.bc2s);
  const acc eps = static_cast<acc>(k.eps);
  const bool low = w < static_cast<acc>(0.5);
  for (int64_t i = 0; i < n; ++i) {
    const acc pv = rt<T>(widen<T>(RESTORE ? b[i] : p[i]) * decay);  // p * (1 - lr * wd)
    const acc gi = widen<T>(g[i]);
    const acc mi = widen<T>(m[i]);
    // m.lerp_(g, 1 - beta1), with torch.lerp's formula: exact at both ends of the weight range.
    const acc mn = rt<T>(low ? mi + w * (gi - mi) : gi - (gi - mi) * (static_cast<acc>(1) - w));
    // v.mul_(beta2).addcmul_(g, g, value=1-beta2): self + value * t1 * t2
    const acc vn = rt<T>(rt<T>(widen<T>(v[i]) * beta2) + omb2 * gi * gi);
    m[i] = narrow<T>(mn);
    v[i] = narrow<T>(vn);
    const acc denom = rt<T>(rt<T>(rt<T>(std::sqrt(vn)) / bc2s) + eps);
    p[i] = narrow<T>(pv - rt<T>(step_size * rt<T>(mn / denom)));
  }
}

// fp16: the same terms over op-math tiles, converted with F16C where present (per element,
// c10's scalar conversions made this 2.3x slower than torch's foreach AdamW).
template <typename T>
SAQ_INLINE void adamw_tiles(T* p, const T* b, const T* g, T* m, T* v, int64_t n, const AdamConst& k) {
  const float decay = static_cast<float>(k.decay), w = static_cast<float>(k.w);
  const float beta2 = static_cast<float>(k.beta2), omb2 = static_cast<float>(k.omb2);
  const float step_size = static_cast<float>(k.step_size), bc2s = static_cast<float>(k.bc2s);
  const float eps = static_cast<float>(k.eps), omw = 1.0f - w;
  const bool low = w < 0.5f;
  float pv[kTile], gi[kTile], mn[kTile], vn[kTile], t[kTile];
  for (int64_t s = 0; s < n; s += kTile) {
    const int64_t len = std::min(kTile, n - s);
    widen_tile<T>((b ? b : p) + s, pv, len);
    set_rounded<T>(pv, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return pv[i] * decay; });
    widen_tile<T>(g + s, gi, len);
    widen_tile<T>(m + s, mn, len);
    set_rounded<T>(mn, len, [&](int64_t i) SAQ_LAMBDA_INLINE {
      return low ? mn[i] + w * (gi[i] - mn[i]) : gi[i] - (gi[i] - mn[i]) * omw;
    });
    widen_tile<T>(v + s, vn, len);
    set_rounded<T>(vn, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return vn[i] * beta2; });
    set_rounded<T>(vn, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return vn[i] + omb2 * gi[i] * gi[i]; });
    narrow_tile<T>(mn, m + s, len);
    narrow_tile<T>(vn, v + s, len);
    set_rounded<T>(t, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return std::sqrt(vn[i]); });
    set_rounded<T>(t, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return t[i] / bc2s; });
    set_rounded<T>(t, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return t[i] + eps; });
    set_rounded<T>(t, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return mn[i] / t[i]; });
    set_rounded<T>(t, len, [&](int64_t i) SAQ_LAMBDA_INLINE { return step_size * t[i]; });
    for (int64_t i = 0; i < len; ++i) t[i] = pv[i] - t[i];
    narrow_tile<T>(t, p + s, len);
  }
}

// b == nullptr: a parameter without backup (not perturbed), stepped from its current value.
template <typename T>
SAQ_CLONES void adamw_kernel(T* p, const T* b, const T* g, T* m, T* v, int64_t n,
                             const AdamConst& k) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    adamw_tiles<T>(p, b, g, m, v, n, k);
  } else if (b) {
    adamw_loop<T, true>(p, b, g, m, v, n, k);
  } else {
    adamw_loop<T, false>(p, b, g, m, v, n, k);
  }
}

template <typename T>
AdamConst adam_const(double lr_t, float step, double beta1, double beta2, double eps, double wd) {
  using acc = at::opmath_type<T>;
  AdamConst k;
  // lr_t = lr.to(T); new_p = p * (1 - lr_t * wd): two 0-dim ops in T.
  k.decay = rt<T>(static_cast<acc>(1) - rt<T>(static_cast<acc>(lr_t) * static_cast<acc>(wd)));
  k.w = static_cast<acc>(1.0 - beta1);
  k.beta2 = static_cast<acc>(beta2);
  k.omb2 = static_cast<acc>(1.0 - beta2);
  // step is an fp32 tensor: the bias corrections are fp32 (beta ** step with beta as fp32).
  const float bc1 = 1.0f - std::pow(static_cast<float>(beta1), step);
  const float bc2 = 1.0f - std::pow(static_cast<float>(beta2), step);
  // (lr_t / bc1) promotes to fp32 (fp64 for fp64 parameters), then .to(T).
  k.step_size = rt<T>(static_cast<acc>(lr_t) / static_cast<acc>(bc1));
  k.bc2s = rt<T>(static_cast<acc>(std::sqrt(bc2)));
  k.eps = static_cast<acc>(eps);
  return k;
}

// The restore part of every fused op: p = backup, bytewise (nothing for a parameter past the
// backups' prefix).
void restore_chunk(const std::vector<Slot>& P, const std::vector<Slot>& B, const Chunk& c) {
  if (c.t >= static_cast<int64_t>(B.size())) return;
  const Slot& p = P[c.t];
  const Slot& b = B[c.t];
  const int64_t es = p.work.element_size();
  std::memcpy(static_cast<char*>(p.data()) + c.start * es,
              static_cast<const char*>(b.data()) + c.start * es, c.len * es);
}

std::vector<Slot> slots_of(at::TensorList ts) {
  std::vector<Slot> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.emplace_back(t);
  return out;
}

void finish_all(const std::vector<Slot>& slots) {
  for (const auto& s : slots) s.finish();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// grad_sq_norm
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> grad_sq_norm(at::TensorList grads, at::TensorList params,
                                                c10::List<bool> adaptive, double eta) {
  const char* op = "saq_C::grad_sq_norm";
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n, op, ": 'params' has ", params.size(),
              " tensors for ", n, " grads; pass one per gradient");
  TORCH_CHECK(static_cast<int64_t>(adaptive.size()) == n, op, ": 'adaptive' has ",
              adaptive.size(), " flags for ", n, " grads; pass one flag per tensor");
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  at::Tensor norm = at::empty({}, opts), found = at::empty({}, opts);
  std::vector<at::Tensor> g(n), p(n);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0) check_compute_input(op, "grads[0]", grads[0]);
    check_float_cpu(op, "grads", grads[i]);
    g[i] = grads[i].contiguous();
    if (adaptive.get(i)) {
      check_float_cpu(op, "params", params[i]);
      TORCH_CHECK(params[i].sizes() == grads[i].sizes(), op, ": 'params[", i, "]' has shape ",
                  params[i].sizes(), ", 'grads[", i, "]' has ", grads[i].sizes());
      p[i] = params[i].contiguous();
    }
  }
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) numels[i] = g[i].numel();
  const auto chunks = make_chunks(numels);
  std::vector<double> part(chunks.size());
  const float eta_f = static_cast<float>(eta);
  for_chunks(chunks, [&](int64_t k, const Chunk& c) {
    alignas(64) float bg[kTile], bp[kTile];
    double lanes[kLanes] = {0.0};
    const In gin = in_of(g[c.t]);
    const bool ad = adaptive.get(c.t);
    const In pin = ad ? in_of(p[c.t]) : In{};
    for (int64_t off = 0; off < c.len; off += kTile) {
      const int64_t m = std::min(kTile, c.len - off), o = c.start + off;
      const float* gf = load(gin, o, m, bg);
      if (ad) {
        sq_adaptive(gf, load(pin, o, m, bp), eta_f, m, lanes);
      } else {
        sq_plain(gf, m, lanes);
      }
    }
    part[k] = lane_total(lanes);
  });
  double total = 0.0;
  for (double v : part) total += v;
  const float nf = static_cast<float>(total);
  norm.data_ptr<float>()[0] = nf;
  found.data_ptr<float>()[0] = std::isfinite(nf) ? 0.0f : 1.0f;
  return {norm, found};
}

// ---------------------------------------------------------------------------------------------
// sam_perturb_
// ---------------------------------------------------------------------------------------------
void sam_perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups,
                  const at::Tensor& scale, c10::List<bool> adaptive) {
  const char* op = "saq_C::sam_perturb_";
  check_params(op, params);
  check_list(op, "grads", grads, params);
  check_list(op, "backups", backups, params);
  TORCH_CHECK(adaptive.size() == params.size(), op, ": 'adaptive' has ", adaptive.size(),
              " flags for ", params.size(), " params; pass one flag per parameter");
  TORCH_CHECK(scale.numel() == 1, op, ": 'scale' must be a 0-dim tensor, got shape ",
              scale.sizes());
  if (params.empty()) return;
  const auto P = slots_of(params), G = slots_of(grads), B = slots_of(backups);
  PerDtype sc{scale};  // scale.to(p.dtype), once per dtype
  std::vector<double> s(params.size());
  for (size_t i = 0; i < params.size(); ++i) s[i] = sc.get(params[i].scalar_type());
  for_chunks(make_chunks(numels_of(params)), [&](int64_t, const Chunk& c) {
    const bool ad = adaptive.get(c.t);
    SAQ_DISPATCH_FLOAT(params[c.t].scalar_type(), op, [&] {
      perturb_kernel<scalar_t>(static_cast<scalar_t*>(P[c.t].data()) + c.start,
                               static_cast<const scalar_t*>(G[c.t].data()) + c.start,
                               static_cast<scalar_t*>(B[c.t].data()) + c.start,
                               static_cast<scalar_t>(s[c.t]), ad, c.len);
    });
  });
  finish_all(P);
  finish_all(B);
}

// ---------------------------------------------------------------------------------------------
// sam_restore_
// ---------------------------------------------------------------------------------------------
void sam_restore_(at::TensorList params, at::TensorList backups) {
  const char* op = "saq_C::sam_restore_";
  check_params(op, params);
  check_list(op, "backups", backups, params);
  if (params.empty()) return;
  const auto P = slots_of(params), B = slots_of(backups);
  for_chunks(make_chunks(numels_of(params)),
             [&](int64_t, const Chunk& c) { restore_chunk(P, B, c); });
  finish_all(P);
}

// ---------------------------------------------------------------------------------------------
// sam_restore_sgd_
// ---------------------------------------------------------------------------------------------
void sam_restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                      at::TensorList momentum_buffers, const at::Tensor& lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool first_step,
                      const std::optional<at::Tensor>& found_inf) {
  const char* op = "saq_C::sam_restore_sgd_";
  check_params(op, params);
  check_list(op, "backups", backups, params, /*prefix=*/true);
  check_list(op, "grads", grads, params);
  const bool mom = momentum != 0.0;
  if (mom) check_list(op, "momentum_buffers", momentum_buffers, params);
  TORCH_CHECK(lr.numel() == 1, op, ": 'lr' must be a 0-dim tensor, got shape ", lr.sizes());
  if (params.empty()) return;
  const bool skip = flag_set(found_inf);
  const auto P = slots_of(params), B = slots_of(backups);
  const int64_t nb = static_cast<int64_t>(backups.size());
  const auto chunks = make_chunks(numels_of(params));
  if (skip) {  // non-finite gradients: restore only
    for_chunks(chunks, [&](int64_t, const Chunk& c) { restore_chunk(P, B, c); });
    finish_all(P);
    return;
  }
  const auto G = slots_of(grads);
  const auto M = mom ? slots_of(momentum_buffers) : std::vector<Slot>(params.size());
  PerDtype lrs{lr};
  std::vector<SgdConst> k(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto dt = params[i].scalar_type();
    const bool dbl = dt == at::kDouble;
    // Python floats become the op-math type's scalars in torch's kernels.
    auto cast = [dbl](double v) { return dbl ? v : static_cast<double>(static_cast<float>(v)); };
    k[i] = SgdConst{cast(lrs.get(dt)), cast(momentum), cast(1.0 - dampening),
                    cast(weight_decay), nesterov, first_step};
  }
  for_chunks(chunks, [&](int64_t, const Chunk& c) {
    SAQ_DISPATCH_FLOAT(params[c.t].scalar_type(), op, [&] {
      scalar_t* buf = mom ? static_cast<scalar_t*>(M[c.t].data()) + c.start : nullptr;
      const scalar_t* bk =
          c.t < nb ? static_cast<const scalar_t*>(B[c.t].data()) + c.start : nullptr;
      sgd_kernel<scalar_t>(static_cast<scalar_t*>(P[c.t].data()) + c.start, bk,
                           static_cast<const scalar_t*>(G[c.t].data()) + c.start, buf, c.len,
                           k[c.t]);
    });
  });
  finish_all(P);
  if (mom) finish_all(M);
}

// ---------------------------------------------------------------------------------------------
// sam_restore_adamw_
// ---------------------------------------------------------------------------------------------
void sam_restore_adamw_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                        const at::Tensor& lr, double beta1, double beta2, double eps,
                        double weight_decay, const std::optional<at::Tensor>& found_inf) {
  const char* op = "saq_C::sam_restore_adamw_";
  check_params(op, params);
  check_list(op, "backups", backups, params, /*prefix=*/true);
  check_list(op, "grads", grads, params);
  check_list(op, "exp_avgs", exp_avgs, params);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, params);
  TORCH_CHECK(steps.size() == params.size(), op, ": 'steps' has ", steps.size(),
              " tensors for ", params.size(), " params; pass one 0-dim step tensor per parameter");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].device().is_cpu(), op, ": 'steps[", i,
                "]' must be a 0-dim CPU tensor, got shape ", steps[i].sizes(), " on ",
                steps[i].device());
  }
  TORCH_CHECK(lr.numel() == 1, op, ": 'lr' must be a 0-dim tensor, got shape ", lr.sizes());
  if (params.empty()) return;
  const bool skip = flag_set(found_inf);
  const auto P = slots_of(params), B = slots_of(backups);
  const int64_t nb = static_cast<int64_t>(backups.size());
  const auto chunks = make_chunks(numels_of(params));
  if (skip) {  // non-finite gradients: restore only, steps unchanged
    for_chunks(chunks, [&](int64_t, const Chunk& c) { restore_chunk(P, B, c); });
    finish_all(P);
    return;
  }
  const auto G = slots_of(grads), M = slots_of(exp_avgs), V = slots_of(exp_avg_sqs);
  PerDtype lrs{lr};
  std::vector<AdamConst> k(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    // step = steps[i] + 1 in fp32 (steps are fp32 tensors, as torch keeps them).
    const float step = static_cast<float>(steps[i].item().toDouble()) + 1.0f;
    steps[i].fill_(step);
    const auto dt = params[i].scalar_type();
    const double lr_t = lrs.get(dt);
    SAQ_DISPATCH_FLOAT(dt, op, [&] {
      k[i] = adam_const<scalar_t>(lr_t, step, beta1, beta2, eps, weight_decay);
    });
  }
  for_chunks(chunks, [&](int64_t, const Chunk& c) {
    SAQ_DISPATCH_FLOAT(params[c.t].scalar_type(), op, [&] {
      const scalar_t* bk =
          c.t < nb ? static_cast<const scalar_t*>(B[c.t].data()) + c.start : nullptr;
      adamw_kernel<scalar_t>(static_cast<scalar_t*>(P[c.t].data()) + c.start, bk,
                             static_cast<const scalar_t*>(G[c.t].data()) + c.start,
                             static_cast<scalar_t*>(M[c.t].data()) + c.start,
                             static_cast<scalar_t*>(V[c.t].data()) + c.start, c.len, k[c.t]);
    });
  });
  finish_all(P);
  finish_all(M);
  finish_all(V);
}

}  // namespace saq_cpu
