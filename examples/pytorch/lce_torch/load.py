"""Just-in-time build of lce_torch's extension (torch.utils.cpp_extension.load).

``import lce_torch`` uses the extension installed by ``pip install ./examples/pytorch`` (or
built in place by ``python setup.py build_ext --inplace``) and falls back to this JIT build
when there is none, so the package also works straight from a checkout::

    import sys; sys.path.insert(0, "examples/pytorch")
    import lce_torch            # the first import compiles (a few minutes), later ones reuse it

or, to compile ahead of time and watch the compiler::

    python examples/pytorch/lce_torch/load.py

The compiler flags live here; setup.py reads them from this file too.

Environment:
  LCE_INCLUDE_DIR        lce's include directory (default: the checkout's include/)
  TORCH_CUDA_ARCH_LIST   the architectures to build for, in PyTorch's syntax (default here:
                         sm_80 and sm_90a)
  TORCH_EXTENSIONS_DIR   where torch keeps JIT builds (default: ~/.cache/torch_extensions)
  MAX_JOBS               parallel compile jobs (the four sources compile in parallel)
"""

from __future__ import annotations

import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCES = ["lce_torch.cpp", "ops_fp32.cu", "ops_fp16.cu", "ops_bf16.cu"]
EXTENSION_NAME = "lce_torch_C"

CXX_FLAGS = ["-O3", "-std=c++17"]
# PyTorch defines __CUDA_NO_HALF_CONVERSIONS__ and friends for extensions; lce converts between
# float and __half / __nv_bfloat16 with the ordinary operators, so undefine them.
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
]
LIBRARIES = ["cublas"]


def include_dir() -> pathlib.Path:
    """lce's include directory: $LCE_INCLUDE_DIR, else the checkout's include/."""
    configured = os.environ.get("LCE_INCLUDE_DIR")
    candidates = [pathlib.Path(configured)] if configured else []
    candidates.append(HERE.parents[2] / "include")  # examples/pytorch/lce_torch -> the root
    for candidate in candidates:
        if (candidate / "lce" / "lce.cuh").is_file():
            return candidate.resolve()
    raise RuntimeError(
        "lce_torch: lce's headers were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); set LCE_INCLUDE_DIR to the directory that holds lce/lce.cuh"
    )


def arch_flags() -> list[str]:
    """sm_80 and sm_90a unless TORCH_CUDA_ARCH_LIST says otherwise (then PyTorch adds its own).

    lce needs sm_80 or newer (cp.async, bf16 tensor cores); sm_90a is the H100/H200 build.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
    ]


def nvcc_flags() -> list[str]:
    return NVCC_FLAGS + arch_flags()


def build(verbose: bool = False, build_directory: str | None = None):
    """Compiles (or reuses) the extension and returns its Python module."""
    from torch.utils.cpp_extension import load

    return load(
        name=EXTENSION_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(include_dir()), str(CSRC)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=nvcc_flags(),
        extra_ldflags=["-l" + lib for lib in LIBRARIES],
        with_cuda=True,
        build_directory=build_directory,
        verbose=verbose,
    )


if __name__ == "__main__":
    module = build(verbose=True)
    print(f"lce_torch: built {module.__file__} (lce {module.lce_version})")
