// SPDX-License-Identifier: BSL-1.0
// ODR check: runs code from both translation units (a.cpp, b.cpp), which
// include every public header, and checks that they agree.
#include <weft/semaphore.hpp>
#include <weft/version.hpp>

#include <cstdio>
#include <system_error>

int weft_odr_version_a();
int weft_odr_version_b();
const std::error_category* weft_odr_category_a();
const std::error_category* weft_odr_category_b();
bool weft_odr_semaphore_a(weft::semaphore& shared);
bool weft_odr_semaphore_b(weft::semaphore& shared);
bool weft_odr_deadline_a();
bool weft_odr_deadline_b();

int main() {
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::fprintf(stderr, "odr: %s\n", what);
      ++failures;
    }
  };
  check(weft_odr_version_a() == WEFT_VERSION && weft_odr_version_b() == WEFT_VERSION, "versions disagree");
  check(weft_odr_category_a() == weft_odr_category_b(), "two error categories in one program");
  weft::semaphore shared{1};
  check(weft_odr_semaphore_a(shared) && weft_odr_semaphore_b(shared), "a semaphore used from two units failed");
  check(weft_odr_deadline_a() && weft_odr_deadline_b(), "a deadline did not fire in one of the units");
  if (failures == 0) {
    std::printf("odr: weft %d.%d.%d agrees across two translation units\n", WEFT_VERSION_MAJOR, WEFT_VERSION_MINOR,
                WEFT_VERSION_PATCH);
  }
  return failures == 0 ? 0 : 1;
}
