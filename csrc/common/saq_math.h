// Shared scalar math of the saq quantizers, for the C++ CPU kernels and the CUDA kernels.
//
// One definition of rounding and operation order keeps the reference (saq_kernels/reference.py),
// the CPU, CUDA and Triton paths on identical quantized codes (docs/OPS.md, "Pinned numerics"):
//   * all math in fp32; rounding half to even (rintf / nearbyintf under the default rounding mode);
//   * fake_quantize multiplies by the reciprocal 1/scale (as ATen's fake-quant kernels);
//   * LIQ divides by the clip (as the SAQ reference code).
// This header has no torch dependency so .cu files compile with nvcc alone.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define SAQ_HD __host__ __device__ __forceinline__
#else
#define SAQ_HD inline
#endif

namespace saq {

// Round half to even. rintf honours the current rounding mode, which is round-to-nearest-even
// unless a program changes it; CUDA's rintf is always round-to-nearest-even.
SAQ_HD float round_half_even(float v) { return rintf(v); }

SAQ_HD float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

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

// Backward terms for one element: dx = g * inside;
// dscale = g * ((clamp(xq) - zp) * scale - x) * inv inside, g * (qmin - zp) below,
// g * (qmax - zp) above (times grad_factor); dzp = -g * scale * grad_factor outside, 0 inside.
SAQ_HD void fq_backward(float x, float g, float scale, float inv, float zp, float qmin, float qmax,
                        float grad_factor, float* dx, float* dscale, float* dzp) {
  float xq = round_half_even(x * inv) + zp;
  bool below = xq < qmin;
  bool above = xq > qmax;
  if (below || above) {
    *dx = 0.0f;
    *dscale = (below ? g * (qmin - zp) : g * (qmax - zp)) * grad_factor;
    *dzp = -g * scale * grad_factor;
  } else {
    float xfq = (xq - zp) * scale;
    *dx = g;
    *dscale = g * (xfq - x) * inv * grad_factor;
    *dzp = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// LIQ (SAQ reference quantizer). c = |clip| > 0, n = 2^bits - 1 as float.
// ---------------------------------------------------------------------------------------------
SAQ_HD float liq_forward(float xs, float c, float n, bool is_signed) {
  float r = xs / c;
  if (is_signed) {
    float t = clampf(r, -1.0f, 1.0f);
    float v = (t + 1.0f) / 2.0f;
    float u = round_half_even(v * n) / n;
    return (u * 2.0f - 1.0f) * c;
  }
  float t = clampf(r, 0.0f, 1.0f);
  float u = round_half_even(t * n) / n;
  return u * c;
}

// dx (before the 1/std of standardization) and the per-element clip-gradient term
// g * (y/c - r * inside); the caller multiplies the clip sum by sign(clip).
SAQ_HD void liq_backward(float xs, float g, float c, float n, bool is_signed, float* dx,
                         float* dclip) {
  float r = xs / c;
  float lo = is_signed ? -1.0f : 0.0f;
  bool inside = (r >= lo) && (r <= 1.0f);
  float y = liq_forward(xs, c, n, is_signed);
  *dx = inside ? g : 0.0f;
  *dclip = g * (y / c - (inside ? r : 0.0f));
}

}  // namespace saq
