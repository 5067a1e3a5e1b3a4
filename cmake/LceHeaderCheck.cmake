# lce_add_header_check()
#
# Adds the OBJECT library lce_header_check: one translation unit per public header, each
# including its header twice, so that every header compiles on its own and has an include
# guard. Headers under include/lce/nccl/ are skipped: they need NCCL, which is optional.
function(lce_add_header_check)
  set(include_dir "${PROJECT_SOURCE_DIR}/include")
  file(GLOB_RECURSE headers CONFIGURE_DEPENDS RELATIVE "${include_dir}"
    "${include_dir}/lce/*.hpp"
    "${include_dir}/lce/*.cuh")
  list(FILTER headers EXCLUDE REGEX "^lce/nccl/")

  set(sources "")
  foreach(header IN LISTS headers)
    set(source "${CMAKE_CURRENT_BINARY_DIR}/header_check/${header}.cu")
    file(CONFIGURE OUTPUT "${source}" CONTENT "#include <${header}>\n#include <${header}>\n")
    list(APPEND sources "${source}")
  endforeach()

  add_library(lce_header_check OBJECT ${sources})
  target_link_libraries(lce_header_check PRIVATE lce::lce lce_warnings)
endfunction()
