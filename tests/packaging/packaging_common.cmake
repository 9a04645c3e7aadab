# SPDX-License-Identifier: BSL-1.0
# Helpers for the packaging tests (run with cmake -P). The caller passes:
#   WEFT_SOURCE_DIR, WEFT_BUILD_DIR, WEFT_VERSION, WORK_DIR,
#   CONSUMER_GENERATOR, CONSUMER_MAKE_PROGRAM, CONSUMER_CXX_COMPILER,
#   CONSUMER_CXX_FLAGS, CONSUMER_EXE_LINKER_FLAGS, CONSUMER_BUILD_TYPE
foreach(var IN ITEMS WEFT_SOURCE_DIR WEFT_BUILD_DIR WEFT_VERSION WORK_DIR CONSUMER_GENERATOR
                     CONSUMER_CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "packaging test: -D${var}=... is required")
  endif()
endforeach()

# Runs a command, echoes it, and stops the test with its output if it fails.
function(weft_run what)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "OUTPUT_VARIABLE" "COMMAND")
  string(JOIN " " shown ${arg_COMMAND})
  message(STATUS "[${what}] ${shown}")
  execute_process(COMMAND ${arg_COMMAND}
                  RESULT_VARIABLE result
                  OUTPUT_VARIABLE output
                  ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "[${what}] failed (${result}):\n${output}")
  endif()
  if(arg_OUTPUT_VARIABLE)
    set(${arg_OUTPUT_VARIABLE} "${output}" PARENT_SCOPE)
  endif()
endfunction()

# Configures, builds and runs the consumer project in `source` (its
# executable is `app`) with the compiler and flags of weft's own build.
# Extra -D arguments follow the build directory.
function(weft_build_and_run_consumer what source build)
  set(configure ${CMAKE_COMMAND} -S "${source}" -B "${build}" -G "${CONSUMER_GENERATOR}"
      "-DCMAKE_CXX_COMPILER=${CONSUMER_CXX_COMPILER}"
      "-DCMAKE_CXX_FLAGS=${CONSUMER_CXX_FLAGS}"
      "-DCMAKE_EXE_LINKER_FLAGS=${CONSUMER_EXE_LINKER_FLAGS}"
      "-DCMAKE_BUILD_TYPE=${CONSUMER_BUILD_TYPE}"
      -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
      ${ARGN})
  if(CONSUMER_MAKE_PROGRAM)
    list(APPEND configure "-DCMAKE_MAKE_PROGRAM=${CONSUMER_MAKE_PROGRAM}")
  endif()
  weft_run("${what}: configure" COMMAND ${configure})
  weft_run("${what}: build" COMMAND ${CMAKE_COMMAND} --build "${build}")
  weft_run("${what}: run" COMMAND "${build}/app" OUTPUT_VARIABLE output)
  message(STATUS "[${what}: run] ${output}")
  if(NOT output MATCHES "weft ${WEFT_VERSION}")
    message(FATAL_ERROR "[${what}] expected the program to print 'weft ${WEFT_VERSION}', got:\n${output}")
  endif()
endfunction()
