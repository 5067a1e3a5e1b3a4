# Configures, builds and runs a consumer project of lce, from a clean build directory.
# With LCE_BUILD_DIR set, first installs that lce build into LCE_INSTALL_PREFIX and points the
# consumer's CMAKE_PREFIX_PATH there.
#
# cmake -DSOURCE_DIR=... -DBINARY_DIR=... -DGENERATOR=... -DCUDA_COMPILER=...
#       [-DLCE_BUILD_DIR=... -DLCE_INSTALL_PREFIX=...] -P run_consumer.cmake
cmake_minimum_required(VERSION 3.24)

function(run)
  execute_process(COMMAND ${ARGN} COMMAND_ERROR_IS_FATAL ANY)
endfunction()

set(configure_args "")
if(DEFINED LCE_BUILD_DIR)
  file(REMOVE_RECURSE "${LCE_INSTALL_PREFIX}")
  run("${CMAKE_COMMAND}" --install "${LCE_BUILD_DIR}" --prefix "${LCE_INSTALL_PREFIX}")
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${LCE_INSTALL_PREFIX}")
endif()

file(REMOVE_RECURSE "${BINARY_DIR}")
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
  "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}"
  -DCMAKE_CUDA_ARCHITECTURES=80
  ${configure_args})
run("${CMAKE_COMMAND}" --build "${BINARY_DIR}")
run("${BINARY_DIR}/app")
