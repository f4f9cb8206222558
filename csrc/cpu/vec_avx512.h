// Sixteen floats at a time with AVX-512F. Only cpu_avx512.cpp includes it, compiled with
// -mavx512f -mavx2 -mfma; memft_cpu.cpp calls it only after __builtin_cpu_supports said the host has them. Same
// algorithms as vec_avx2.h; masks are __mmask16.
#pragma once

#include <immintrin.h>

#include "cpu_common.h"

namespace memft {
namespace {

struct Avx512Vec {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, F v, bool nt) {
    if (nt) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  }
  static void store(uint16_t* p, F v, bool nt) {
    const __m256i h = to_bf16(v);
    if (nt) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  static void store(f16* p, F v, bool nt) {  // round to nearest even
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (nt) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  static void fence() { _mm_sfence(); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static F blend(F a, F b, M m) { return _mm512_mask_blend_ps(m, a, b); }
  static I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static I blendi(I a, I b, M m) { return _mm512_mask_blend_epi32(m, a, b); }
  static int first_true(M m) { return m ? __builtin_ctz(static_cast<unsigned>(m)) : -1; }
  static void to_array(F v, float* out) { _mm512_storeu_ps(out, v); }
  static void to_array(I v, int32_t* out) { _mm512_storeu_si512(out, v); }

  static F exp(F x) { return exp_nonpositive(_mm512_min_ps(_mm512_set1_ps(88.0f), x)); }
  static F exp_nonpositive(F x) {  // see vec_avx2.h
    const F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    F p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const F y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ), y);
  }

  static F tanh(F x) {  // see vec_avx2.h
    const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
    const __m512i xi = _mm512_castps_si512(x);
    const F ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, xi));
    const F e = exp(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
    const F one = _mm512_set1_ps(1.0f);
    F big = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), _mm512_and_si512(xi, sign)));
    const F z = _mm512_mul_ps(x, x);
    F p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    const F small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big, small);
  }

  static __m256i to_bf16(F v) {  // round to nearest even; NaN -> 0x7FC0 (see vec_avx2.h)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
};

}  // namespace
}  // namespace memft
