// Host stand-in for <cuda_fp16.h> (tests/kernels/cuda_emu): the conversions the saq kernels use,
// through the compiler's _Float16 (IEEE binary16, round to nearest even).
#pragma once
#include <cstring>

struct __half {
  unsigned short x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
