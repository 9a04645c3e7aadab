// SPDX-License-Identifier: BSL-1.0
// README.md, cancel_token, first block: a handler that derives a deadline.
#pragma once

#include <chrono>

struct socket_connection {
  void abort() {}
};
inline socket_connection connection;
inline void fetch_user(const weft::cancel_token&) {}
inline void reply(int) {}
