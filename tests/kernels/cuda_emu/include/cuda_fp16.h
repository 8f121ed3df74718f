// Host stand-in for <cuda_fp16.h> (tests/kernels/cuda_emu): the conversions the saq kernels use,
// through the compiler's _Float16 (IEEE binary16, round to nearest even).
#pragma once
#include "emu_bits.h"

struct __half {
  unsigned short x;
};
inline float __half2float(__half h) { return static_cast<float>(emu_bit_cast<_Float16>(h.x)); }
inline __half __float2half_rn(float v) { return __half{emu_bit_cast<unsigned short>(static_cast<_Float16>(v))}; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
