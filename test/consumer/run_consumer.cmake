# Configures, builds and runs a consumer project of lce, from a clean build directory.
#
# cmake -DSOURCE_DIR=... -DBINARY_DIR=... -DGENERATOR=... -DCUDA_COMPILER=...
#       [-DLCE_BUILD_DIR=... -DLCE_INSTALL_PREFIX=...] [-DCUDA_ARCHITECTURES=...]
#       [-DEXPECT_BUILD_ERROR=<regex>] [-DEXPECT_WARNING=<regex>] [-DFORBID_OUTPUT=<regex>]
#       [-DCHECK_NOTHING_INSTALLED=ON] -P run_consumer.cmake
#
# LCE_BUILD_DIR: first installs that lce build into LCE_INSTALL_PREFIX and points the
#   consumer's CMAKE_PREFIX_PATH there.
# CUDA_ARCHITECTURES: the consumer's CMAKE_CUDA_ARCHITECTURES; unset, the compiler's default.
# EXPECT_BUILD_ERROR: the build must fail, and its output match the regex (the program is not
#   run). Otherwise the build must succeed and the program run successfully.
# EXPECT_WARNING, FORBID_OUTPUT: the configure output must (must not) match the regex.
# CHECK_NOTHING_INSTALLED: installing the consumer must install no file of lce's.
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
if(DEFINED CUDA_ARCHITECTURES)
  list(APPEND configure_args "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
endif()

file(REMOVE_RECURSE "${BINARY_DIR}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
    "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}" ${configure_args}
  OUTPUT_VARIABLE configure_output ERROR_VARIABLE configure_output
  RESULT_VARIABLE configure_result)
message("${configure_output}")
if(NOT configure_result EQUAL 0)
  message(FATAL_ERROR "consumer: configuring failed")
endif()
if(DEFINED EXPECT_WARNING AND NOT configure_output MATCHES "${EXPECT_WARNING}")
  message(FATAL_ERROR "consumer: the configure output lacks the expected '${EXPECT_WARNING}'")
endif()
if(DEFINED FORBID_OUTPUT AND configure_output MATCHES "${FORBID_OUTPUT}")
  message(FATAL_ERROR "consumer: the configure output has '${CMAKE_MATCH_0}', which it must not")
endif()

if(DEFINED EXPECT_BUILD_ERROR)
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}"
    OUTPUT_VARIABLE build_output ERROR_VARIABLE build_output RESULT_VARIABLE build_result)
  message("${build_output}")
  if(build_result EQUAL 0)
    message(FATAL_ERROR "consumer: the build succeeded; it must fail (architecture below sm_80)")
  endif()
  if(NOT build_output MATCHES "${EXPECT_BUILD_ERROR}")
    message(FATAL_ERROR "consumer: the build failed without the message '${EXPECT_BUILD_ERROR}'")
  endif()
  message(STATUS "consumer: the build failed as expected, with '${CMAKE_MATCH_0}'")
  return()
endif()

run("${CMAKE_COMMAND}" --build "${BINARY_DIR}")
run("${BINARY_DIR}/app")

if(CHECK_NOTHING_INSTALLED)
  set(prefix "${BINARY_DIR}/install-check")
  run("${CMAKE_COMMAND}" --install "${BINARY_DIR}" --prefix "${prefix}")
  file(GLOB_RECURSE installed RELATIVE "${prefix}" "${prefix}/*")
  if(installed)
    message(FATAL_ERROR "consumer: installing the consumer installed lce's files: ${installed}")
  endif()
endif()
