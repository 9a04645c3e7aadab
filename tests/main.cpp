// SPDX-License-Identifier: BSL-1.0
// main() of weft_tests and weft_postgres_tests: doctest's, with its command
// line. The test cases live in tests/test_*.cpp; doctest itself is compiled
// in doctest_runtime.cpp.
#include <doctest/doctest.h>

int main(int argc, char** argv) { return doctest::Context(argc, argv).run(); }
