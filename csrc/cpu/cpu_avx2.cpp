// The row kernels with AVX2 + FMA: compiled with -mavx2 -mfma (CMakeLists.txt, x86 only), called by
// memft_cpu.cpp only after __builtin_cpu_supports said the host has both.
#if defined(__x86_64__) || defined(__i386__)
#include "vec_avx2.h"
#include "row_kernel.h"

namespace memft {
RowFns avx2_row_fns(int dtype, bool cap) { return RowKernel<Avx2Vec>::fns(dtype, cap); }
}  // namespace memft
#endif
