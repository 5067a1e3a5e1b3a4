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
  MAX_JOBS               parallel compile jobs (the sources compile in parallel)
  LCE_TORCH_NCCL         0: build without the vocabulary-parallel operators even when NCCL is
                         found; 1: fail when NCCL is not found (default: use it when found)
  NCCL_HOME, NCCL_ROOT   where NCCL is (include/nccl.h, lib/libnccl.so*); else the nvidia.nccl
                         package PyTorch loads its NCCL from, then CUDA_HOME and /usr

With NCCL, the vocabulary-parallel operators (csrc/nccl_ops*, lce_torch.distributed) are built
too and LCE_TORCH_WITH_NCCL is defined; without it the package builds and imports as before and
lce_torch.distributed raises a clear error.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import NamedTuple, Optional

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
# The vocabulary-parallel operators over lce::nccl, compiled only when NCCL is found.
NCCL_SOURCES = ["nccl_ops.cpp", "nccl_ops_fp32.cu", "nccl_ops_fp16.cu", "nccl_ops_bf16.cu"]
NCCL_MACRO = "LCE_TORCH_WITH_NCCL"


class NcclLocation(NamedTuple):
    include_dir: pathlib.Path
    library_dir: pathlib.Path
    library: str  # for -l: "nccl", or ":libnccl.so.2" when only the versioned file exists


def _nccl_in(root: pathlib.Path, lib_dirs) -> Optional[NcclLocation]:
    if not (root / "include" / "nccl.h").is_file():
        return None
    for lib_dir in (root / d for d in lib_dirs):
        if (lib_dir / "libnccl.so").exists():
            return NcclLocation((root / "include").resolve(), lib_dir.resolve(), "nccl")
        if (lib_dir / "libnccl.so.2").exists():
            return NcclLocation((root / "include").resolve(), lib_dir.resolve(), ":libnccl.so.2")
    return None


def find_nccl() -> Optional[NcclLocation]:
    """NCCL's header and library: $NCCL_HOME / $NCCL_ROOT, the nvidia.nccl package (the NCCL
    PyTorch's wheels load, so the extension shares it), $CUDA_HOME, /usr. None when absent or
    LCE_TORCH_NCCL=0."""
    wanted = os.environ.get("LCE_TORCH_NCCL", "")
    if wanted == "0":
        return None
    lib_dirs = ("lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu")
    roots = [pathlib.Path(os.environ[k]) for k in ("NCCL_HOME", "NCCL_ROOT") if os.environ.get(k)]
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [pathlib.Path(p) for p in spec.submodule_search_locations]
    for k in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(k):
            roots.append(pathlib.Path(os.environ[k]))
    roots += [pathlib.Path("/usr/local/cuda"), pathlib.Path("/usr")]
    for root in roots:
        found = _nccl_in(root, lib_dirs)
        if found is not None:
            return found
    if wanted == "1":
        raise RuntimeError(
            "lce_torch: LCE_TORCH_NCCL=1 but NCCL was not found (looked in "
            + ", ".join(str(r) for r in roots)
            + "); set NCCL_HOME to the directory that holds include/nccl.h and lib/libnccl.so"
        )
    return None


def sources(nccl: Optional[NcclLocation]) -> list[str]:
    """The source files (in csrc/): the operators, and the vocabulary-parallel ones with NCCL."""
    return SOURCES + (NCCL_SOURCES if nccl is not None else [])


def nccl_defines(nccl: Optional[NcclLocation]) -> list[str]:
    return [f"-D{NCCL_MACRO}"] if nccl is not None else []


def nccl_ldflags(nccl: Optional[NcclLocation]) -> list[str]:
    if nccl is None:
        return []
    return [f"-L{nccl.library_dir}", f"-l{nccl.library}", f"-Wl,-rpath,{nccl.library_dir}"]


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

    nccl = find_nccl()
    return load(
        name=EXTENSION_NAME,
        sources=[str(CSRC / s) for s in sources(nccl)],
        extra_include_paths=[str(include_dir()), str(CSRC)]
        + ([str(nccl.include_dir)] if nccl is not None else []),
        extra_cflags=CXX_FLAGS + nccl_defines(nccl),
        extra_cuda_cflags=nvcc_flags() + nccl_defines(nccl),
        extra_ldflags=["-l" + lib for lib in LIBRARIES] + nccl_ldflags(nccl),
        with_cuda=True,
        build_directory=build_directory,
        verbose=verbose,
    )


if __name__ == "__main__":
    module = build(verbose=True)
    print(f"lce_torch: built {module.__file__} (lce {module.lce_version}, NCCL: "
          f"{find_nccl() or 'not found'})")
