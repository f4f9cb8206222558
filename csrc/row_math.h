// The per-row scalar math of docs/SPEC.md shared by the CPU and CUDA kernels: target handling,
// the row's statistics from its scan, the policy weight and the target element of the gradient.
#pragma once

#include <math.h>

#include <cstdint>
#include <limits>

#include "memft_native.h"

#ifdef __CUDACC__
#define MEMFT_HD __host__ __device__ __forceinline__
#else
// static: every CPU translation unit (one per instruction set, csrc/cpu/cpu_common.h) keeps its own
// copy, compiled with its own flags.
#define MEMFT_HD static inline
#endif

namespace memft {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

MEMFT_HD bool is_nan(float x) { return x != x; }

MEMFT_HD float capped(float x, float softcap) { return softcap > 0.0f ? softcap * tanhf(x / softcap) : x; }

struct RowTarget {
  int64_t index;  // used as an index only when in_range
  bool valid;     // not ignore_index
  bool in_range;  // 0 <= target < V
};

MEMFT_HD RowTarget row_target(const RowInput& in, const RowOptions& o, int64_t i) {
  const int64_t t = in.target_int64 ? static_cast<const int64_t*>(in.target)[i * in.target_stride]
                                    : static_cast<const int32_t*>(in.target)[i * in.target_stride];
  return RowTarget{t, t != o.ignore_index, t >= 0 && t < in.n_cols};
}

// w_i: the policy gate, the NaN rule (w = 1 where ce is NaN), then the token weight.
MEMFT_HD float policy_weight(float ce, float token_weight, const RowOptions& o) {
  float w = 1.0f;
  if (o.policy == kPolicyHard) {
    w = expf(-ce) < o.threshold ? 1.0f : 0.0f;
  } else if (o.policy == kPolicySigmoid) {
    w = 1.0f / (1.0f + expf(-(o.sharpness * (ce - o.ce_threshold))));
  }
  if (is_nan(ce)) w = 1.0f;
  return w * token_weight;
}

struct RowValues {
  float lse, ce, prob, weight, loss;
};

// A valid row's values from its scan: max, sum of exp(x - max), sum of x, whether it holds a NaN,
// and its capped target logit (ignored when the target is out of range).
MEMFT_HD RowValues row_values(const RowInput& in, const RowOptions& o, int64_t i, const RowTarget& t, float max,
                              float sumexp, float sumx, bool has_nan, float x_target) {
  RowValues r;
  if (has_nan) r.lse = kNaN;
  else if (max == kInf) r.lse = kNaN;  // a +inf logit: F.cross_entropy's log_softmax gives NaN (inf - inf)
  else r.lse = max + logf(sumexp);
  r.ce = t.in_range ? r.lse - x_target : kNaN;
  const float eps = o.label_smoothing;
  r.loss = (1.0f - eps) * r.ce;
  if (eps != 0.0f) r.loss += eps * (r.lse - sumx / static_cast<float>(in.n_cols));
  if (o.z_loss != 0.0f) r.loss += o.z_loss * r.lse * r.lse;
  const float tw = in.token_weight ? in.token_weight[i * in.token_weight_stride] : 1.0f;
  r.prob = expf(-r.ce);
  r.weight = policy_weight(r.ce, tw, o);
  return r;
}

MEMFT_HD void write_row(const RowStatsOut& out, int64_t i, int64_t pred, bool valid, const RowValues& r) {
  out.pred[i] = pred;
  out.lse[i] = valid ? r.lse : 0.0f;
  out.ce[i] = valid ? r.ce : 0.0f;
  out.prob[i] = valid ? r.prob : 0.0f;
  out.weight[i] = valid ? r.weight : 0.0f;
  out.loss[i] = valid ? r.loss : 0.0f;
}

// The gradient of every class but the target is (a * q_j + b) * cap_j with these a and b.
struct GradCoefs {
  float a, b, zfac, smooth;
};

MEMFT_HD GradCoefs grad_coefs(const RowOptions& o, int64_t n_cols, float lse, float coef) {
  GradCoefs c;
  c.zfac = o.z_loss != 0.0f ? 1.0f + 2.0f * o.z_loss * lse : 1.0f;
  // eps / V with V the whole vocabulary: inv_vocab from the caller (a vocabulary slice passes the
  // global 1 / V), or 1 / n_cols when it is not set.
  const float inv_v = o.inv_vocab > 0.0f ? o.inv_vocab : 1.0f / static_cast<float>(n_cols);
  c.smooth = o.label_smoothing != 0.0f ? o.label_smoothing * inv_v : 0.0f;
  c.a = coef * c.zfac;
  c.b = -coef * c.smooth;
  return c;
}

// The target element, formed in float32 before rounding to the logits' dtype (SPEC.md).
MEMFT_HD float target_grad(const RowOptions& o, const GradCoefs& c, float x_target, float lse, float coef) {
  float g = expf(x_target - lse) * c.zfac - c.smooth - (1.0f - o.label_smoothing);
  if (o.softcap > 0.0f) g *= 1.0f - (x_target / o.softcap) * (x_target / o.softcap);
  return g * coef;
}

}  // namespace memft
