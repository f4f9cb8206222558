// CPU backend of the MemFT row kernels: OpenMP over rows, each row reduced by one thread in a fixed
// order, so results are bitwise independent of the thread count. The row kernels (row_kernel.h) are
// compiled three times, each in its own translation unit with its own flags: portable scalar code
// (cpu_scalar.cpp), AVX2 + FMA (cpu_avx2.cpp) and AVX-512F (cpu_avx512.cpp); this file chooses one at
// run time by what the host has, so a wheel built anywhere runs on every x86-64 machine (no
// -march=native).
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define MEMFT_X86 1
#endif

#include "cpu_common.h"

namespace memft {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa host_isa() {
#ifdef MEMFT_X86
  static const Isa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                                 __builtin_cpu_supports("fma")
                             ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c")  // float16 loads/stores; every AVX2 CPU has it
                             ? Isa::kAvx2
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
  if (in.dtype != kFloat32 && in.dtype != kBFloat16 && in.dtype != kFloat16)
    throw std::invalid_argument("memft CPU kernels take float32, bfloat16 or float16 logits");
  const bool cap = o.softcap > 0.0f;
#ifdef MEMFT_X86
  const Isa isa = active_isa();
  if (isa == Isa::kAvx512) return avx512_row_fns(in.dtype, cap);
  if (isa == Isa::kAvx2) return avx2_row_fns(in.dtype, cap);
#endif
  return scalar_row_fns(in.dtype, cap);
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

void cpu_scale_rows(void* grad, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride, const float* factor,
                    int threads) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument("memft CPU kernels take float32, bfloat16 or float16 gradients");
  const float f = *factor;
  if (f == 1.0f || n_rows == 0) return;
  for_rows(n_rows, threads, 0, [&](int64_t i, float*) {
    if (dtype == kFloat32) {
      float* row = static_cast<float*>(grad) + i * row_stride;
      for (int64_t j = 0; j < n_cols; ++j) row[j] *= f;
    } else if (dtype == kBFloat16) {
      uint16_t* row = static_cast<uint16_t*>(grad) + i * row_stride;
      for (int64_t j = 0; j < n_cols; ++j) row[j] = float_to_bf16(bf16_to_float(row[j]) * f);
    } else {
      uint16_t* row = static_cast<uint16_t*>(grad) + i * row_stride;
      for (int64_t j = 0; j < n_cols; ++j) row[j] = float_to_f16(f16_to_float(row[j]) * f);
    }
  });
}

}  // namespace memft
