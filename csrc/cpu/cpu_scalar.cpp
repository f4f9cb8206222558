// The row kernels in portable scalar code: any CPU, any compiler, no -m flags.
#include "vec_scalar.h"
#include "row_kernel.h"

namespace memft {
RowFns scalar_row_fns(int dtype, bool cap) { return RowKernel<ScalarVec>::fns(dtype, cap); }
}  // namespace memft
