// The row kernels with AVX2 + FMA (+ F16C): compiled with -mavx2 -mfma -mf16c (CMakeLists.txt, x86 only), called by
// memft_cpu.cpp only after __builtin_cpu_supports said the host has all three.
#if defined(__x86_64__) || defined(__i386__)
#include "vec_avx2.h"
#include "row_kernel.h"

namespace memft {
RowFns avx2_row_fns(int dtype, bool cap) { return RowKernel<Avx2Vec>::fns(dtype, cap); }
}  // namespace memft
#endif
