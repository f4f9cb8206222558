// The native MemFT row kernels (docs/SPEC.md): argument structs shared by the CPU and CUDA code and
// the one pybind11 binding layer (bindings.cpp). Nothing here depends on libtorch: the callers pass
// raw addresses, sizes and strides, so one compiled module serves every torch version.
#pragma once

// Bumped whenever an entry point, an argument struct or a result changes (3: a +inf logit makes its
// row NaN); memft_kernels/ops/native.py refuses a module built from another version (a stale build)
// with a message saying to rebuild.
#define MEMFT_NATIVE_ABI 3

#include <cstdint>

namespace memft {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Policy : int { kPolicyNone = 0, kPolicyHard = 1, kPolicySigmoid = 2 };

// The per-row options of spec.KernelOptions, in float32 as the reference computes them.
struct RowOptions {
  int policy = kPolicyHard;
  float threshold = 0.5f;
  float sharpness = 10.0f;
  float ce_threshold = 0.6931472f;  // ln(1/threshold), computed in double by the caller
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  float inv_vocab = 0.0f;  // 1 / V of the eps / V gradient term (V the global vocabulary); 0: 1 / n_cols
  float z_loss = 0.0f;
  float softcap = 0.0f;  // 0: no soft cap
};

// logits [n_rows, n_cols] with unit column stride, target [n_rows] (int32 or int64),
// token_weight [n_rows] float32 or null.
struct RowInput {
  const void* logits = nullptr;
  int dtype = kFloat32;
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t row_stride = 0;  // in elements
  const void* target = nullptr;
  bool target_int64 = true;
  int64_t target_stride = 1;
  const float* token_weight = nullptr;
  int64_t token_weight_stride = 1;
};

// Per-row outputs, each a contiguous float32 (pred: int64) array of n_rows.
struct RowStatsOut {
  float* lse = nullptr;
  float* ce = nullptr;
  float* prob = nullptr;
  int64_t* pred = nullptr;
  float* weight = nullptr;
  float* loss = nullptr;
};

// The gradient [n_rows, n_cols], the logits' dtype, unit column stride; may be the logits themselves.
struct GradOut {
  void* data = nullptr;
  int64_t row_stride = 0;
};

// CPU (OpenMP over rows; each row reduced by one thread in a fixed order).
void cpu_row_forward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out, int threads);
void cpu_row_backward(const RowInput& in, const RowOptions& opt, const float* lse, const float* coef,
                      const GradOut& grad, int threads);
void cpu_row_forward_backward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out,
                              const float* scale, const GradOut& grad, int threads);
// grad[n_rows, n_cols] (dtype code, row stride in elements) *= *factor; factor read where the
// kernel runs, and a factor of exactly 1 writes nothing.
void cpu_scale_rows(void* grad, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride, const float* factor,
                    int threads);
const char* cpu_isa();  // the vector code path this host runs: "avx512f", "avx2+fma" or "scalar"

// CUDA (a block per row; every pointer is device memory; `stream` is a cudaStream_t as an integer).
// Errors throw std::runtime_error (RuntimeError in Python).
void cuda_row_forward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out, uintptr_t stream);
void cuda_row_backward(const RowInput& in, const RowOptions& opt, const float* lse, const float* coef,
                       const GradOut& grad, uintptr_t stream);
void cuda_row_forward_backward(const RowInput& in, const RowOptions& opt, const RowStatsOut& out,
                               const float* scale, const GradOut& grad, uintptr_t stream);
void cuda_scale_rows(void* grad, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride, const float* factor,
                     uintptr_t stream);

}  // namespace memft
