// SPDX-License-Identifier: BSL-1.0
// weft's Boost.Asio layer: the async form of every waiting operation, with
// any Asio completion token (use_awaitable, callbacks, deferred, use_future),
// per-operation cancellation through the handler's cancellation slot, and
// completion on the handler's associated executor. With no token, an
// operation is deferred, as Asio's own are from Boost 1.86: it returns an
// operation to co_await in an awaitable coroutine, or to launch later with
// a token (`co_await weft::async_acquire(sem, 1)`). Asio 1.81's own default,
// which weft used before, is void, and a call without a token did not
// compile. One exception in Boost 1.80-1.81: an operation that completes
// with an exception_ptr and a value (resource_pool's async_acquire) cannot
// be co_awaited as it is (chriskohlhoff/asio#1172); launch it with
// use_awaitable: `co_await weft::async_acquire(pool)(asio::use_awaitable)`.
//
// Requires Boost >= 1.81 (Asio 1.26). The core headers never include Boost;
// only this header and those under weft/asio/ do.
#pragma once

#include <weft/asio/cancel.hpp>
#include <weft/asio/channel.hpp>
#include <weft/asio/executor.hpp>
#include <weft/asio/resource_pool.hpp>
#include <weft/asio/semaphore.hpp>
#include <weft/asio/task_group.hpp>
#include <weft/asio/wait_group.hpp>
