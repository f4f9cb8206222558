// The per-row CPU kernels, written once as the static members of RowKernel<Vec> over a vector
// type: ScalarVec (vec_scalar.h), Avx2Vec (vec_avx2.h) or Avx512Vec (vec_avx512.h). Each of
// cpu_scalar.cpp, cpu_avx2.cpp and cpu_avx512.cpp instantiates it for one of them, compiled for that
// instruction set; memft_cpu.cpp picks one at run time (internal linkage: see cpu_common.h).
//
// A row is read from memory once: scan_row walks it in L1-sized blocks (pass A: block max and sum;
// pass B: the block's exp-sum against the running max). The fused forward+backward keeps those exp
// values in a per-thread scratch row (L2-resident), so its gradient sweep costs one multiply-add
// per element instead of a second exp, and streams the gradient out.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

namespace memft {
namespace {

template <class Vec>
struct RowKernel {
  static constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB stays in L1 between the two block passes
  static constexpr int64_t kChunk = 128;   // elements per partial sum (a multiple of every W)

  struct Scan {
    float max;
    float sumexp;  // sum of exp(x - max)
    float sumx;
    int64_t argmax;  // lowest index among ties; the first NaN if there is one (torch.argmax's rule)
    bool has_nan;
  };

  template <bool kCap, class T>
  static typename Vec::F load_capped(const T* p, typename Vec::F cap, typename Vec::F inv_cap) {
    typename Vec::F v = Vec::load(p);
    if constexpr (kCap) v = Vec::mul(cap, Vec::tanh(Vec::mul(v, inv_cap)));
    return v;
  }

  // The tail x[nv, n) (fewer than W elements) into tv, capped by the very code the vector lanes use
  // (lane-wise, on a buffer padded with zeros): a logit gets the same capped value wherever it lies in
  // the row. (libm's tanh here put a maximum tied between a lane and the tail one ulp higher in the
  // tail, and argmax then named the later index.)
  template <class T, bool kCap>
  static void tail_values(const T* x, int64_t nv, int64_t n, float softcap, float* tv) {
    alignas(64) float buf[Vec::W];
    for (int k = 0; k < Vec::W; ++k) buf[k] = nv + k < n ? to_float(x[nv + k]) : 0.0f;
    if constexpr (kCap)
      Vec::to_array(load_capped<kCap>(buf, Vec::set1(softcap), Vec::set1(1.0f / softcap)), buf);
    else
      (void)softcap;
    for (int64_t k = 0; k < n - nv; ++k) tv[k] = buf[k];
  }

  // x[j] as scan_row saw it: the target logit must be the very value the row's max and lse came from
  // (else ce = lse - x_target could come out below 0, p above 1, and V = 1 would not give ce = 0).
  template <class T, bool kCap>
  static float scanned_value(const T* x, int64_t n, int64_t j, float softcap) {
    if constexpr (!kCap) {
      (void)n;
      (void)softcap;
      return to_float(x[j]);
    } else {
      const int64_t nv = n / Vec::W * Vec::W;
      float lanes[Vec::W];
      if (j >= nv) {
        tail_values<T, kCap>(x, nv, n, softcap, lanes);
        return lanes[j - nv];
      }
      Vec::to_array(load_capped<kCap>(x + j / Vec::W * Vec::W, Vec::set1(softcap), Vec::set1(1.0f / softcap)), lanes);
      return lanes[j % Vec::W];
    }
  }

  // First index in [b0, b1) (a whole number of vectors) whose capped value equals m, or -1.
  template <class T, bool kCap>
  static int64_t find_value(const T* x, int64_t b0, int64_t b1, float m, float softcap) {
    const typename Vec::F cap = Vec::set1(softcap), inv_cap = Vec::set1(kCap ? 1.0f / softcap : 0.0f);
    const typename Vec::F vm = Vec::set1(m);
    for (int64_t j = b0; j < b1; j += Vec::W) {
      const int k = Vec::first_true(Vec::eq(load_capped<kCap>(x + j, cap, inv_cap), vm));
      if (k >= 0) return j + k;
    }
    return -1;
  }

