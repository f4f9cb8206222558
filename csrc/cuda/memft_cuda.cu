// CUDA backend of the MemFT row kernels: one thread block per row. Each thread scans its share of
// the row (16-byte vector loads where the row allows) keeping an online max / exp-sum, the sum of
// the logits and the lowest-index argmax; warp shuffles and one shared-memory step combine them in
// a fixed order (deterministic). The fused kernel then sweeps the row again, from L2, to write the
// gradient. Offsets are int64; an out-of-range target is never used as an index.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../memft_native.h"
#include "../row_math.h"

namespace memft {
namespace {

constexpr int kWarp = 32;
constexpr int64_t kNoIndex = INT64_MAX;

template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// One thread's (then the block's) view of a row.
struct Scan {
  float max;
  float sumexp;  // sum of exp(x - max)
  float sumx;
  int64_t argmax;   // lowest index of the max; kNoIndex while only -inf was seen
  int64_t first_nan;  // torch.argmax reports the first NaN; kNoIndex if none
};

__device__ __forceinline__ Scan scan_identity() { return Scan{-kInf, 0.0f, 0.0f, kNoIndex, kNoIndex}; }

__device__ __forceinline__ void scan_push(Scan& s, float v, int64_t j) {
  if (v > s.max) {  // strict: the first of equal values stays; exp(-inf - v) = 0 on the first one
    s.sumexp = s.sumexp * expf(s.max - v) + 1.0f;
    s.max = v;
    s.argmax = j;
  } else {
    s.sumexp += expf(v - (s.max == -kInf ? 0.0f : s.max));
    if (is_nan(v) && j < s.first_nan) s.first_nan = j;
  }
  s.sumx += v;
}

__device__ __forceinline__ Scan scan_merge(const Scan& a, const Scan& b) {
  Scan r;
  r.max = fmaxf(a.max, b.max);
  const float shift = r.max == -kInf ? 0.0f : r.max;
  r.sumexp = a.sumexp * expf(a.max - shift) + b.sumexp * expf(b.max - shift);
  r.sumx = a.sumx + b.sumx;
  const bool take_b = b.max > a.max || (b.max == a.max && b.argmax < a.argmax);
  r.argmax = take_b ? b.argmax : a.argmax;
  r.first_nan = a.first_nan < b.first_nan ? a.first_nan : b.first_nan;
  return r;
}

__device__ __forceinline__ Scan shfl_down(const Scan& s, int offset) {
  Scan o;
  o.max = __shfl_down_sync(0xffffffffu, s.max, offset);
  o.sumexp = __shfl_down_sync(0xffffffffu, s.sumexp, offset);
  o.sumx = __shfl_down_sync(0xffffffffu, s.sumx, offset);
  o.argmax = __shfl_down_sync(0xffffffffu, static_cast<long long>(s.argmax), offset);
  o.first_nan = __shfl_down_sync(0xffffffffu, static_cast<long long>(s.first_nan), offset);
  return o;
}

// The block's combined scan, returned to every thread (blockDim.x a multiple of 32).
__device__ Scan block_scan(Scan s, Scan* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s = scan_merge(s, shfl_down(s, offset));
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? shared[lane] : scan_identity();
    for (int offset = kWarp / 2; offset > 0; offset /= 2) s = scan_merge(s, shfl_down(s, offset));
    if (lane == 0) shared[0] = s;
  }
  __syncthreads();
  return shared[0];
}

template <bool kCap>
__device__ __forceinline__ float cap_value(float v, float softcap) {
  return kCap ? softcap * tanhf(v / softcap) : v;
}

// Calls visit(value, j) for the row elements this thread owns, in increasing j: a scalar head up to
// the first 16-byte boundary, 16-byte packs, then a scalar tail.
template <class T, class Visit>
__device__ __forceinline__ void visit_row(const T* x, int64_t n, Visit visit) {
  constexpr int kPack = 16 / sizeof(T);
  const int t = threadIdx.x, threads = blockDim.x;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  const int64_t head = addr % sizeof(T) ? n : min(n, static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T)));
  for (int64_t j = t; j < head; j += threads) visit(to_float(x[j]), j);
  const int64_t packs = (n - head) / kPack;
  const uint4* px = reinterpret_cast<const uint4*>(x + head);
  for (int64_t p = t; p < packs; p += threads) {
    const uint4 raw = px[p];
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kPack; ++k) visit(to_float(v[k]), head + p * kPack + k);
  }
  for (int64_t j = head + packs * kPack + t; j < n; j += threads) visit(to_float(x[j]), j);
}

