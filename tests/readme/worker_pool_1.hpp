// SPDX-License-Identifier: BSL-1.0
// README.md, worker_pool: a request handler posting to a pool.
#pragma once

#include <future>

struct record {
  int key = 0;
};
struct row {};
inline void write(const record&) {}
inline row read(int) { return {}; }
inline void audit(const record&) {}
inline void count_skipped_audit() {}
inline void compare(const row&, const record&) {}
