// SPDX-License-Identifier: BSL-1.0
// doctest's implementation, compiled once for weft_tests, weft_stress and
// weft_postgres_tests (it is the costliest translation unit of a test
// program to build after the Asio tests: 11 s under ASan). Each program
// brings its own main().
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
