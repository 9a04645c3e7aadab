// SPDX-License-Identifier: BSL-1.0
// Consumer of weft (installed or through add_subdirectory): includes the
// umbrella header and prints the version it was built against.
#include <cstdio>

#include <weft/version.hpp>
#if __has_include(<weft/weft.hpp>)
#include <weft/weft.hpp>
#endif

int main() {
  std::printf("weft %d.%d.%d\n", WEFT_VERSION_MAJOR, WEFT_VERSION_MINOR, WEFT_VERSION_PATCH);
  return WEFT_VERSION >= 100 ? 0 : 1;  // 0.1.0 or later
}
