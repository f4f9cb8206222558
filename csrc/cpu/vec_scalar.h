// One float at a time: the portable fallback of the row kernels (any CPU, any compiler).
// The interface RowKernel<Vec> (row_kernel.h) uses; cpu_scalar.cpp instantiates it.
#pragma once

#include "cpu_common.h"

namespace memft {
namespace {

struct ScalarVec {
  static constexpr int W = 1;
  using F = float;
  using I = int32_t;
  using M = bool;
  static F zero() { return 0.0f; }
  static F set1(float v) { return v; }
  static F load(const float* p) { return *p; }
  static F load(const uint16_t* p) { return bf16_to_float(*p); }
  static F load(const f16* p) { return f16_to_float(p->bits); }
  static void store(float* p, F v, bool) { *p = v; }
  static void store(uint16_t* p, F v, bool) { *p = float_to_bf16(v); }
  static void store(f16* p, F v, bool) { p->bits = float_to_f16(v); }
  static void fence() {}
  static void prefetch_l2(const void*) {}
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) { return b > a ? b : a; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F fnmadd(F a, F b, F c) { return c - a * b; }
  static M gt(F a, F b) { return a > b; }
  static M eq(F a, F b) { return a == b; }
  static F blend(F a, F b, M m) { return m ? b : a; }
  static I set1i(int32_t v) { return v; }
  static I blendi(I a, I b, M m) { return m ? b : a; }
  static int first_true(M m) { return m ? 0 : -1; }
  static void to_array(F v, float* out) { out[0] = v; }
  static void to_array(I v, int32_t* out) { out[0] = v; }
  static F exp(F x) { return std::exp(x); }
  static F exp_nonpositive(F x) { return std::exp(x); }
  static F tanh(F x) { return std::tanh(x); }
};

}  // namespace
}  // namespace memft
