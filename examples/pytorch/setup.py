"""Builds lce_torch, the PyTorch extension over lce (docs/pytorch.md).

    pip install --no-build-isolation ./examples/pytorch         # install into the environment
    cd examples/pytorch && python setup.py build_ext --inplace  # or build in place, for tests

--no-build-isolation: the build needs the PyTorch that will run it (and an isolated build
would try to download one). The flags are those of lce_torch/load.py, the JIT path; NCCL is
found as load.py finds it (NCCL_HOME, the nvidia.nccl package, CUDA_HOME; LCE_TORCH_NCCL=0
leaves the vocabulary-parallel operators out).
"""

import importlib.util
import pathlib

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = pathlib.Path(__file__).resolve().parent

# lce_torch/load.py holds the flags; load it by path (importing the package would load the
# extension this file is about to build).
_spec = importlib.util.spec_from_file_location("lce_torch_build", HERE / "lce_torch" / "load.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)
nccl = build_config.find_nccl()
print(f"lce_torch: NCCL {'at ' + str(nccl.include_dir) if nccl else 'not used'}: the "
      f"vocabulary-parallel operators are {'built' if nccl else 'left out'}")

setup(
    name="lce_torch",
    version="0.1.0",
    description="PyTorch binding of lce, the fused linear cross-entropy CUDA library",
    packages=["lce_torch"],
    package_data={"lce_torch": ["csrc/*"]},
    python_requires=">=3.9",
    ext_modules=[
        CUDAExtension(
            name="lce_torch._C",
            sources=[f"lce_torch/csrc/{s}" for s in build_config.sources(nccl)],
            include_dirs=[str(build_config.include_dir()), str(build_config.CSRC)]
            + ([str(nccl.include_dir)] if nccl else []),
            libraries=build_config.LIBRARIES,
            extra_compile_args={
                "cxx": build_config.CXX_FLAGS + build_config.nccl_defines(nccl),
                "nvcc": build_config.nvcc_flags() + build_config.nccl_defines(nccl),
            },
            extra_link_args=build_config.nccl_ldflags(nccl),
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
