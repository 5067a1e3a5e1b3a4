// nccl_ops_fp32.cu: lce_torch's vocabulary-parallel entry points for float inputs. One file per
// element type, so that the library's instantiations compile in parallel.
#include "nccl_ops.cuh"

LCE_TORCH_DEFINE_NCCL_ENTRY_POINTS(fp32, float)
