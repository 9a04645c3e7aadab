// SPDX-License-Identifier: BSL-1.0
// weft::async_wait(wait_group&, token): wait for a wait_group's count to
// reach zero without blocking a thread.
//
//   co_await weft::async_wait(pending, asio::use_awaitable);
//
// Completion signature: void(boost::system::error_code). Empty on success;
// weft::errc::cancelled when cancelled through the handler's cancellation
// slot. The handler runs on its associated executor, never inline.
#pragma once

#include <weft/detail/asio_waiter.hpp>
#include <weft/wait_group.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/system/error_code.hpp>

#include <memory>
#include <tuple>
#include <utility>

namespace weft {
namespace detail {

struct wait_group_access {
  template <class Clock, class Handler>
  static void async_wait(basic_wait_group<Clock>& group, Handler handler) {
    struct wait_result {
      wait_status status = wait_status::ok;
      void settle(wait_status settled) noexcept { status = settled; }
      std::tuple<boost::system::error_code> arguments() const noexcept { return {to_boost_error(status)}; }
    } result;
    using waiter_type = async_waiter<Handler, decltype(result)>;
    auto waiter = std::make_unique<waiter_type>(std::move(handler), result, group.queue_);
    waiter->watch_cancellation();
    bool ready = false;
    {
      auto lock = group.queue_.lock();
      if (!waiter->enlist()) {
        lock.unlock();
        return waiter_type::discard(std::move(waiter));
      }
      ready = group.ready_or_enqueue(*waiter);
    }
    if (!ready) {
      waiter.release();  // owned by the queue until completed
      return;
    }
    group.wait_out_release();  // the handler may destroy the group
    waiter_type::finish(std::move(waiter), wait_status::ok);
  }
};

}  // namespace detail

template <class Clock, class CompletionToken = boost::asio::deferred_t>
auto async_wait(basic_wait_group<Clock>& group, CompletionToken&& token = {}) {
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
      [](auto handler, basic_wait_group<Clock>* target) {
        detail::wait_group_access::async_wait(*target, std::move(handler));
      },
      token, &group);
}

}  // namespace weft
