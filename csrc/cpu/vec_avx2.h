// Eight floats at a time with AVX2 + FMA (+ F16C for float16). Only cpu_avx2.cpp includes it, compiled
// with -mavx2 -mfma -mf16c; memft_cpu.cpp calls it only after __builtin_cpu_supports said the host
// has all three.
#pragma once

#include <immintrin.h>

#include "cpu_common.h"

namespace memft {
namespace {

struct Avx2Vec {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const uint16_t* p) {
    // bfloat16 is the high half of a float32.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // float16: F16C's conversion (IEEE, subnormals kept).
  static F load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // nt: non-temporal store (caller checked alignment): a large gradient goes straight to memory
  // instead of first reading every destination line into the cache.
  static void store(float* p, F v, bool nt) {
    if (nt) _mm256_stream_ps(p, v);
    else _mm256_storeu_ps(p, v);
  }
  static void store(uint16_t* p, F v, bool nt) {
    const __m128i h = to_bf16(v);
    if (nt) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  static void store(f16* p, F v, bool nt) {  // round to nearest even
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (nt) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  static void fence() { _mm_sfence(); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static F blend(F a, F b, M m) { return _mm256_blendv_ps(a, b, m); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static I blendi(I a, I b, M m) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m));
  }
  static int first_true(M m) {  // lowest lane set in m, -1 if none
    const int bits = _mm256_movemask_ps(m);
    return bits ? __builtin_ctz(bits) : -1;
  }
  static void to_array(F v, float* out) { _mm256_storeu_ps(out, v); }
  static void to_array(I v, int32_t* out) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v); }

  // exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and e^r by its degree-6 Taylor
  // polynomial (truncation 1.2e-7, about 1 ulp). Arguments here are <= 0 (x - max); below -87.3
  // the result is flushed to 0 (no denormals), NaN stays NaN.
  static F exp(F x) {
    return exp_nonpositive(_mm256_min_ps(_mm256_set1_ps(88.0f), x));  // min(c, NaN) returns the NaN
  }
  static F exp_nonpositive(F x) {  // x <= 88 or NaN (the hot loops' x - max <= 0): no clamp
    const F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    F p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const F y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ), y);
  }

  // tanh: an odd polynomial below |x| = 0.625 (keeps the relative accuracy near 0), else
  // (1 - e) / (1 + e) with e = exp(-2|x|), which only needs exp of a non-positive argument.
  static F tanh(F x) {
    const F sign = _mm256_set1_ps(-0.0f);
    const F ax = _mm256_andnot_ps(sign, x);
    const F e = exp(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    const F one = _mm256_set1_ps(1.0f);
    F big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    big = _mm256_or_ps(big, _mm256_and_ps(x, sign));
    const F z = _mm256_mul_ps(x, x);
    F p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    const F small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
  }

  // Round to nearest even, as torch converts float32 to bfloat16; NaN becomes the quiet NaN 0x7FC0.
  static __m128i to_bf16(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
};

}  // namespace
}  // namespace memft
