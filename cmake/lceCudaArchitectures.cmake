# Warns, once the top-level project is configured, about each target that links lce directly and
# compiles CUDA for an architecture below sm_80: lce's headers stop such a build with an #error,
# and the warning names the target and the fix at configure time. Targets are checked rather
# than CMAKE_CUDA_ARCHITECTURES, because the target property (initialised from that variable)
# is what the build uses; a project that sets CUDA_ARCHITECTURES on its targets gets no false
# alarm. Used by lce's own build (add_subdirectory, FetchContent) and by its package
# configuration (find_package).

# CUDA_ARCHITECTURES entries below sm_80 in `archs` (all, all-major: they include older ones;
# native is left to the compiler and the #error).
function(_lce_old_cuda_architectures archs out)
  set(old "")
  foreach(arch IN LISTS archs)
    if(arch MATCHES "^([0-9]+)")
      if(CMAKE_MATCH_1 LESS 80)
        list(APPEND old "${arch}")
      endif()
    elseif(arch STREQUAL "all" OR arch STREQUAL "all-major")
      list(APPEND old "${arch}")
    endif()
  endforeach()
  set(${out} "${old}" PARENT_SCOPE)
endfunction()

function(_lce_buildsystem_targets dir out)
  get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
  get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
  foreach(subdir IN LISTS subdirs)
    _lce_buildsystem_targets("${subdir}" more)
    list(APPEND targets ${more})
  endforeach()
  set(${out} "${targets}" PARENT_SCOPE)
endfunction()

function(_lce_check_cuda_architectures)
  _lce_buildsystem_targets("${CMAKE_SOURCE_DIR}" targets)
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(type STREQUAL "INTERFACE_LIBRARY" OR type STREQUAL "UTILITY")
      continue()
    endif()
    get_target_property(libs ${target} LINK_LIBRARIES)
    if(NOT libs)
      continue()
    endif()
    set(links_lce FALSE)
    foreach(lib IN LISTS libs)
      if(lib MATCHES "^(lce|lce::lce|lce::nccl)$")
        set(links_lce TRUE)
      endif()
    endforeach()
    get_target_property(sources ${target} SOURCES)
    if(NOT links_lce OR NOT sources MATCHES "\\.cu(;|$)")
      continue()
    endif()
    get_target_property(archs ${target} CUDA_ARCHITECTURES)
    _lce_old_cuda_architectures("${archs}" old)
    if(old)
      message(WARNING
        "lce: target ${target} compiles CUDA for '${archs}': '${old}' is below sm_80, which "
        "lce needs (cp.async, bf16 tensor cores), and its build will stop with an #error. "
        "Build for 80 or newer, e.g. set(CMAKE_CUDA_ARCHITECTURES \"80;90a\") before project(), "
        "or set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES \"80;90a\").")
    endif()
  endforeach()
endfunction()

get_property(_lce_check_scheduled GLOBAL PROPERTY LCE_CUDA_ARCHITECTURE_CHECK)
if(NOT _lce_check_scheduled)
  set_property(GLOBAL PROPERTY LCE_CUDA_ARCHITECTURE_CHECK TRUE)
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _lce_check_cuda_architectures)
endif()
unset(_lce_check_scheduled)
