// nccl_ops_fp16.cu: lce_torch's vocabulary-parallel entry points for __half inputs. One file per
// element type, so that the library's instantiations compile in parallel.
#include "nccl_ops.cuh"

LCE_TORCH_DEFINE_NCCL_ENTRY_POINTS(fp16, __half)
