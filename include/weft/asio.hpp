// SPDX-License-Identifier: BSL-1.0
// weft's Boost.Asio layer: the async form of every waiting operation, with
// any Asio completion token (use_awaitable, callbacks, deferred, use_future),
// per-operation cancellation through the handler's cancellation slot, and
// completion on the handler's associated executor.
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
