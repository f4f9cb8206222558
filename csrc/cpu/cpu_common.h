// What the per-ISA row kernels (row_kernel.h) and the driver (memft_cpu.cpp) share: bfloat16 and
// float16 conversions, the statistics write, and the table of a row's kernel functions.
//
// Each instruction set's kernels are a separate translation unit compiled with its own -m flags
// (cpu_scalar.cpp, cpu_avx2.cpp, cpu_avx512.cpp; see CMakeLists.txt). Everything defined here and
// in row_kernel.h / vec_*.h has internal linkage (an unnamed namespace, or MEMFT_HD = static inline
// in row_math.h), so each unit keeps its own copy and the linker cannot hand a portable caller a
// body compiled for AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../memft_native.h"
#include "../row_math.h"

namespace memft {

// A row's kernels for one instruction set, one dtype and soft cap on or off (row_kernel.h).
struct RowFns {
  void (*forward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&);
  void (*backward)(const RowInput&, const RowOptions&, int64_t, const float*, const float*, const GradOut&, bool);
  void (*forward_backward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&, float,
                           const GradOut&, bool, float*);
  int64_t (*scratch_floats)(int64_t n_cols);  // per-thread scratch of forward_backward
};

// One per translation unit (cpu_scalar.cpp, cpu_avx2.cpp, cpu_avx512.cpp; the last two on x86 only).
RowFns scalar_row_fns(int dtype, bool cap);
RowFns avx2_row_fns(int dtype, bool cap);
RowFns avx512_row_fns(int dtype, bool cap);

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// float16 elements: a distinct type (bfloat16 is plain uint16_t) so that overloads pick the right
// conversion. Conversions are IEEE binary16 with round to nearest even, subnormals kept (the
// FP16 library's bit-exact algorithm, which torch uses on the CPU); NaN becomes the quiet NaN 0x7E00.
struct f16 {
  uint16_t bits;
};
static_assert(sizeof(f16) == 2, "f16 must be 2 bytes");

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers (and inf/NaN): rebias the exponent by scaling; subnormals: a magic-number subtract.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

inline uint16_t float_to_f16(float f) {
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scaling up then down makes overflow inf and lets the float adder round to binary16's precision.
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t h) { return bf16_to_float(h); }
inline float to_float(f16 h) { return f16_to_float(h.bits); }
inline void from_float(float v, float* p) { *p = v; }
inline void from_float(float v, uint16_t* p) { *p = float_to_bf16(v); }
inline void from_float(float v, f16* p) { p->bits = float_to_f16(v); }

// The row's statistics from its scan (max, sum of exp(x - max), sum of x, argmax) and its (capped)
// target logit, read only when the target is in range.
inline void write_stats(const RowInput& in, const RowOptions& o, int64_t i, const RowTarget& t, float x_target,
                        float max, float sumexp, float sumx, int64_t argmax, bool has_nan, const RowStatsOut& out) {
  write_row(out, i, argmax, t.valid, row_values(in, o, i, t, max, sumexp, sumx, has_nan, t.in_range ? x_target : 0.0f));
}

}  // namespace
}  // namespace memft
