// SPDX-License-Identifier: BSL-1.0
// README.md, Asio: coroutines and a plain task in one group, on a pool.
#pragma once

#include <exception>

inline boost::asio::awaitable<void> fetch_user_async(int) { co_return; }
inline boost::asio::awaitable<void> fetch_orders_async(int) { co_return; }
inline void render_badge(int) {}
inline void log_failure(std::exception_ptr) {}
