# Defines lce::nccl (lce::lce plus NCCL: the vocabulary-parallel layer, include/lce/nccl/) when
# NCCL's header and library are found, and sets LCE_NCCL_FOUND. Used by lce's own build and by
# its package configuration (find_package(lce)), so that consumers get the same target.
# Search hints: NCCL_ROOT / NCCL_HOME (cache or environment) and the CUDA toolkit, which ships
# NCCL in some distributions (e.g. /usr/local/cuda/include/nccl.h).

if(NOT TARGET CUDA::cudart)
  find_package(CUDAToolkit QUIET)
endif()
set(lce_nccl_hints ${NCCL_ROOT} ${NCCL_HOME} $ENV{NCCL_ROOT} $ENV{NCCL_HOME})
find_path(LCE_NCCL_INCLUDE_DIR nccl.h
  HINTS ${lce_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include include/nccl nccl)
# Some installations ship only the versioned libnccl.so.2 (no development symlink).
find_library(LCE_NCCL_LIBRARY NAMES nccl libnccl.so.2
  HINTS ${lce_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
mark_as_advanced(LCE_NCCL_INCLUDE_DIR LCE_NCCL_LIBRARY)

if(LCE_NCCL_INCLUDE_DIR AND LCE_NCCL_LIBRARY)
  set(LCE_NCCL_FOUND TRUE)
  if(NOT TARGET lce::nccl)
    add_library(lce::nccl INTERFACE IMPORTED GLOBAL)
    set_target_properties(lce::nccl PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${LCE_NCCL_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES "lce::lce;${LCE_NCCL_LIBRARY}")
  endif()
else()
  set(LCE_NCCL_FOUND FALSE)
endif()
