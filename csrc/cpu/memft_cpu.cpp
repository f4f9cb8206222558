// CPU backend of the MemFT row kernels: OpenMP over rows, each row reduced by one thread in a fixed
// order, so results are bitwise independent of the thread count. The vector code is compiled twice
// (row_kernel.h): portable scalar code, and AVX2 + FMA code chosen at run time when the host has it,
// so a wheel built here runs on every x86-64 machine (no -march=native).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MEMFT_X86 1
#endif

#include "../memft_native.h"

namespace memft {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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

inline float capped_scalar(float x, float softcap) {
  return softcap > 0.0f ? softcap * std::tanh(x / softcap) : x;
}

struct RowTarget {
  int64_t index;  // only meaningful when in_range
  bool valid;     // not ignore_index
  bool in_range;  // 0 <= target < V: the only case in which it is used as an index
};

inline RowTarget row_target(const RowInput& in, const RowOptions& o, int64_t i) {
  const int64_t t = in.target_int64 ? static_cast<const int64_t*>(in.target)[i * in.target_stride]
                                    : static_cast<const int32_t*>(in.target)[i * in.target_stride];
  return RowTarget{t, t != o.ignore_index, t >= 0 && t < in.n_cols};
}

// w_i of SPEC.md: the policy gate, the NaN rule (w = 1 where ce is NaN), then the token weight.
inline float policy_weight(float ce, float token_weight, const RowOptions& o) {
  float w = 1.0f;
  if (o.policy == kPolicyHard) {
    w = std::exp(-ce) < o.threshold ? 1.0f : 0.0f;
  } else if (o.policy == kPolicySigmoid) {
    w = 1.0f / (1.0f + std::exp(-(o.sharpness * (ce - o.ce_threshold))));
  }
  if (std::isnan(ce)) w = 1.0f;
  return w * token_weight;
}

// The row's statistics from its scan (max, sum of exp(x - max), sum of x, argmax).
template <class T>
void write_stats(const RowInput& in, const RowOptions& o, int64_t i, const T* x, float max, float sumexp,
                 float sumx, int64_t argmax, bool has_nan, const RowStatsOut& out) {
  const RowTarget t = row_target(in, o, i);
  out.pred[i] = argmax;
  if (!t.valid) {
    out.lse[i] = out.ce[i] = out.prob[i] = out.weight[i] = out.loss[i] = 0.0f;
    return;
  }
  float lse;
  if (has_nan) lse = kNaN;
  else if (max == kInf) lse = kInf;  // torch.logsumexp's value; max + log(sum) would be NaN
  else lse = max + std::log(sumexp);
  const float ce = t.in_range ? lse - capped_scalar(to_float(x[t.index]), o.softcap) : kNaN;
  const float eps = o.label_smoothing;
  float loss = (1.0f - eps) * ce;
  if (eps != 0.0f) loss += eps * (lse - sumx / static_cast<float>(in.n_cols));
  if (o.z_loss != 0.0f) loss += o.z_loss * lse * lse;
  const float tw = in.token_weight ? in.token_weight[i * in.token_weight_stride] : 1.0f;
  out.lse[i] = lse;
  out.ce[i] = ce;
  out.prob[i] = std::exp(-ce);
  out.weight[i] = policy_weight(ce, tw, o);
  out.loss[i] = loss;
}

struct RowFns {
  void (*forward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&);
  void (*backward)(const RowInput&, const RowOptions&, int64_t, const float*, const float*, const GradOut&, bool);
  void (*forward_backward)(const RowInput&, const RowOptions&, int64_t, const RowStatsOut&, float,
                           const GradOut&, bool);
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
#else
#pragma GCC pop_options
#endif
#endif

bool host_has_avx2() {
#ifdef MEMFT_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

RowFns select(const RowInput& in, const RowOptions& o) {
  if (in.dtype != kFloat32 && in.dtype != kBFloat16)
    throw std::invalid_argument("memft CPU kernels take float32 or bfloat16 logits");
  const bool cap = o.softcap > 0.0f;
#ifdef MEMFT_X86
  if (host_has_avx2()) return avx2_isa::row_fns(in.dtype, cap);
#endif
  return scalar_isa::row_fns(in.dtype, cap);
}

// Non-temporal gradient stores pay off only when the gradient cannot stay in the caches anyway,
// and never in place (the row is already in the cache then).
bool stream_stores(const RowInput& in, const GradOut& g) {
  const int64_t bytes = in.n_rows * in.n_cols * (in.dtype == kFloat32 ? 4 : 2);
  return g.data != in.logits && bytes >= (int64_t{32} << 20);
}

template <class Fn>
void for_rows(int64_t n, int threads, const Fn& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace

const char* cpu_isa() { return host_has_avx2() ? "avx2+fma" : "scalar"; }

void cpu_row_forward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out, int threads) {
  const RowFns f = select(in, opt);
  for_rows(in.n_rows, threads, [&](int64_t i) { f.forward(in, opt, i, out); });
}

void cpu_row_backward(const RowInput& in, const RowOptions& opt, const float* lse, const float* coef,
                      const GradOut& grad, int threads) {
  const RowFns f = select(in, opt);
  const bool nt = stream_stores(in, grad);
  for_rows(in.n_rows, threads, [&](int64_t i) { f.backward(in, opt, i, lse, coef, grad, nt); });
}

void cpu_row_forward_backward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out,
                              const float* scale, const GradOut& grad, int threads) {
  const RowFns f = select(in, opt);
  const bool nt = stream_stores(in, grad);
  const float s = *scale;
  for_rows(in.n_rows, threads, [&](int64_t i) { f.forward_backward(in, opt, i, out, s, grad, nt); });
}

}  // namespace memft
