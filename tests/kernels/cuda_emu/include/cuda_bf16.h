// Host stand-in for <cuda_bf16.h> (tests/kernels/cuda_emu): bfloat16 is the top half of an fp32;
// fp32 -> bf16 rounds to nearest even, a NaN stays a (quiet) NaN.
#pragma once
#include <cstdint>

#include "emu_bits.h"

struct __nv_bfloat16 {
  unsigned short x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return emu_bit_cast<float>(static_cast<uint32_t>(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u = emu_bit_cast<uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
