// Bit casts for the stand-in headers of tests/kernels/cuda_emu (C++17: no std::bit_cast).
#pragma once
#include <cstring>

template <class To, class From>
inline To emu_bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "emu_bit_cast: sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
