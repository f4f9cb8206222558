// The per-row CPU kernels, written once over a vector type `Vec` (vec_scalar.h or vec_avx2.h).
// memft_cpu.cpp includes this file once per instruction set, each time in its own namespace, so
// every function here is compiled for exactly one instruction set.
//
// A row is read from memory once: scan_row walks it in L1-sized blocks (block max + argmax, then
// the block's exp-sum against the running max), and the gradient sweep that may follow in
// forward_backward_row reads the same row again from the L2 cache.

constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB stays in L1 between the two block passes

struct Scan {
  float max;
  float sumexp;  // sum of exp(x - max)
  float sumx;
  int64_t argmax;  // lowest index among ties; the first NaN if there is one (torch.argmax's rule)
  bool has_nan;
};

template <bool kCap, class T>
inline typename Vec::F load_capped(const T* p, typename Vec::F cap, typename Vec::F inv_cap) {
  typename Vec::F v = Vec::load(p);
  if constexpr (kCap) v = Vec::mul(cap, Vec::tanh(Vec::mul(v, inv_cap)));
  return v;
}

template <class T, bool kCap>
Scan scan_row(const T* x, int64_t n, float softcap) {
  using F = typename Vec::F;
  using I = typename Vec::I;
  constexpr int W = Vec::W;
  // Converted or capped values are kept for the second block pass; plain float32 is read again.
  constexpr bool kBuffered = kCap || !std::is_same<T, float>::value;
  const F cap = Vec::set1(softcap), inv_cap = Vec::set1(kCap ? 1.0f / softcap : 0.0f);
  const F neg_inf = Vec::set1(-kInf);
  alignas(64) float buf[kBuffered ? kBlock : 1];

  F run_max = neg_inf, run_sum = Vec::zero(), sum_x = Vec::zero();
  I run_idx = Vec::set1i(0);
  const int64_t nv = n / W * W;
  for (int64_t b0 = 0; b0 < nv; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < nv ? b0 + kBlock : nv;
    F bmax = neg_inf;
    I bidx = Vec::set1i(0);
    I idx = Vec::iota(static_cast<int32_t>(b0));
    const I step = Vec::set1i(W);
    for (int64_t j = b0; j < b1; j += W) {
      const F v = load_capped<kCap>(x + j, cap, inv_cap);
      if constexpr (kBuffered) Vec::store(buf + (j - b0), v, false);
      const typename Vec::M gt = Vec::gt(v, bmax);  // strict: the first of equal values stays
      bmax = Vec::blend(bmax, v, gt);
      bidx = Vec::blendi(bidx, idx, gt);
      sum_x = Vec::add(sum_x, v);
      idx = Vec::addi(idx, step);
    }
    run_idx = Vec::blendi(run_idx, bidx, Vec::gt(bmax, run_max));
    const F new_max = Vec::max(run_max, bmax);
    // A lane that has seen only -inf keeps max -inf: shift by 0 then, so exp gives 0, not NaN.
    const F shift = Vec::blend(new_max, Vec::zero(), Vec::eq(new_max, neg_inf));
    run_sum = Vec::mul(run_sum, Vec::exp(Vec::sub(run_max, shift)));
    run_max = new_max;
    for (int64_t j = b0; j < b1; j += W) {
      F v;
      if constexpr (kBuffered) v = Vec::load(buf + (j - b0));
      else v = Vec::load(x + j);
      run_sum = Vec::add(run_sum, Vec::exp(Vec::sub(v, shift)));
    }
  }

  // Lanes, then the tail (fewer than W elements) as one more lane, combined in a fixed order.
  float lane_max[W + 1], lane_sum[W + 1], lane_x[W];
  int32_t lane_idx[W + 1];
  Vec::to_array(run_max, lane_max);
  Vec::to_array(run_sum, lane_sum);
  Vec::to_array(sum_x, lane_x);
  Vec::to_array(run_idx, lane_idx);
  float tail_max = -kInf, tail_x = 0.0f;
  int32_t tail_idx = 0;
  for (int64_t j = nv; j < n; ++j) {
    const float v = kCap ? softcap * std::tanh(to_float(x[j]) / softcap) : to_float(x[j]);
    if (v > tail_max) {
      tail_max = v;
      tail_idx = static_cast<int32_t>(j);
    }
    tail_x += v;
  }
  float tail_sum = 0.0f;
  for (int64_t j = nv; j < n; ++j) {
    const float v = kCap ? softcap * std::tanh(to_float(x[j]) / softcap) : to_float(x[j]);
    tail_sum += std::exp(v - (tail_max == -kInf ? 0.0f : tail_max));
  }
  lane_max[W] = tail_max;
  lane_sum[W] = tail_sum;
  lane_idx[W] = tail_idx;

  Scan s{-kInf, 0.0f, 0.0f, 0, false};
  bool first = true;
  for (int k = 0; k <= W; ++k) {
    if (k == W && nv == n) break;  // no tail
    if (first || lane_max[k] > s.max || (lane_max[k] == s.max && lane_idx[k] < s.argmax)) {
      s.max = lane_max[k];
      s.argmax = lane_idx[k];
    }
    first = false;
  }
  const float shift = s.max == -kInf ? 0.0f : s.max;
  for (int k = 0; k <= W; ++k) {
    if (k == W && nv == n) break;
    s.sumexp += lane_sum[k] * std::exp(lane_max[k] - shift);
  }
  for (int k = 0; k < W; ++k) s.sumx += lane_x[k];
  s.sumx += tail_x;
  if (std::isnan(s.sumexp) || std::isnan(s.sumx)) {
    // Rare: find the first NaN, which torch.argmax reports (compares above never pick a NaN).
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
void grad_sweep(const T* x, int64_t n, float lse, float a, float b, float softcap, T* out, bool nt) {
  using F = typename Vec::F;
  constexpr int W = Vec::W;
  const F cap = Vec::set1(softcap), inv_cap = Vec::set1(kCap ? 1.0f / softcap : 0.0f);
  const F vlse = Vec::set1(lse), va = Vec::set1(a), vb = Vec::set1(b), one = Vec::set1(1.0f);
  nt = nt && W > 1 && reinterpret_cast<uintptr_t>(out) % (W * sizeof(T)) == 0;
  const int64_t nv = n / W * W;
  for (int64_t j = 0; j < nv; j += W) {
    const F v = load_capped<kCap>(x + j, cap, inv_cap);
    F g = Vec::fmadd(Vec::exp(Vec::sub(v, vlse)), va, vb);
    if constexpr (kCap) {
      const F t = Vec::mul(v, inv_cap);
      g = Vec::mul(g, Vec::fnmadd(t, t, one));
    }
    Vec::store(out + j, g, nt);
  }
  if (nt) Vec::fence();
  for (int64_t j = nv; j < n; ++j) {
    const float v = kCap ? softcap * std::tanh(to_float(x[j]) / softcap) : to_float(x[j]);
    float g = a * std::exp(v - lse) + b;
    if (kCap) g *= 1.0f - (v / softcap) * (v / softcap);
    from_float(g, out + j);
  }
}

// The gradient row for coef; the target element is formed in float32 before the sweep, which may
// overwrite the logits (in-place backward).
template <class T, bool kCap>
void grad_row(const T* x, const RowTarget& t, const RowOptions& o, int64_t n, float lse, float coef,
              T* out, bool nt) {
  if (coef == 0.0f) {  // exact zeros, whatever the row holds (ignored rows, weight 0)
    std::memset(static_cast<void*>(out), 0, sizeof(T) * n);
    return;
  }
  if (t.valid && !t.in_range) {  // out-of-range target: its loss is NaN, so is its gradient
    for (int64_t j = 0; j < n; ++j) from_float(kNaN, out + j);
    return;
  }
  const GradCoefs c = grad_coefs(o, n, lse, coef);
  const float g_target = t.in_range ? target_grad(o, c, capped(to_float(x[t.index]), o.softcap), lse, coef) : 0.0f;
  grad_sweep<T, kCap>(x, n, lse, c.a, c.b, o.softcap, out, nt);
  if (t.in_range) from_float(g_target, out + t.index);
}

template <class T, bool kCap>
void forward_row(const RowInput& in, const RowOptions& o, int64_t i, const RowStatsOut& out) {
  const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
  const Scan s = scan_row<T, kCap>(x, in.n_cols, o.softcap);
  write_stats(in, o, i, x, s.max, s.sumexp, s.sumx, s.argmax, s.has_nan, out);
}

template <class T, bool kCap>
void backward_row(const RowInput& in, const RowOptions& o, int64_t i, const float* lse, const float* coef,
                  const GradOut& g, bool nt) {
  const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
  T* out = static_cast<T*>(g.data) + i * g.row_stride;
  grad_row<T, kCap>(x, row_target(in, o, i), o, in.n_cols, lse[i], coef[i], out, nt);
}

template <class T, bool kCap>
void forward_backward_row(const RowInput& in, const RowOptions& o, int64_t i, const RowStatsOut& out,
                          float scale, const GradOut& g, bool nt) {
  const T* x = static_cast<const T*>(in.logits) + i * in.row_stride;
  const Scan s = scan_row<T, kCap>(x, in.n_cols, o.softcap);
  write_stats(in, o, i, x, s.max, s.sumexp, s.sumx, s.argmax, s.has_nan, out);
  T* dst = static_cast<T*>(g.data) + i * g.row_stride;
  grad_row<T, kCap>(x, row_target(in, o, i), o, in.n_cols, out.lse[i], out.weight[i] * scale, dst, nt);
}

template <class T, bool kCap>
RowFns fns_for() {
  return RowFns{&forward_row<T, kCap>, &backward_row<T, kCap>, &forward_backward_row<T, kCap>};
}

inline RowFns row_fns(int dtype, bool cap) {
  if (dtype == kBFloat16) return cap ? fns_for<uint16_t, true>() : fns_for<uint16_t, false>();
  return cap ? fns_for<float, true>() : fns_for<float, false>();
}
