# lce_add_header_check()
#
# Adds the OBJECT library lce_header_check: one translation unit per public header, each
# including its header twice, so that every header compiles on its own and has an include
# guard. Headers under include/lce/nccl/ need NCCL, which is optional: they go to a second
# library, lce_nccl_header_check (linking lce::nccl), when NCCL was found.
function(lce_add_header_check)
  set(include_dir "${PROJECT_SOURCE_DIR}/include")
  file(GLOB_RECURSE headers CONFIGURE_DEPENDS RELATIVE "${include_dir}"
    "${include_dir}/lce/*.hpp"
    "${include_dir}/lce/*.cuh")
  set(nccl_headers ${headers})
  list(FILTER headers EXCLUDE REGEX "^lce/nccl/")
  list(FILTER nccl_headers INCLUDE REGEX "^lce/nccl/")
  if(TARGET lce::nccl AND nccl_headers)
    set(nccl_sources "")
    foreach(header IN LISTS nccl_headers)
      set(source "${CMAKE_CURRENT_BINARY_DIR}/header_check/${header}.cu")
      file(CONFIGURE OUTPUT "${source}" CONTENT "#include <${header}>\n#include <${header}>\n")
      list(APPEND nccl_sources "${source}")
    endforeach()
    add_library(lce_nccl_header_check OBJECT ${nccl_sources})
    target_link_libraries(lce_nccl_header_check PRIVATE lce::nccl lce_warnings)
  endif()

  set(sources "")
  foreach(header IN LISTS headers)
    set(source "${CMAKE_CURRENT_BINARY_DIR}/header_check/${header}.cu")
    file(CONFIGURE OUTPUT "${source}" CONTENT "#include <${header}>\n#include <${header}>\n")
    list(APPEND sources "${source}")
  endforeach()

  add_library(lce_header_check OBJECT ${sources})
  target_link_libraries(lce_header_check PRIVATE lce::lce lce_warnings)
endfunction()