// out_j = fn(x_j) over the row, 16-byte packs when x and out are aligned alike; out may be x.
template <class T, class Fn>
__device__ __forceinline__ void map_row(const T* x, T* out, int64_t n, Fn fn) {
  constexpr int kPack = 16 / sizeof(T);
  const int t = threadIdx.x, threads = blockDim.x;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(x), ao = reinterpret_cast<uintptr_t>(out);
  const bool packed = ax % sizeof(T) == 0 && ax % 16 == ao % 16;
  const int64_t head = packed ? min(n, static_cast<int64_t>((16 - ax % 16) % 16 / sizeof(T))) : n;
  for (int64_t j = t; j < head; j += threads) out[j] = from_float<T>(fn(to_float(x[j])));
  const int64_t packs = (n - head) / kPack;
  const uint4* px = reinterpret_cast<const uint4*>(x + head);
  uint4* po = reinterpret_cast<uint4*>(out + head);
  for (int64_t p = t; p < packs; p += threads) {
    const uint4 raw = px[p];
    const T* v = reinterpret_cast<const T*>(&raw);
    uint4 res;
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int k = 0; k < kPack; ++k) r[k] = from_float<T>(fn(to_float(v[k])));
    po[p] = res;
  }
  for (int64_t j = head + packs * kPack + t; j < n; j += threads) out[j] = from_float<T>(fn(to_float(x[j])));
}

struct KernelArgs {
  RowInput in;
  RowOptions opt;
  RowStatsOut out;     // forward, forward_backward
  const float* lse;    // backward
  const float* coef;   // backward
  const float* scale;  // forward_backward: coef_i = scale * weight_i
  GradOut grad;        // backward, forward_backward
};

enum Mode { kForward = 0, kBackward = 1, kForwardBackward = 2 };

constexpr int kMaxThreads = 1024;

template <class T, bool kCap, int kMode>
__global__ void __launch_bounds__(kMaxThreads) row_kernel(const KernelArgs a) {
  __shared__ Scan shared[kWarp];
  __shared__ float s_lse, s_coef, s_target_grad;
  const int64_t i = blockIdx.x;
  const int64_t n = a.in.n_cols;
  const T* x = static_cast<const T*>(a.in.logits) + i * a.in.row_stride;
  const float softcap = a.opt.softcap;
  const RowTarget t = row_target(a.in, a.opt, i);

  if (kMode != kBackward) {
    Scan s = scan_identity();
    visit_row(x, n, [&](float v, int64_t j) { scan_push(s, cap_value<kCap>(v, softcap), j); });
    s = block_scan(s, shared);
    if (threadIdx.x == 0) {
      const bool has_nan = s.first_nan != kNoIndex;
      const int64_t pred = has_nan ? s.first_nan : (s.argmax == kNoIndex ? 0 : s.argmax);
      const float x_target = t.in_range ? cap_value<kCap>(to_float(x[t.index]), softcap) : 0.0f;
      const RowValues r = row_values(a.in, a.opt, i, t, s.max, s.sumexp, s.sumx, has_nan, x_target);
      write_row(a.out, i, pred, t.valid, r);
      if (kMode == kForwardBackward) {
        s_lse = t.valid ? r.lse : 0.0f;
        s_coef = (t.valid ? r.weight : 0.0f) * *a.scale;
      }
    }
  } else if (threadIdx.x == 0) {
    s_lse = a.lse[i];
    s_coef = a.coef[i];
  }
  if (kMode == kForward) return;

  if (threadIdx.x == 0 && t.in_range) {  // read before the sweep, which may overwrite x (in place)
    const GradCoefs c = grad_coefs(a.opt, n, s_lse, s_coef);
    s_target_grad = target_grad(a.opt, c, cap_value<kCap>(to_float(x[t.index]), softcap), s_lse, s_coef);
  }
  __syncthreads();
  const float lse = s_lse, coef = s_coef;
  T* out = static_cast<T*>(a.grad.data) + i * a.grad.row_stride;
  if (coef == 0.0f) {  // exact zeros, whatever the row holds
    map_row(x, out, n, [](float) { return 0.0f; });
    return;
  }
  if (t.valid && !t.in_range) {  // out-of-range target: NaN loss, NaN gradient row
    map_row(x, out, n, [](float) { return kNaN; });
    return;
  }
  const GradCoefs c = grad_coefs(a.opt, n, lse, coef);
  map_row(x, out, n, [&](float raw) {
    const float v = cap_value<kCap>(raw, softcap);
    float g = fmaf(c.a, expf(v - lse), c.b);
    if (kCap) g *= 1.0f - (v / softcap) * (v / softcap);
    return g;
  });
  __syncthreads();
  if (threadIdx.x == 0 && t.in_range) out[t.index] = from_float<T>(s_target_grad);
}

