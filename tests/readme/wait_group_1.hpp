// SPDX-License-Identifier: BSL-1.0
// README.md, wait_group: statements, run over shards.
#pragma once

#include <thread>
#include <vector>

struct shard {};
inline std::vector<shard> shards;
inline void flush(shard&) {}

#define WEFT_README_IN_FUNCTION
