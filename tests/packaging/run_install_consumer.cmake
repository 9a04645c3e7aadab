# SPDX-License-Identifier: BSL-1.0
# Packaging test: installs this build of weft into a fresh prefix, then
# builds and runs tests/packaging/consumer (find_package(weft 0.1 REQUIRED)).
# Also checks the installed files, the asio component and, where pkg-config
# is available, weft.pc.
cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/packaging_common.cmake")

set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

weft_run(install COMMAND ${CMAKE_COMMAND} --install "${WEFT_BUILD_DIR}" --prefix "${prefix}")

foreach(file IN ITEMS include/weft/version.hpp
                      lib/cmake/weft/weftConfig.cmake
                      lib/cmake/weft/weftConfigVersion.cmake
                      lib/cmake/weft/weftTargets.cmake
                      lib/pkgconfig/weft.pc)
  if(NOT EXISTS "${prefix}/${file}")
    message(FATAL_ERROR "install: ${file} is missing from ${prefix}")
  endif()
endforeach()
# Every header of the source tree is installed.
file(GLOB_RECURSE headers RELATIVE "${WEFT_SOURCE_DIR}/include" "${WEFT_SOURCE_DIR}/include/*.hpp")
foreach(header IN LISTS headers)
  if(NOT EXISTS "${prefix}/include/${header}")
    message(FATAL_ERROR "install: ${header} is missing from ${prefix}/include")
  endif()
endforeach()

# find_package(weft 0.1) from the prefix, and nothing else.
weft_build_and_run_consumer(consumer "${CMAKE_CURRENT_LIST_DIR}/consumer" "${WORK_DIR}/consumer"
                            "-DCMAKE_PREFIX_PATH=${prefix}")
file(STRINGS "${WORK_DIR}/consumer/CMakeCache.txt" weft_dir REGEX "^weft_DIR:")
string(REGEX REPLACE "^[^=]*=" "" weft_dir "${weft_dir}")
if(NOT weft_dir STREQUAL "${prefix}/lib/cmake/weft")
  message(FATAL_ERROR "consumer found a weft outside the test prefix: ${weft_dir}")
endif()

# The version file: another major version is rejected.
file(MAKE_DIRECTORY "${WORK_DIR}/wrong_major")
file(WRITE "${WORK_DIR}/wrong_major/CMakeLists.txt" [=[
cmake_minimum_required(VERSION 3.25)
project(wrong_major LANGUAGES NONE)
find_package(weft 1 QUIET)
if(weft_FOUND)
  message(FATAL_ERROR "find_package(weft 1) accepted weft ${weft_VERSION}")
endif()
]=])
weft_run(wrong_major COMMAND ${CMAKE_COMMAND} -S "${WORK_DIR}/wrong_major"
                             -B "${WORK_DIR}/wrong_major/build" "-DCMAKE_PREFIX_PATH=${prefix}"
                             -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)

# The asio component: weft::asio = weft::weft + Boost::headers.
file(MAKE_DIRECTORY "${WORK_DIR}/asio_component")
file(WRITE "${WORK_DIR}/asio_component/CMakeLists.txt" [=[
cmake_minimum_required(VERSION 3.25)
project(asio_component LANGUAGES CXX)
find_package(weft 0.1 REQUIRED COMPONENTS asio)
add_executable(app main.cpp)
target_link_libraries(app PRIVATE weft::asio)
]=])
file(WRITE "${WORK_DIR}/asio_component/main.cpp" [=[
#include <cstdio>
#include <boost/version.hpp>
#include <weft/version.hpp>
#if __has_include(<weft/asio.hpp>)
#include <weft/asio.hpp>
#endif
static_assert(BOOST_VERSION >= 108100, "weft::asio must bring Boost >= 1.81");
int main() { std::printf("weft %d.%d.%d\n", WEFT_VERSION_MAJOR, WEFT_VERSION_MINOR, WEFT_VERSION_PATCH); }
]=])
weft_build_and_run_consumer(asio_component "${WORK_DIR}/asio_component"
                            "${WORK_DIR}/asio_component/build" "-DCMAKE_PREFIX_PATH=${prefix}")

# pkg-config users.
find_program(PKG_CONFIG_EXECUTABLE NAMES pkg-config pkgconf)
if(PKG_CONFIG_EXECUTABLE)
  set(pc_env ${CMAKE_COMMAND} -E env "PKG_CONFIG_PATH=${prefix}/lib/pkgconfig")
  weft_run(pkg-config COMMAND ${pc_env} ${PKG_CONFIG_EXECUTABLE} --modversion weft
           OUTPUT_VARIABLE pc_version)
  string(STRIP "${pc_version}" pc_version)
  if(NOT pc_version STREQUAL WEFT_VERSION)
    message(FATAL_ERROR "weft.pc says version '${pc_version}', expected ${WEFT_VERSION}")
  endif()
  weft_run(pkg-config COMMAND ${pc_env} ${PKG_CONFIG_EXECUTABLE} --cflags --libs weft
           OUTPUT_VARIABLE pc_flags)
  string(STRIP "${pc_flags}" pc_flags)
  separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
  separate_arguments(cxx_flags UNIX_COMMAND "${CONSUMER_CXX_FLAGS}")
  separate_arguments(ld_flags UNIX_COMMAND "${CONSUMER_EXE_LINKER_FLAGS}")
  weft_run(pkg-config COMMAND "${CONSUMER_CXX_COMPILER}" ${cxx_flags} -std=c++20
           "${CMAKE_CURRENT_LIST_DIR}/consumer/main.cpp" ${pc_flags} ${ld_flags}
           -o "${WORK_DIR}/app_pkgconfig")
  weft_run(pkg-config COMMAND "${WORK_DIR}/app_pkgconfig" OUTPUT_VARIABLE output)
  if(NOT output MATCHES "weft ${WEFT_VERSION}")
    message(FATAL_ERROR "pkg-config consumer printed: ${output}")
  endif()
else()
  message(STATUS "pkg-config not found: weft.pc not checked")
endif()

message(STATUS "install_consumer: OK")