// grad *= *factor, a block per row; the factor is read on the device and 1 writes nothing.
template <class T>
__global__ void scale_rows_kernel(T* grad, int64_t n_cols, int64_t row_stride, const float* factor) {
  const float f = *factor;
  if (f == 1.0f) return;
  T* row = grad + static_cast<int64_t>(blockIdx.x) * row_stride;
  for (int64_t j = threadIdx.x; j < n_cols; j += blockDim.x) row[j] = from_float<T>(to_float<T>(row[j]) * f);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("memft CUDA: ") + what + ": " + cudaGetErrorString(err));
}

int threads_for(int64_t n_cols) {  // a multiple of 32, at most kMaxThreads
  if (n_cols >= 16384) return kMaxThreads;
  if (n_cols >= 2048) return 512;
  if (n_cols >= 256) return 256;
  return 128;
}

template <int kMode>
void launch(const KernelArgs& a, uintptr_t stream_handle) {
  if (a.in.n_rows == 0) return;
  if (a.in.n_rows > INT32_MAX) throw std::invalid_argument("memft CUDA: more than 2^31 - 1 rows");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>(a.in.n_rows)), block(threads_for(a.in.n_cols));
  const bool cap = a.opt.softcap > 0.0f;
  switch (a.in.dtype) {
    case kFloat32:
      if (cap) row_kernel<float, true, kMode><<<grid, block, 0, stream>>>(a);
      else row_kernel<float, false, kMode><<<grid, block, 0, stream>>>(a);
      break;
    case kBFloat16:
      if (cap) row_kernel<__nv_bfloat16, true, kMode><<<grid, block, 0, stream>>>(a);
      else row_kernel<__nv_bfloat16, false, kMode><<<grid, block, 0, stream>>>(a);
      break;
    case kFloat16:
      if (cap) row_kernel<__half, true, kMode><<<grid, block, 0, stream>>>(a);
      else row_kernel<__half, false, kMode><<<grid, block, 0, stream>>>(a);
      break;
    default:
      throw std::invalid_argument("memft CUDA: unknown dtype code " + std::to_string(a.in.dtype));
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace

void cuda_row_forward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out, uintptr_t stream) {
  KernelArgs a{in, opt, out, nullptr, nullptr, nullptr, GradOut{}};
  launch<kForward>(a, stream);
}

void cuda_row_backward(const RowInput& in, const RowOptions& opt, const float* lse, const float* coef,
                       const GradOut& grad, uintptr_t stream) {
  KernelArgs a{in, opt, RowStatsOut{}, lse, coef, nullptr, grad};
  launch<kBackward>(a, stream);
}

void cuda_row_forward_backward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out,
                               const float* scale, const GradOut& grad, uintptr_t stream) {
  KernelArgs a{in, opt, out, nullptr, nullptr, scale, grad};
  launch<kForwardBackward>(a, stream);
}

void cuda_scale_rows(void* grad, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride, const float* factor,
                     uintptr_t stream_handle) {
  if (n_rows == 0) return;
  if (n_rows > INT32_MAX) throw std::invalid_argument("memft CUDA: more than 2^31 - 1 rows");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>(n_rows)), block(256);
  switch (dtype) {
    case kFloat32:
      scale_rows_kernel<float><<<grid, block, 0, stream>>>(static_cast<float*>(grad), n_cols, row_stride, factor);
      break;
    case kBFloat16:
      scale_rows_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<__nv_bfloat16*>(grad), n_cols,
                                                                    row_stride, factor);
      break;
    case kFloat16:
      scale_rows_kernel<__half><<<grid, block, 0, stream>>>(static_cast<__half*>(grad), n_cols, row_stride, factor);
      break;
    default:
      throw std::invalid_argument("memft CUDA: unknown dtype code " + std::to_string(dtype));
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace memft
