// SPDX-License-Identifier: BSL-1.0
// README.md, resource_pool: a pool of database connections.
#pragma once

#include <chrono>

using namespace std::chrono_literals;

inline const char* const conninfo = "host=db";
struct pg_connection {
  explicit pg_connection(const char*) {}
  void close() {}
  bool ok() const { return true; }
  void rollback_if_open() {}
  void exec(const char*) {}
};
inline const weft::cancel_token request_token;
inline void reply_busy() {}

#define WEFT_README_IN_FUNCTION
