// CPU emulation of cuda_fp16.h for tests/test_cuda_emulated.py: __half as 16-bit storage, converted
// through GCC's _Float16, i.e. exact IEEE binary16 rounding (nearest even, subnormals, inf, NaN).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct alignas(2) __half {
  uint16_t __x;
};
static_assert(sizeof(__half) == 2 && sizeof(_Float16) == 2, "binary16 storage");

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, sizeof v);
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // GCC: correctly rounded float -> binary16
  __half h;
  std::memcpy(&h.__x, &v, sizeof v);
  return h;
}
