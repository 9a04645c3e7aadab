// SPDX-License-Identifier: BSL-1.0
// ODR check, translation unit A: includes every public header. tests/odr/a.cpp and
// tests/odr/b.cpp are the same apart from the function they define; linking
// them into one program fails if a header defines a non-inline function or
// variable (a "multiple definition" link error). To extend the check, use
// the same weft types and templates in both files.
#include <weft/version.hpp>
#if __has_include(<weft/weft.hpp>)
#include <weft/weft.hpp>
#endif
#if __has_include(<weft/asio.hpp>)
#include <weft/asio.hpp>
#endif

int weft_odr_version_a() { return WEFT_VERSION; }
