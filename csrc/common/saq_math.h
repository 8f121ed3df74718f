// Shared scalar math of the saq quantizers, for the C++ CPU kernels and the CUDA kernels.
//
// One definition of rounding and operation order keeps the reference (saq_kernels/reference.py),
// the CPU, CUDA and Triton paths on identical quantized codes (saq_kernels/OPS.md, "Pinned numerics"):
//   * all math in fp32; rounding half to even (rintf / nearbyintf under the default rounding mode);
//   * fake_quantize multiplies by the reciprocal 1/scale (as ATen's fake-quant kernels);
//   * LIQ divides by the clip (as the SAQ reference code).
// This header has no torch dependency so .cu files compile with nvcc alone.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SAQ_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced on the host too: the CPU kernels (csrc/cpu) vectorize loops over these helpers. gcc 12
// left saq::liq_forward out of line in liq_quantize.cpp, so its AVX-512 loop made a scalar SSE
// call per element (2^20 fp32, one thread: 14 ms, 45x a copy).
#define SAQ_HD inline __attribute__((always_inline))
#else
#define SAQ_HD inline
#endif

namespace saq {

// Round half to even. rintf honours the current rounding mode, which is round-to-nearest-even
// unless a program changes it; CUDA's rintf is always round-to-nearest-even.
SAQ_HD float round_half_even(float v) { return rintf(v); }

// NaN propagates, as in torch.clamp (fminf/fmaxf alone would turn a NaN into a bound and hide a
// non-finite activation behind a finite quantized value).
#if defined(__CUDA_ARCH__)
SAQ_HD float clampf(float v, float lo, float hi) { return v != v ? v : fminf(fmaxf(v, lo), hi); }
#else
// Host: the same result written as compares, which gcc vectorizes (maxps/minps operand order
// keeps the NaN) without -ffast-math; fminf/fmaxf kept every CPU quantizer loop scalar
// (gcc 12 -O3, -fopt-info-vec: "couldn't vectorize loop").
SAQ_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
#endif

// a + s * e with the product rounded to fp32 before the sum, as the reference computes it (two
// torch ops). Device code uses the _rn intrinsics, which the compiler never contracts into an
// FMA (a fused a + s*e rounds once and can move x + s*e across a rounding tie, changing a
// code). Host compilers contract only where FMA instructions are enabled and
// -ffp-contract=fast; the CPU build must keep -ffp-contract=off (or no -mfma) for this.
SAQ_HD float add_scaled(float a, float s, float e) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, __fmul_rn(s, e));
#else
  return a + s * e;
#endif
}

// ---------------------------------------------------------------------------------------------
// Affine fake quantization (LSQ / LSQ+). zp is already round_half_even(zero_point) clamped to
// [qmin, qmax]; inv = 1.0f / scale computed once per tensor / channel.
// ---------------------------------------------------------------------------------------------
struct FqElem {
  float y;       // fake-quantized value (q - zp) * scale
  float dscale;  // per-element scale gradient, before grad and grad_factor
  bool inside;   // qmin <= unclamped code <= qmax
  bool below;    // unclamped code < qmin
};

SAQ_HD float fq_forward(float x, float scale, float inv, float zp, float qmin, float qmax) {
  float xq = round_half_even(x * inv) + zp;
  return (clampf(xq, qmin, qmax) - zp) * scale;
}

// The input of Q(relu(x)) for fake_quantize(relu=True): x < 0 becomes 0, as torch.relu does
// (NaN stays NaN; -0.0 may stay, which changes no result: Q(-0.0) = Q(0) bit for bit).
SAQ_HD float relu_input(float x) { return x < 0.0f ? 0.0f : x; }

