# SPDX-License-Identifier: BSL-1.0
# Packaging test: builds and runs tests/packaging/subdir_consumer, which
# does add_subdirectory(<weft source dir>) and links weft::weft.
cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/packaging_common.cmake")

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

weft_build_and_run_consumer(subdir_consumer "${CMAKE_CURRENT_LIST_DIR}/subdir_consumer"
                            "${WORK_DIR}/build" "-DWEFT_SOURCE_DIR=${WEFT_SOURCE_DIR}")

message(STATUS "add_subdirectory_consumer: OK")
