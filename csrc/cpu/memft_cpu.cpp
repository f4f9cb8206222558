// CPU backend of the MemFT row kernels: OpenMP over rows, each row reduced by one thread in a fixed
// order, so results are bitwise independent of the thread count. The vector code (row_kernel.h) is
// compiled three times: portable scalar code, AVX2 + FMA and AVX-512F, chosen at run time by what
// the host has, so a wheel built anywhere runs on every x86-64 machine (no -march=native).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MEMFT_X86 1
#endif

#include "../memft_native.h"
#include "../row_math.h"

namespace memft {
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

struct RowFns {
  void (*forward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&);
  void (*backward)(const RowInput&, const RowOptions&, int64_t, const float*, const float*, const GradOut&, bool);
  void (*forward_backward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&, float,
                           const GradOut&, bool, float*);
  int64_t (*scratch_floats)(int64_t n_cols);  // per-thread scratch of the fused path
};

namespace scalar_isa {
#include "vec_scalar.h"
#include "row_kernel.h"
}  // namespace scalar_isa

#ifdef MEMFT_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2_isa {
#include "vec_avx2.h"
#include "row_kernel.h"
}  // namespace avx2_isa
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
namespace avx512_isa {
#include "vec_avx512.h"
#include "row_kernel.h"
}  // namespace avx512_isa
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa host_isa() {
#ifdef MEMFT_X86
  static const Isa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                                 __builtin_cpu_supports("fma")
                             ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                             : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

// The best the host has; MEMFT_CPU_ISA=avx2|scalar caps it (the tests run every path the host can).
Isa active_isa() {
  const Isa host = host_isa();
  const char* force = std::getenv("MEMFT_CPU_ISA");
  if (force && std::strcmp(force, "scalar") == 0) return Isa::kScalar;
  if (force && std::strcmp(force, "avx2") == 0 && host == Isa::kAvx512) return Isa::kAvx2;
  return host;
}

RowFns select(const RowInput& in, const RowOptions& o) {
  if (in.dtype != kFloat32 && in.dtype != kBFloat16)
    throw std::invalid_argument("memft CPU kernels take float32 or bfloat16 logits");
  const bool cap = o.softcap > 0.0f;
#ifdef MEMFT_X86
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) return avx512_isa::row_fns(in.dtype, cap);
  if (isa == Isa::kAvx2) return avx2_isa::row_fns(in.dtype, cap);
#endif
  return scalar_isa::row_fns(in.dtype, cap);
}

// Non-temporal gradient stores pay off only when the gradient cannot stay in the caches anyway,
// and never in place (the row is already in the cache then).
bool stream_stores(const RowInput& in, const GradOut& g) {
  const int64_t bytes = in.n_rows * in.n_cols * (in.dtype == kFloat32 ? 4 : 2);
  return g.data != in.logits && bytes >= (int64_t{32} << 20);
}

// A fresh gradient buffer is first touched here; 2 MiB pages make that a few hundred page faults
// instead of one per 4 KiB (on a VM those faults cost more than writing the data). Advice only.
void advise_huge_pages(const RowInput& in, const GradOut& g) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t{2} << 20;
  const int64_t elem = in.dtype == kFloat32 ? 4 : 2;
  const uintptr_t a = reinterpret_cast<uintptr_t>(g.data);
  const uintptr_t bytes = static_cast<uintptr_t>(((in.n_rows - 1) * g.row_stride + in.n_cols) * elem);
  const uintptr_t start = (a + huge - 1) & ~(huge - 1), end = (a + bytes) & ~(huge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)in;
  (void)g;
#endif
}

// fn(i, scratch) for every row; each thread owns `scratch_floats` floats of scratch.
template <class Fn>
void for_rows(int64_t n, int threads, int64_t scratch_floats, const Fn& fn) {
  if (threads <= 1 || n <= 1) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t i = 0; i < n; ++i) fn(i, scratch.data());
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) fn(i, scratch.data());
  }
}

}  // namespace

const char* cpu_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2+fma";
    default: return "scalar";
  }
}

void cpu_row_forward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out, int threads) {
  const RowFns f = select(in, opt);
  for_rows(in.n_rows, threads, 0, [&](int64_t i, float*) { f.forward(in, opt, i, out); });
}

void cpu_row_backward(const RowInput& in, const RowOptions& opt, const float* lse, const float* coef,
                      const GradOut& grad, int threads) {
  const RowFns f = select(in, opt);
  const bool nt = stream_stores(in, grad);
  if (nt) advise_huge_pages(in, grad);
  for_rows(in.n_rows, threads, 0, [&](int64_t i, float*) { f.backward(in, opt, i, lse, coef, grad, nt); });
}

void cpu_row_forward_backward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out,
                              const float* scale, const GradOut& grad, int threads) {
  const RowFns f = select(in, opt);
  const bool nt = stream_stores(in, grad);
  if (nt) advise_huge_pages(in, grad);
  const float s = *scale;
  for_rows(in.n_rows, threads, f.scratch_floats(in.n_cols),
           [&](int64_t i, float* scratch) { f.forward_backward(in, opt, i, out, s, grad, nt, scratch); });
}

}  // namespace memft
