// CPU emulation of cuda_bf16.h for tests/test_cuda_emulated.py: __nv_bfloat16 as 16-bit storage
// with CUDA's conversions (round to nearest even; NaN becomes the canonical 0x7FFF as in CUDA).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct alignas(2) __nv_bfloat16 {
  uint16_t __x;
};
static_assert(sizeof(__nv_bfloat16) == 2, "bfloat16 storage");

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even; overflows to inf correctly
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
