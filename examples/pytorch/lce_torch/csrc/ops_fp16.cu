// ops_fp16.cu: lce_torch's entry points for __half inputs. One file per element type, so
// that the library's instantiations compile in parallel.
#include "ops.cuh"

LCE_TORCH_DEFINE_ENTRY_POINTS(fp16, __half)
