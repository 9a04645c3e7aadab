// SPDX-License-Identifier: BSL-1.0
// README.md, semaphore, second block: the same semaphore from a coroutine.
#pragma once

inline weft::semaphore db_connections{10};
inline boost::asio::awaitable<void> run_query_async() { co_return; }
