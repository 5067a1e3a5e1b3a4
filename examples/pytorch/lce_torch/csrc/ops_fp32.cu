// ops_fp32.cu: lce_torch's entry points for float inputs. One file per element type, so
// that the library's instantiations compile in parallel.
#include "ops.cuh"

LCE_TORCH_DEFINE_ENTRY_POINTS(fp32, float)
