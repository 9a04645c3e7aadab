// SPDX-License-Identifier: BSL-1.0
// weft/testing/doctest.hpp: weft's leak check as one line in a doctest
// test case, as goleak.VerifyNone(t) is one line in a Go test.
//
//   TEST_CASE("the handler leaves nothing running") {
//     WEFT_CHECK_NO_LEAKS();              // checked when the test case ends
//     handle(request);
//   }
//
// At the end of the enclosing scope it waits up to the grace period (1 s by
// default) for the tasks started in the scope to finish, and fails the test
// case (FAIL_CHECK) with a line per leaked task: its spawn site, its state
// and what it is blocked on. WEFT_CHECK_NO_LEAKS_WITH(options) takes
// weft::leak_check_options (grace, ignore_names, ignore_functions).
//
// Include doctest before this header (or let this header include it).
#pragma once

#include <weft/registry.hpp>

#include <doctest/doctest.h>

#include <string>
#include <utility>

namespace weft::testing {

inline leak_check_options doctest_leak_options(leak_check_options options = {}) {
  options.on_leak = [](const std::string& report) { FAIL_CHECK(report); };
  return options;
}

}  // namespace weft::testing

#define WEFT_CHECK_NO_LEAKS() const ::weft::leak_check weft_no_leaks_check{::weft::testing::doctest_leak_options()}
#define WEFT_CHECK_NO_LEAKS_WITH(options) \
  const ::weft::leak_check weft_no_leaks_check { ::weft::testing::doctest_leak_options(options) }
