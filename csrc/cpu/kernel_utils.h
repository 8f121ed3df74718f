// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): ISA clones, fixed work decomposition,
// dtype tiles and argument checks.
//
// Numerics: every quantizer computes in fp32 through csrc/common/saq_math.h. The sources are
// compiled with -ffp-contract=off (no a*b+c -> fma where the reference rounds twice) and without
// -ffast-math, so each ISA clone and the reference give the same bits.
//
// Determinism: work is cut into items of a fixed size (kBlock elements, independent of the number
// of threads); each item reduces its elements into kLanes double accumulators in a fixed order and
// the item partials are summed in item order. Sums are therefore identical run to run, whatever
// at::get_num_threads() is and whichever ISA clone runs.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/OpMathType.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../common/saq_math.h"

// One copy of each hot loop per x86-64 level (AVX-512, AVX2, baseline), picked at load time by
// the dynamic linker (gcc target_clones / ifunc). The extension itself is built for the baseline
// so it loads on any x86-64 CPU (the baseline clone stays scalar: rintf needs SSE4.1 to
// vectorize). The saq_math.h helpers are always_inline so each clone gets its own copy.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SAQ_NO_TARGET_CLONES)
#define SAQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAQ_CLONES
#endif

#if defined(__GNUC__)
#define SAQ_INLINE inline __attribute__((always_inline))
// For the per-element lambdas of lane_sum: a lambda left out of line is a default-target call
// inside each ISA clone (and a scalar SSE call per element).
#define SAQ_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SAQ_INLINE inline
#define SAQ_LAMBDA_INLINE
#endif

namespace saq_cpu {

constexpr int64_t kTile = 1024;    // floats per conversion / scratch tile (4 KiB, stays in L1)
constexpr int64_t kBlock = 16384;  // elements per work item (fixed: sums never depend on threads)
constexpr int64_t kGrain = 32768;  // fewest elements per parallel task
constexpr int kLanes = 16;         // double accumulators per reduction (two AVX-512 registers)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Perturbation handling of the quantizers (saq_kernels/OPS.md): none, Q(x + s*e), Q(x) + s*e.
enum PerturbMode : int { kNoPerturb = 0, kPerturbBefore = 1, kPerturbAfter = 2 };
// fake_quantize(relu=True) reads its input as relu(x) in place of a perturbation (the two are
// exclusive), so it is one more mode of the same loops.
constexpr int kReluInput = 3;

// ---------------------------------------------------------------------------------------------
// Inline bf16 conversions for loops that round after every op (the SGD / AdamW steps). c10's
// BFloat16 constructor stays an out-of-line call inside such loops (gcc: "statement clobbers
// memory"), which stops the vectorizer. bf16_bits is the same conversion written with a select
// instead of a branch, bit for bit (checked over all 2^32 fp32 inputs): round to nearest even,
// NaN -> 0x7fc0. fp16 goes through F16C in tiles where the CPU has it (below), else through
// c10's conversion (an integer version of it measured 1.5x slower than c10's in the SGD tiles).
// ---------------------------------------------------------------------------------------------
SAQ_INLINE uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

SAQ_INLINE float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

SAQ_INLINE uint16_t bf16_bits(float v) {
  const uint32_t u = bits_of(v);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // ties go to the even upper half
  return static_cast<uint16_t>(v != v ? 0x7fc0u : r);
}

// T -> its op-math type and back (fp32 for fp16 / bf16; the identity for fp32, fp64).
template <typename T>
SAQ_INLINE at::opmath_type<T> widen(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return float_of(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<at::opmath_type<T>>(v);
  }
}

template <typename T>
SAQ_INLINE T narrow(at::opmath_type<T> v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(bf16_bits(v), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// Round to T and back: what a torch op computing in op-math returns, as op-math.
template <typename T>
SAQ_INLINE at::opmath_type<T> round_to(at::opmath_type<T> v) {
  return widen<T>(narrow<T>(v));
}

// ---------------------------------------------------------------------------------------------
// dtype tiles: the kernels see fp32 arrays. fp32 tensors are used in place; fp16 / bf16 / fp64
// tiles are converted into a stack buffer (fp16 / bf16 -> fp32 is exact; fp64 -> fp32 and
// fp32 -> fp16 / bf16 round to nearest even, as tensor.to(dtype) does).
// ---------------------------------------------------------------------------------------------
template <typename T>
[[maybe_unused]] SAQ_CLONES static void to_float(const T* __restrict src, float* __restrict dst,
                                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
[[maybe_unused]] SAQ_CLONES static void from_float(const float* __restrict src,
                                                   T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// fp16 tiles through the F16C instructions where the CPU has them (8 values per instruction; the
// baseline build's c10 conversion is scalar: torch.compile's fp16 code beat ours by 1.6x with it).
// F16C rounds to nearest even like c10; NaN payloads are kept (quieted), as torch's vectorized
// kernels keep them, where c10's software fallback returns its canonical NaN.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SAQ_NO_F16C)
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const c10::Half* src, float* dst,
                                                                     int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* src, c10::Half* dst,
                                                                     int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// Round each value to fp16 and back, in place.
__attribute__((target("avx,f16c"))) inline void round_half_f16c(float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(a + i);
    _mm256_storeu_ps(a + i, _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)));
  }
  for (; i < n; ++i) a[i] = _cvtsh_ss(_cvtss_sh(a[i], _MM_FROUND_TO_NEAREST_INT));
}

// SAQ_CPU_NO_F16C=1 (read once) takes the c10 path, so tests can check both paths on one machine.
inline bool cpu_has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c") &&
                          std::getenv("SAQ_CPU_NO_F16C") == nullptr;
  return yes;
}
#else
inline bool cpu_has_f16c() { return false; }
inline void half_to_float_f16c(const c10::Half*, float*, int64_t) {}
inline void float_to_half_f16c(const float*, c10::Half*, int64_t) {}
inline void round_half_f16c(float*, int64_t) {}
#endif

// fp16 <-> fp32 arrays: F16C where available, else c10's conversion.
inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  if (cpu_has_f16c()) return half_to_float_f16c(src, dst, n);
  to_float(src, dst, n);
}

inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  if (cpu_has_f16c()) return float_to_half_f16c(src, dst, n);
  from_float(src, dst, n);
}

// Op-math tiles of fp16 / bf16 values for the update steps, which round after every term:
// widen_tile / narrow_tile convert n values; set_rounded(a, n, f) sets a[i] = f(i) rounded to T
// and back (bf16: one fused loop; fp16 with F16C: the loop, then one rounding pass).
template <typename T>
SAQ_INLINE void widen_tile(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    half_to_float(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = widen<T>(src[i]);
  }
}

template <typename T>
SAQ_INLINE void narrow_tile(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    float_to_half(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = narrow<T>(src[i]);
  }
}

template <typename T, typename F>
SAQ_INLINE void set_rounded(float* a, int64_t n, F f) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (cpu_has_f16c()) {
      for (int64_t i = 0; i < n; ++i) a[i] = f(i);
      return round_half_f16c(a, n);
    }
  }
  for (int64_t i = 0; i < n; ++i) a[i] = round_to<T>(f(i));
}

// A read-only element stream of a contiguous tensor (p == nullptr: absent).
struct In {
  const void* p = nullptr;
  at::ScalarType dt = at::kFloat;
};

// A write-only element stream of a contiguous tensor.
struct Out {
  void* p = nullptr;
  at::ScalarType dt = at::kFloat;
};

inline In in_of(const at::Tensor& t) { return In{t.data_ptr(), t.scalar_type()}; }
inline Out out_of(const at::Tensor& t) { return Out{t.data_ptr(), t.scalar_type()}; }

// n fp32 values of s from element off: a pointer into the tensor for fp32, else converted into
// buf (kTile floats). nullptr for an absent stream.
inline const float* load(const In& s, int64_t off, int64_t n, float* buf) {
  switch (s.dt) {
    case at::kFloat:
      return s.p ? static_cast<const float*>(s.p) + off : nullptr;
    case at::kHalf:
      if (!s.p) return nullptr;
      half_to_float(static_cast<const c10::Half*>(s.p) + off, buf, n);
      return buf;
    case at::kBFloat16:
      if (!s.p) return nullptr;
      to_float(static_cast<const c10::BFloat16*>(s.p) + off, buf, n);
      return buf;
    case at::kDouble:
      if (!s.p) return nullptr;
      to_float(static_cast<const double*>(s.p) + off, buf, n);
      return buf;
    default:
      TORCH_CHECK(false, "saq_C: unsupported dtype ", s.dt);
  }
}

// Where a kernel writes n values of o from element off: the tensor itself for fp32, else buf.
inline float* out_ptr(const Out& o, int64_t off, float* buf) {
  return o.dt == at::kFloat ? static_cast<float*>(o.p) + off : buf;
}

