// nccl_ops_bf16.cu: lce_torch's vocabulary-parallel entry points for __nv_bfloat16 inputs. One file
// per element type, so that the library's instantiations compile in parallel.
#include "nccl_ops.cuh"

LCE_TORCH_DEFINE_NCCL_ENTRY_POINTS(bf16, __nv_bfloat16)