  // keep_exp (n floats) and keep_max ((n / kBlock + 1) * W floats), when given, receive
  // exp(x_j - s) and, per block, the lanes' running max s (s = -inf stands for a shift of 0).
  template <class T, bool kCap>
  static Scan scan_row(const T* x, int64_t n, float softcap, float* keep_exp, float* keep_max) {
    using F = typename Vec::F;
    using I = typename Vec::I;
    constexpr int W = Vec::W;
    // Converted or capped values are kept for the second block pass; plain float32 is read again.
    constexpr bool kBuffered = kCap || !std::is_same<T, float>::value;
    const F cap = Vec::set1(softcap), inv_cap = Vec::set1(kCap ? 1.0f / softcap : 0.0f);
    const F neg_inf = Vec::set1(-kInf);
    alignas(64) float buf[kBuffered ? kBlock : 1];

    // Sums are formed in three levels, so that no float32 accumulator takes more than a few hundred
    // additions whatever V is (one running sum per lane over the whole row lost ~1e-4 of the loss
    // at V = 1M on the scalar path): kChunk elements into a chunk sum, chunk sums into the block's
    // sum, block sums into the running sum with Kahan compensation (rescaled with it).
    F run_max = neg_inf, run_sum = Vec::zero(), run_comp = Vec::zero(), sum_x = Vec::zero();
    I run_block = Vec::set1i(0);  // per lane: the first block in which its max was reached
    const int64_t nv = n / W * W;
    for (int64_t b0 = 0, blk = 0; b0 < nv; b0 += kBlock, ++blk) {
      const int64_t b1 = b0 + kBlock < nv ? b0 + kBlock : nv;
      F bmax = neg_inf, bx = Vec::zero();
      for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
        const int64_t c1 = c0 + kChunk < b1 ? c0 + kChunk : b1;
        F cx = Vec::zero();
        for (int64_t j = c0; j < c1; j += W) {
          const F v = load_capped<kCap>(x + j, cap, inv_cap);
          if constexpr (kBuffered) Vec::store(buf + (j - b0), v, false);
          bmax = Vec::max(bmax, v);
          cx = Vec::add(cx, v);
        }
        bx = Vec::add(bx, cx);
      }
      sum_x = Vec::add(sum_x, bx);
      run_block = Vec::blendi(run_block, Vec::set1i(static_cast<int32_t>(blk)), Vec::gt(bmax, run_max));
      const F new_max = Vec::max(run_max, bmax);
      // A lane that has seen only -inf keeps max -inf: shift by 0 then, so exp gives 0, not NaN.
      const F shift = Vec::blend(new_max, Vec::zero(), Vec::eq(new_max, neg_inf));
      const F rescale = Vec::exp(Vec::sub(run_max, shift));
      run_sum = Vec::mul(run_sum, rescale);
      run_comp = Vec::mul(run_comp, rescale);
      run_max = new_max;
      if (keep_max) Vec::store(keep_max + blk * W, new_max, false);
      F bsum = Vec::zero();
      for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
        const int64_t c1 = c0 + kChunk < b1 ? c0 + kChunk : b1;
        F csum = Vec::zero();
        for (int64_t j = c0; j < c1; j += W) {
          F v;
          if constexpr (kBuffered) v = Vec::load(buf + (j - b0));
          else v = Vec::load(x + j);
          const F e = Vec::exp_nonpositive(Vec::sub(v, shift));  // v <= shift, or v = -inf
          if (keep_exp) Vec::store(keep_exp + j, e, false);
          csum = Vec::add(csum, e);
        }
        bsum = Vec::add(bsum, csum);
      }
      // Kahan: run_sum + bsum, carrying the rounding error of the running sum in run_comp.
      const F y = Vec::sub(bsum, run_comp);
      const F total = Vec::add(run_sum, y);
      run_comp = Vec::sub(Vec::sub(total, run_sum), y);
      run_sum = total;
    }

    // Lanes, then the tail (fewer than W elements), combined in a fixed order.
    float lane_max[W], lane_sum[W], lane_x[W];
    int32_t lane_block[W];
    Vec::to_array(run_max, lane_max);
    Vec::to_array(run_sum, lane_sum);
    Vec::to_array(sum_x, lane_x);
    Vec::to_array(run_block, lane_block);
    float tail_max = -kInf, tail_x = 0.0f, tail_sum = 0.0f;
    int64_t tail_idx = nv;
    float tail_v[W];
    tail_values<T, kCap>(x, nv, n, softcap, tail_v);
    for (int64_t j = nv; j < n; ++j) {
      const float v = tail_v[j - nv];
      if (v > tail_max) {
        tail_max = v;
        tail_idx = j;
      }
      tail_x += v;
    }
    for (int64_t j = nv; j < n; ++j) {
      tail_sum += std::exp(tail_v[j - nv] - (tail_max == -kInf ? 0.0f : tail_max));
    }