// Completes a write started with out_ptr: converts buf into the tensor unless it is fp32.
inline void commit(const Out& o, int64_t off, int64_t n, const float* buf) {
  switch (o.dt) {
    case at::kFloat:
      return;
    case at::kHalf:
      return float_to_half(buf, static_cast<c10::Half*>(o.p) + off, n);
    case at::kBFloat16:
      return from_float(buf, static_cast<c10::BFloat16*>(o.p) + off, n);
    case at::kDouble:
      return from_float(buf, static_cast<double*>(o.p) + off, n);
    default:
      TORCH_CHECK(false, "saq_C: unsupported dtype ", o.dt);
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic sums: lanes[l] += term(i) for the elements i = l (mod kLanes) of a run, in
// element order. Callers feed runs whose lengths are multiples of kLanes except the last one of
// a work item, so a sum depends only on the fixed item boundaries. The accumulators are copied
// into locals so they stay in registers (gcc otherwise stores them back every iteration:
// 0.23 -> 0.15 ms for the sum of 2^20 fp32, one thread, AVX-512 clone).
// ---------------------------------------------------------------------------------------------
template <class F>
SAQ_INLINE void lane_sum(int64_t n, double* __restrict lanes, const F& term) {
  double acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = lanes[l];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  for (int l = 0; l < kLanes; ++l) lanes[l] = acc[l];
}

// Two sums at once: term(i, a, b) adds element i's terms to a and b.
template <class F>
SAQ_INLINE void lane_sum2(int64_t n, double* __restrict lanes_a, double* __restrict lanes_b,
                          const F& term) {
  double acc_a[kLanes], acc_b[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    acc_a[l] = lanes_a[l];
    acc_b[l] = lanes_b[l];
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) term(i + l, acc_a[l], acc_b[l]);
  }
  for (int l = 0; i < n; ++i, ++l) term(i, acc_a[l], acc_b[l]);
  for (int l = 0; l < kLanes; ++l) {
    lanes_a[l] = acc_a[l];
    lanes_b[l] = acc_b[l];
  }
}

inline double lane_total(const double* lanes) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Argument checks: the error names the op, the argument and the fix.
// ---------------------------------------------------------------------------------------------
// A floating CPU tensor the kernel reads (float64 is converted to fp32 on load, as the reference
// converts secondary inputs to the compute dtype of x).
inline void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": '", name, "' is on ", t.device(),
              "; the CPU kernel needs CPU tensors (move it with .cpu())");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, ": '", name, "' has dtype ", dt,
              "; pass a floating tensor (float32, float16 or bfloat16)");
}

// The tensor that sets the compute dtype (x, grads[0]): fp32 math serves fp32 / fp16 / bf16 only;
// the reference computes float64 inputs in float64 (saq_kernels/OPS.md, "Pinned numerics").
inline void check_compute_input(const char* op, const char* name, const at::Tensor& t) {
  check_float_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": '", name,
              "' is float64, which the reference backend computes in float64; the C++ kernels "
              "compute in fp32 and take float32, float16 or bfloat16 (use the reference backend, "
              "or convert with .float())");
}

// The value of a one-element tensor as fp32, as tensor.float() rounds it.
inline float scalar_f32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, op, ": '", name, "' must hold one value (shape [] or [1]), got ",
              t.sizes());
  return static_cast<float>(t.item().toDouble());
}

// Non-zero test of an optional 0-dim flag (found_inf); NaN counts as set.
inline bool flag_set(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->numel() == 1, "saq_C: 'found_inf' must be a 0-dim tensor, got shape ",
              t->sizes());
  const auto v = t->item();
  if (v.isBoolean()) return v.toBool();
  const double d = v.toDouble();
  return d != 0.0;
}

// Perturbation e (x's shape, contiguous copy kept alive here) and its 0-dim scale s.
struct Perturbation {
  at::Tensor e;
  In in;
  float s = 0.0f;
  int mode = kNoPerturb;
};

inline Perturbation make_perturbation(const char* op, const at::Tensor& x,
                                      const std::optional<at::Tensor>& e,
                                      const std::optional<at::Tensor>& s, bool before) {
  Perturbation p;
  const bool has_e = e.has_value() && e->defined();
  const bool has_s = s.has_value() && s->defined();
  TORCH_CHECK(has_e == has_s, op, ": pass both 'perturbation' and 'perturb_scale', or neither");
  if (!has_e) return p;
  check_float_cpu(op, "perturbation", *e);
  TORCH_CHECK(e->sizes() == x.sizes(), op, ": 'perturbation' has shape ", e->sizes(),
              " but x has ", x.sizes());
  TORCH_CHECK(s->device().is_cpu(), op, ": 'perturb_scale' is on ", s->device(),
              "; the CPU kernel needs it on the CPU");
  p.e = e->contiguous();
  p.in = in_of(p.e);
  p.s = scalar_f32(op, "perturb_scale", *s);
  p.mode = before ? kPerturbBefore : kPerturbAfter;
  return p;
}

}  // namespace saq_cpu
