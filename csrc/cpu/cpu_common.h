// What the per-ISA row kernels (row_kernel.h) and the driver (memft_cpu.cpp) share: bfloat16
// conversions, the statistics write, and the table of a row's kernel functions.
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

inline float to_float(float v) { return v; }
inline float to_float(uint16_t h) { return bf16_to_float(h); }
inline void from_float(float v, float* p) { *p = v; }
inline void from_float(float v, uint16_t* p) { *p = float_to_bf16(v); }

// The row's statistics from its scan (max, sum of exp(x - max), sum of x, argmax).
template <class T>
void write_stats(const RowInput& in, const RowOptions& o, int64_t i, const T* x, float max, float sumexp,
                 float sumx, int64_t argmax, bool has_nan, const RowStatsOut& out) {
  const RowTarget t = row_target(in, o, i);
  const float x_target = t.in_range ? capped(to_float(x[t.index]), o.softcap) : 0.0f;
  write_row(out, i, argmax, t.valid, row_values(in, o, i, t, max, sumexp, sumx, has_nan, x_target));
}

}  // namespace
}  // namespace memft