    Scan s{-kInf, 0.0f, 0.0f, 0, false};
    float lanes_max = -kInf;
    for (int k = 0; k < W; ++k) lanes_max = lane_max[k] > lanes_max ? lane_max[k] : lanes_max;
    s.max = nv > 0 ? lanes_max : tail_max;
    if (nv < n && tail_max > s.max) s.max = tail_max;
    const float shift = s.max == -kInf ? 0.0f : s.max;
    for (int k = 0; k < W && nv > 0; ++k) s.sumexp += lane_sum[k] * std::exp(lane_max[k] - shift);
    if (nv < n) s.sumexp += tail_sum * std::exp(tail_max - shift);
    // The max element adds exactly exp(0) = 1: the compensated sums' rounding must not take the total
    // below it (lse >= max keeps ce >= 0). NaN stays NaN, and a row of -inf keeps 0.
    if (s.sumexp < 1.0f && s.max != -kInf) s.sumexp = 1.0f;
    for (int k = 0; k < W; ++k) s.sumx += lane_x[k];
    s.sumx += tail_x;

    if (nv > 0 && lanes_max == s.max) {
      // The first maximum lies in the earliest block where a lane reached it: search that block.
      int64_t blk = INT64_MAX;
      for (int k = 0; k < W; ++k)
        if (lane_max[k] == s.max && lane_block[k] < blk) blk = lane_block[k];
      const int64_t b0 = blk * kBlock, b1 = b0 + kBlock < nv ? b0 + kBlock : nv;
      const int64_t j = find_value<T, kCap>(x, b0, b1, s.max, softcap);
      s.argmax = j >= 0 ? j : b0;
    } else {
      s.argmax = tail_idx;
    }
    if (std::isnan(s.sumexp) || std::isnan(s.sumx)) {
      // Rare: find the first NaN, which torch.argmax reports.
      for (int64_t j = 0; j < n; ++j) {
        if (std::isnan(to_float(x[j]))) {
          s.argmax = j;
          s.has_nan = true;
          break;
        }
      }
    }
    return s;
  }

  // grad_j = (a * q_j + b) * cap_j with q_j = exp(x_j - lse): every class but the target one.
  template <class T, bool kCap>
  static void grad_sweep(const T* x, int64_t n, float lse, float a, float b, float softcap, T* out, bool nt) {
    using F = typename Vec::F;
    constexpr int W = Vec::W;
    const F cap = Vec::set1(softcap), inv_cap = Vec::set1(kCap ? 1.0f / softcap : 0.0f);
    const F vlse = Vec::set1(lse), va = Vec::set1(a), vb = Vec::set1(b), one = Vec::set1(1.0f);
    nt = nt && W > 1 && reinterpret_cast<uintptr_t>(out) % (W * sizeof(T)) == 0;
    const int64_t nv = n / W * W;
    for (int64_t j = 0; j < nv; j += W) {
      const F v = load_capped<kCap>(x + j, cap, inv_cap);
      F g = Vec::fmadd(Vec::exp(Vec::sub(v, vlse)), va, vb);  // clamped: lse is the caller's
      if constexpr (kCap) {
        const F t = Vec::mul(v, inv_cap);
        g = Vec::mul(g, Vec::fnmadd(t, t, one));
      }
      Vec::store(out + j, g, nt);
    }
    if (nt) Vec::fence();
    float tail_v[W];
    tail_values<T, kCap>(x, nv, n, softcap, tail_v);
    for (int64_t j = nv; j < n; ++j) {
      const float v = tail_v[j - nv];
      float g = a * std::exp(v - lse) + b;
      if (kCap) g *= 1.0f - (v / softcap) * (v / softcap);
      from_float(g, out + j);
    }
  }

  // The fused sweep without a soft cap: q_j = e_j * exp(s - lse) from the values scan_row kept, so
  // no second exp per element; the tail (fewer than W elements) is computed from x.
  template <class T>
  static void grad_sweep_kept(const T* x, const float* keep_exp, const float* keep_max, int64_t n, float lse, float a,
                       float b, T* out, bool nt, const T* next_row) {
    using F = typename Vec::F;
    constexpr int W = Vec::W;
    const F vlse = Vec::set1(lse), va = Vec::set1(a), vb = Vec::set1(b);
    nt = nt && W > 1 && reinterpret_cast<uintptr_t>(out) % (W * sizeof(T)) == 0;
    const int64_t nv = n / W * W;
    for (int64_t b0 = 0, blk = 0; b0 < nv; b0 += kBlock, ++blk) {
      const int64_t b1 = b0 + kBlock < nv ? b0 + kBlock : nv;
      const F f = Vec::mul(va, Vec::exp(Vec::sub(Vec::load(keep_max + blk * W), vlse)));
      for (int64_t j = b0; j < b1; j += W) {
        // While this row's gradient streams out, pull the next row into L2 (its scan then overlaps
        // no memory stall): one 64-byte line per 64 bytes of logits.
        if (next_row && (j * sizeof(T)) % 64 == 0) Vec::prefetch_l2(next_row + j);
        Vec::store(out + j, Vec::fmadd(Vec::load(keep_exp + j), f, vb), nt);
      }
    }
    if (nt) Vec::fence();
    for (int64_t j = nv; j < n; ++j) from_float(a * std::exp(to_float(x[j]) - lse) + b, out + j);
  }

