// SPDX-License-Identifier: BSL-1.0
// ODR check: runs code from both translation units (a.cpp, b.cpp), which
// include every public header, and checks that they agree.
#include <cstdio>

#include <weft/version.hpp>

int weft_odr_version_a();
int weft_odr_version_b();

int main() {
  int const a = weft_odr_version_a();
  int const b = weft_odr_version_b();
  if (a != WEFT_VERSION || b != WEFT_VERSION) {
    std::fprintf(stderr, "odr: translation units disagree: %d, %d, %d\n", a, b, WEFT_VERSION);
    return 1;
  }
  std::printf("odr: weft %d.%d.%d in two translation units\n", WEFT_VERSION_MAJOR,
              WEFT_VERSION_MINOR, WEFT_VERSION_PATCH);
  return 0;
}