// Backward terms for one element: dx = g * inside;
// dscale = g * ((clamp(xq) - zp) * scale - x) * inv inside, g * (qmin - zp) below,
// g * (qmax - zp) above (times grad_factor); dzp = -g * scale * grad_factor outside, 0 inside.
// relu: the gradients of Q(relu(x)): the terms at relu_input(x), and dx = 0 unless x > 0
// (relu'(x) = (x > 0), so x = 0 and NaN pass no gradient, as torch's threshold_backward).
SAQ_HD void fq_backward(float x_in, float g, float scale, float inv, float zp, float qmin,
                        float qmax, float grad_factor, float* dx, float* dscale, float* dzp,
                        bool relu = false) {
  const float x = relu ? relu_input(x_in) : x_in;
  float xq = round_half_even(x * inv) + zp;
  bool below = xq < qmin;
  bool above = xq > qmax;
  if (below || above) {
    *dx = 0.0f;
    *dscale = (below ? g * (qmin - zp) : g * (qmax - zp)) * grad_factor;
    *dzp = -g * scale * grad_factor;
  } else {
    float xfq = (xq - zp) * scale;
    *dx = (!relu || x_in > 0.0f) ? g : 0.0f;
    *dscale = g * (xfq - x) * inv * grad_factor;
    *dzp = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// LIQ (SAQ reference quantizer). c = |clip| > 0, n = 2^bits - 1 as float.
// The level k is mapped back with k * fp32(1/n), not k / n: that is what ATen computes for the
// reference code's `round(x * n) / n` on CUDA (a division by a scalar becomes a multiplication by
// its reciprocal there), so GPU users get the reference code's numbers bit for bit, on every
// backend and device. fp32(1/n) is correctly rounded here and in every other path.
// ---------------------------------------------------------------------------------------------
// The quantized value in units of the clip, for r = xs / c: the forward's y is this times c.
// Unsigned: k/n with k = round(n * clamp(r, 0, 1)); signed: 2 * k/n - 1 with
// k = round(n * (clamp(r, -1, 1) + 1) / 2).
SAQ_HD float liq_level(float r, float n, bool is_signed) {
  float inv_n = 1.0f / n;
  if (is_signed) {
    float t = clampf(r, -1.0f, 1.0f);
    float v = (t + 1.0f) / 2.0f;
    float u = round_half_even(v * n) * inv_n;
    return u * 2.0f - 1.0f;
  }
  float t = clampf(r, 0.0f, 1.0f);
  return round_half_even(t * n) * inv_n;
}

SAQ_HD float liq_forward(float xs, float c, float n, bool is_signed) {
  return liq_level(xs / c, n, is_signed) * c;
}

// dx (before the 1/std of standardization) and the per-element clip-gradient term
// g * (y/c - r * inside); the caller multiplies the clip sum by sign(clip).
// y/c is taken as the level itself (y = level * c, so y/c = level up to y's rounding): one IEEE
// division per element instead of two (each is a sequence of about ten instructions on a GPU,
// where this loop was instruction-bound in bf16: 2.5x a copy on the H200). Each term is then
// the exact level where the reference's fp32 y/c may be off by its rounding; the clip gradient
// is a sum whose order differs between backends anyway (tolerance-tested against float64). dx
// and the forward are unchanged, bit for bit.
// relu (unsigned only): the quantizer absorbs a ReLU applied before it, Q(relu(x)) = Q(x), so the
// lower end of the straight-through range is open, x > 0, as relu'(x) = (x > 0): the gradients
// then equal those of relu followed by the quantizer exactly, x = 0 included.
SAQ_HD void liq_backward(float xs, float g, float c, float n, bool is_signed, float* dx,
                         float* dclip, bool relu = false) {
  float r = xs / c;
  float lo = is_signed ? -1.0f : 0.0f;
  bool inside = (relu ? xs > 0.0f : r >= lo) && (r <= 1.0f);
  float level = liq_level(r, n, is_signed);
  *dx = inside ? g : 0.0f;
  *dclip = g * (level - (inside ? r : 0.0f));
}

}  // namespace saq
