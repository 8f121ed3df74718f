// Exhaustive check of csrc/cpu/kernel_utils.h's inline fp16 / bf16 conversions against c10's:
// every fp32 bit pattern -> fp16 and -> bf16, every fp16 pattern -> fp32 (NaNs included).
// Built and run by tests/kernels/test_lowp_steps.py (slow); prints one line, exits 1 on a mismatch.
#include <cinttypes>
#include <cstdio>

#include "cpu/kernel_utils.h"

using saq_cpu::bits_of;
using saq_cpu::float_of;

int main() {
  uint64_t bad_h = 0, bad_b = 0, bad_v = 0;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); ++u) {
    const float f = float_of(static_cast<uint32_t>(u));
    const uint16_t h = saq_cpu::fp16_bits(f), b = saq_cpu::bf16_bits(f);
    if (h != c10::Half(f).x && bad_h++ < 3) std::printf("fp16(%08" PRIx64 "): %04x, c10 %04x\n", u, h, c10::Half(f).x);
    if (b != c10::BFloat16(f).x && bad_b++ < 3) std::printf("bf16(%08" PRIx64 "): %04x, c10 %04x\n", u, b, c10::BFloat16(f).x);
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = saq_cpu::fp16_value(static_cast<uint16_t>(h));
    const float ref = static_cast<float>(c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits()));
    if (bits_of(ours) != bits_of(ref) && bad_v++ < 3) std::printf("fp32(%04x): %08x, c10 %08x\n", h, bits_of(ours), bits_of(ref));
  }
  std::printf("mismatches: fp32->fp16 %" PRIu64 ", fp32->bf16 %" PRIu64 ", fp16->fp32 %" PRIu64 "\n", bad_h, bad_b, bad_v);
  return (bad_h || bad_b || bad_v) ? 1 : 0;
}
