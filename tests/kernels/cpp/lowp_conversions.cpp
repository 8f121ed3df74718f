// Exhaustive check of csrc/cpu/kernel_utils.h's inline bf16 conversions against c10's: every fp32
// bit pattern -> bf16 (NaNs included) through bf16_bits and narrow<BFloat16>, every bf16 pattern
// -> fp32 through widen<BFloat16>. Built and run by tests/kernels/test_lowp_steps.py (slow);
// prints one line, exits 1 on a mismatch.
#include <cinttypes>
#include <cstdio>

#include "cpu/kernel_utils.h"

using saq_cpu::bits_of;
using saq_cpu::float_of;

int main() {
  uint64_t bad_n = 0, bad_w = 0;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); ++u) {
    const float f = float_of(static_cast<uint32_t>(u));
    const uint16_t ref = c10::BFloat16(f).x;
    const uint16_t a = saq_cpu::bf16_bits(f), b = saq_cpu::narrow<c10::BFloat16>(f).x;
    if ((a != ref || b != ref) && bad_n++ < 3) std::printf("bf16(%08" PRIx64 "): %04x / %04x, c10 %04x\n", u, a, b, ref);
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    const c10::BFloat16 x(static_cast<uint16_t>(h), c10::BFloat16::from_bits());
    const uint32_t ours = bits_of(saq_cpu::widen<c10::BFloat16>(x)), ref = bits_of(static_cast<float>(x));
    if (ours != ref && bad_w++ < 3) std::printf("fp32(%04x): %08x, c10 %08x\n", h, ours, ref);
  }
  std::printf("mismatches: fp32->bf16 %" PRIu64 ", bf16->fp32 %" PRIu64 "\n", bad_n, bad_w);
  return (bad_n || bad_w) ? 1 : 0;
}
