// The row kernels with AVX-512F: compiled with -mavx512f -mavx2 -mfma (CMakeLists.txt, x86 only),
// called by memft_cpu.cpp only after __builtin_cpu_supports said the host has them.
#if defined(__x86_64__) || defined(__i386__)
#include "vec_avx512.h"
#include "row_kernel.h"

namespace memft {
RowFns avx512_row_fns(int dtype, bool cap) { return RowKernel<Avx512Vec>::fns(dtype, cap); }
}  // namespace memft
#endif
