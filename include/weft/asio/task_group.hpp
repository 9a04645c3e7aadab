// SPDX-License-Identifier: BSL-1.0
// task_group for coroutines: wait for a group without blocking a thread, and
// add coroutines to a group so they are joined, and fail, with its tasks.
//
//   weft::task_group group{pool.executor(), request};
//   weft::co_spawn(group, fetch_user(id));       // an awaitable<void>
//   weft::co_spawn(group, fetch_orders(id));
//   co_await weft::async_wait(group, asio::use_awaitable);  // rethrows the first exception
//
// co_spawn(group, awaitable) counts the coroutine in the group until it
// returns; an exception it throws is the group's failure (first one wins,
// and cancels the group's token). When the group's token is cancelled, the
// coroutine's pending Asio operation is cancelled (terminal), emitted on the
// coroutine's executor; a group already cancelled starts no coroutine and
// reports it at wait, as for tasks. The coroutine runs on a strand of the
// group's executor, or of the executor the three-argument form names (an
// io_context's), so the cancellation can be emitted where it cannot race it.
//
// async_wait(group, token) completes with void(std::exception_ptr): null on
// success, else what task_group::wait() would throw; cancelled through its
// cancellation slot, it completes with a boost::system::system_error
// (errc::cancelled), and the group's tasks keep running. It must not run
// concurrently with another wait on the same group.
#pragma once

#include <weft/asio/cancel.hpp>
#include <weft/asio/executor.hpp>
#include <weft/asio/wait_group.hpp>
#include <weft/task_group.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/system_error.hpp>

#include <exception>
#include <memory>
#include <utility>

namespace weft {

template <class CompletionToken = boost::asio::default_completion_token_t<boost::asio::system_executor>>
auto async_wait(task_group& group, CompletionToken&& token = {}) {
  return boost::asio::async_compose<CompletionToken, void(std::exception_ptr)>(
      [&group, waiting = false](auto& self, boost::system::error_code error = {}) mutable {
        if (!waiting) {
          waiting = true;
          weft::async_wait(detail::task_group_access::pending(group), std::move(self));
          return;
        }
        if (error) {
          self.complete(std::make_exception_ptr(boost::system::system_error(error)));
          return;
        }
        self.complete(detail::task_group_access::outcome(group));
      },
      token);
}

template <class Executor, class AwaitableExecutor>
void co_spawn(task_group& group, const Executor& executor,
              boost::asio::awaitable<void, AwaitableExecutor> coroutine) {
  if (!detail::task_group_access::begin(group)) return;
  // The coroutine runs on a strand, and the group's cancellation is emitted
  // on that strand: Asio requires a cancellation signal to be emitted where
  // it cannot race the operation it cancels, and a pool runs a coroutine's
  // steps on any of its workers.
  auto strand = boost::asio::make_strand(executor);
  auto bridge = std::make_unique<cancellation_bridge<decltype(strand)>>(group.token(), strand);
  auto slot = bridge->slot();
  try {
    boost::asio::co_spawn(strand, std::move(coroutine),
                          boost::asio::bind_cancellation_slot(
                              slot, [&group, bridge = std::move(bridge)](std::exception_ptr error) mutable {
                                bridge.reset();  // unregisters from the token before the group may go
                                detail::task_group_access::end(group, std::move(error));
                              }));
  } catch (...) {
    detail::task_group_access::end(group, nullptr);
    throw;
  }
}

template <class AwaitableExecutor>
void co_spawn(task_group& group, boost::asio::awaitable<void, AwaitableExecutor> coroutine) {
  co_spawn(group, AwaitableExecutor(group.executor()), std::move(coroutine));
}

}  // namespace weft
