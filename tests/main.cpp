// SPDX-License-Identifier: BSL-1.0
// doctest's main for weft_tests. The test cases live in tests/test_*.cpp.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
