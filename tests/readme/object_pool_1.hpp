// SPDX-License-Identifier: BSL-1.0
// README.md, object_pool: a pool of buffers, one taken for a request.
#pragma once

#include <vector>

struct message {};
inline const message request;
inline void encode(const message&, std::vector<char>&) {}

#define WEFT_README_IN_FUNCTION