  // The gradient row for coef; the target element is formed in float32 before the sweep, which may
  // overwrite the logits (in-place backward).
  template <class T, bool kCap>
  static void grad_row(const T* x, const RowTarget& t, const RowOptions& o, int64_t n, float lse, float coef,
                T* out, bool nt, const float* keep_exp = nullptr, const float* keep_max = nullptr,
                const T* next_row = nullptr) {
    if (coef == 0.0f) {  // exact zeros, whatever the row holds (ignored rows, weight 0)
      std::memset(static_cast<void*>(out), 0, sizeof(T) * n);
      return;
    }
    if (t.valid && !t.in_range) {  // out-of-range target: its loss is NaN, so is its gradient
      for (int64_t j = 0; j < n; ++j) from_float(kNaN, out + j);
      return;
    }
    const GradCoefs c = grad_coefs(o, n, lse, coef);
    const float g_target =
        t.in_range ? target_grad(o, c, scanned_value<T, kCap>(x, n, t.index, o.softcap), lse, coef) : 0.0f;
    if (!kCap && keep_exp) grad_sweep_kept<T>(x, keep_exp, keep_max, n, lse, c.a, c.b, out, nt, next_row);
    else grad_sweep<T, kCap>(x, n, lse, c.a, c.b, o.softcap, out, nt);
    if (t.in_range) from_float(g_target, out + t.index);
  }

  template <class T, bool kCap>
  static void forward_row(const RowInput& in, const RowOptions& o, int64_t i, const RowStatsOut& out) {
    const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
    const Scan s = scan_row<T, kCap>(x, in.n_cols, o.softcap, nullptr, nullptr);
    const RowTarget t = row_target(in, o, i);
    const float x_target = t.in_range ? scanned_value<T, kCap>(x, in.n_cols, t.index, o.softcap) : 0.0f;
    write_stats(in, o, i, t, x_target, s.max, s.sumexp, s.sumx, s.argmax, s.has_nan, out);
  }

  template <class T, bool kCap>
  static void backward_row(const RowInput& in, const RowOptions& o, int64_t i, const float* lse, const float* coef,
                    const GradOut& g, bool nt) {
    const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
    T* out = static_cast<T*>(g.data) + i * g.row_stride;
    grad_row<T, kCap>(x, row_target(in, o, i), o, in.n_cols, lse[i], coef[i], out, nt);
  }

  template <class T, bool kCap>
  static void forward_backward_row(const RowInput& in, const RowOptions& o, int64_t i, const RowStatsOut& out,
                            float scale, const GradOut& g, bool nt, float* scratch) {
    const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
    // scratch: n_cols exp values, then the per-block maxima (scratch_floats below).
    float* keep_exp = kCap ? nullptr : scratch;
    float* keep_max = kCap ? nullptr : scratch + in.n_cols;
    const Scan s = scan_row<T, kCap>(x, in.n_cols, o.softcap, keep_exp, keep_max);
    const RowTarget t = row_target(in, o, i);
    const float x_target = t.in_range ? scanned_value<T, kCap>(x, in.n_cols, t.index, o.softcap) : 0.0f;
    write_stats(in, o, i, t, x_target, s.max, s.sumexp, s.sumx, s.argmax, s.has_nan, out);
    T* dst = static_cast<T*>(g.data) + i * g.row_stride;
    const T* next_row = i + 1 < in.n_rows ? x + in.row_stride : nullptr;
    grad_row<T, kCap>(x, t, o, in.n_cols, out.lse[i], out.weight[i] * scale, dst, nt, keep_exp, keep_max, next_row);
  }

  static int64_t scratch_floats(int64_t n_cols) { return n_cols + (n_cols / kBlock + 1) * Vec::W; }

  template <class T, bool kCap>
  static RowFns fns_for() {
    return RowFns{&forward_row<T, kCap>, &backward_row<T, kCap>, &forward_backward_row<T, kCap>, &scratch_floats};
  }

  static RowFns fns(int dtype, bool cap) {
    if (dtype == kBFloat16) return cap ? fns_for<uint16_t, true>() : fns_for<uint16_t, false>();
    if (dtype == kFloat16) return cap ? fns_for<f16, true>() : fns_for<f16, false>();
    return cap ? fns_for<float, true>() : fns_for<float, false>();
  }
};

}  // namespace
}  // namespace memft
