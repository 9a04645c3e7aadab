// SPDX-License-Identifier: BSL-1.0
// README.md, registry, first block: reading the registry, as statements.
#pragma once

#include <sstream>

inline std::ostringstream out;

#define WEFT_README_IN_FUNCTION
