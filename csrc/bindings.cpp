// The one pybind11 binding layer, compiled once per native module: `_native_cpu` (MEMFT_MODULE_CPU)
// and `_native_cuda` (MEMFT_MODULE_CUDA). Arguments are addresses (tensor.data_ptr()), sizes and
// strides; nothing links libtorch. The GIL is released while a kernel runs or is launched.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "memft_native.h"

namespace py = pybind11;
using namespace memft;

namespace {

template <class P>
P* address(uintptr_t a) {
  return reinterpret_cast<P*>(a);
}

RowInput make_input(uintptr_t logits, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                    uintptr_t target, bool target_int64, int64_t target_stride, uintptr_t token_weight,
                    int64_t token_weight_stride) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument("memft native: unknown dtype code " + std::to_string(dtype));
  if (n_rows < 0 || n_cols < 1)
    throw std::invalid_argument("memft native: need n_rows >= 0 and n_cols >= 1, got " +
                                std::to_string(n_rows) + " x " + std::to_string(n_cols));
  if (n_cols > INT32_MAX)  // argmax lanes hold int32 indices
    throw std::invalid_argument("memft native: n_cols " + std::to_string(n_cols) + " exceeds 2^31 - 1");
  RowInput in;
  in.logits = address<const void>(logits);
  in.dtype = dtype;
  in.n_rows = n_rows;
  in.n_cols = n_cols;
  in.row_stride = row_stride;
  in.target = address<const void>(target);
  in.target_int64 = target_int64;
  in.target_stride = target_stride;
  in.token_weight = address<const float>(token_weight);
  in.token_weight_stride = token_weight_stride;
  return in;
}

RowOptions make_options(int policy, float threshold, float sharpness, float ce_threshold, int64_t ignore_index,
                        float label_smoothing, float inv_vocab, float z_loss, float softcap) {
  if (policy != kPolicyNone && policy != kPolicyHard && policy != kPolicySigmoid)
    throw std::invalid_argument("memft native: unknown policy code " + std::to_string(policy));
  RowOptions o;
  o.policy = policy;
  o.threshold = threshold;
  o.sharpness = sharpness;
  o.ce_threshold = ce_threshold;
  o.ignore_index = ignore_index;
  o.label_smoothing = label_smoothing;
  o.inv_vocab = inv_vocab;
  o.z_loss = z_loss;
  o.softcap = softcap;
  return o;
}

RowStatsOut make_stats(uintptr_t lse, uintptr_t ce, uintptr_t prob, uintptr_t pred, uintptr_t weight,
                       uintptr_t loss) {
  return RowStatsOut{address<float>(lse), address<float>(ce), address<float>(prob),
                     address<int64_t>(pred), address<float>(weight), address<float>(loss)};
}

#if defined(MEMFT_MODULE_CPU)
using Exec = int;  // threads
#define MEMFT_EXEC_ARG "threads"
#define MEMFT_CALL(name) cpu_##name
#elif defined(MEMFT_MODULE_CUDA)
using Exec = uintptr_t;  // cudaStream_t
#define MEMFT_EXEC_ARG "stream"
#define MEMFT_CALL(name) cuda_##name
#else
#error "define MEMFT_MODULE_CPU or MEMFT_MODULE_CUDA"
#endif

}  // namespace

PYBIND11_MODULE(MEMFT_MODULE_NAME, m) {
  m.doc() = "MemFT row kernels (docs/SPEC.md); see memft_kernels/ops/native_cpu.py and native_cuda.py";

  py::class_<RowInput>(m, "RowInput", py::module_local());
  py::class_<RowOptions>(m, "RowOptions", py::module_local());
  py::class_<RowStatsOut>(m, "RowStatsOut", py::module_local());
  m.def("make_input", &make_input, py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("row_stride"), py::arg("target"), py::arg("target_int64"), py::arg("target_stride"),
        py::arg("token_weight"), py::arg("token_weight_stride"));
  m.def("make_options", &make_options, py::arg("policy"), py::arg("threshold"), py::arg("sharpness"),
        py::arg("ce_threshold"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("inv_vocab"),
        py::arg("z_loss"), py::arg("softcap"));
  m.def("make_stats", &make_stats, py::arg("lse"), py::arg("ce"), py::arg("prob"), py::arg("pred"),
        py::arg("weight"), py::arg("loss"));

  m.def(
      "row_forward",
      [](const RowInput& in, const RowOptions& o, const RowStatsOut& out, Exec exec) {
        py::gil_scoped_release release;
        MEMFT_CALL(row_forward)(in, o, out, exec);
      },
      py::arg("input"), py::arg("options"), py::arg("stats"), py::arg(MEMFT_EXEC_ARG));
  m.def(
      "row_backward",
      [](const RowInput& in, const RowOptions& o, uintptr_t lse, uintptr_t coef, uintptr_t grad,
         int64_t grad_row_stride, Exec exec) {
        py::gil_scoped_release release;
        MEMFT_CALL(row_backward)(in, o, address<const float>(lse), address<const float>(coef),
                                 GradOut{address<void>(grad), grad_row_stride}, exec);
      },
      py::arg("input"), py::arg("options"), py::arg("lse"), py::arg("coef"), py::arg("grad"),
      py::arg("grad_row_stride"), py::arg(MEMFT_EXEC_ARG));
  m.def(
      "row_forward_backward",
      [](const RowInput& in, const RowOptions& o, const RowStatsOut& out, uintptr_t scale, uintptr_t grad,
         int64_t grad_row_stride, Exec exec) {
        py::gil_scoped_release release;
        MEMFT_CALL(row_forward_backward)(in, o, out, address<const float>(scale),
                                         GradOut{address<void>(grad), grad_row_stride}, exec);
      },
      py::arg("input"), py::arg("options"), py::arg("stats"), py::arg("scale"), py::arg("grad"),
      py::arg("grad_row_stride"), py::arg(MEMFT_EXEC_ARG));
  m.def(
      "scale_rows",
      [](uintptr_t grad, int dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride, uintptr_t factor,
         Exec exec) {
        if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
          throw std::invalid_argument("memft native: unknown dtype code " + std::to_string(dtype));
        py::gil_scoped_release release;
        MEMFT_CALL(scale_rows)(address<void>(grad), dtype, n_rows, n_cols, row_stride, address<const float>(factor),
                               exec);
      },
      py::arg("grad"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("row_stride"),
      py::arg("factor"), py::arg(MEMFT_EXEC_ARG));
  m.attr("ABI") = py::int_(MEMFT_NATIVE_ABI);

#if defined(MEMFT_MODULE_CPU)
  m.def("isa", &cpu_isa, "the vector code path the CPU kernels take here: avx512f, avx2+fma or scalar");
#else
  m.attr("BUILT_ARCHITECTURES") = py::str(MEMFT_CUDA_ARCHS_STRING);
#if defined(MEMFT_CUDA_RUNTIME_STRING)  // set by CMakeLists.txt; not by the CPU emulation (tests/test_cuda_emulated.py)
  m.attr("CUDA_RUNTIME_VERSION") = py::str(MEMFT_CUDA_RUNTIME_STRING);  // linked statically
#endif
#endif
}
