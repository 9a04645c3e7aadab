// SPDX-License-Identifier: BSL-1.0
// weft::async_acquire: take permits from a weft::semaphore without blocking
// a thread, with any Asio completion token.
//
//   auto slot = co_await weft::async_acquire(db_slots, 1, asio::use_awaitable);
//
// Completion signature: void(boost::system::error_code, semaphore::permit).
// On success the error code is empty and the permit holds n permits; when the
// operation is cancelled through the handler's cancellation slot (terminal,
// partial or total cancellation: a cancelled wait has no side effect) it
// completes with weft::errc::cancelled (equivalent to
// std::errc::operation_canceled) and an empty permit.
//
// The waiter joins the same FIFO as threads blocked in acquire(), so order
// holds across threads and coroutines. The handler always runs on its
// associated executor (asio::system_executor when it has none), never inside
// async_acquire nor inside the release() that granted it. Invalid n throws
// std::invalid_argument from async_acquire itself, before initiation.
#pragma once

#include <weft/detail/asio_waiter.hpp>
#include <weft/semaphore.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/error_code.hpp>

#include <memory>
#include <tuple>
#include <utility>

namespace weft {
namespace detail {

struct semaphore_access {
  // What an async acquire delivers: the permit is made the moment the
  // waiter is granted, so it goes back if the handler never runs.
  template <class Clock>
  class acquire_result {
   public:
    using permit = typename basic_semaphore<Clock>::permit;

    acquire_result(basic_semaphore<Clock>& semaphore, std::ptrdiff_t n) noexcept : semaphore_(&semaphore), n_(n) {}

    // Called under the queue's lock, as the waiter is queued: a wait that
    // queued counts in stats() as a thread's does.
    void queued(typename Clock::time_point at) noexcept {
      queued_at_ = at;
      was_queued_ = true;
    }

    void settle(wait_status status) noexcept {
      status_ = status;
      if (status == wait_status::ok) permit_ = permit{semaphore_, n_};
      if (was_queued_) {
        semaphore_->record_wait(status, Clock::now() - queued_at_);
      } else if (status != wait_status::ok) {
        semaphore_->count_failure(status);
      }
    }

    std::tuple<boost::system::error_code, permit> arguments() noexcept {
      return {to_boost_error(status_), std::move(permit_)};
    }

   private:
    basic_semaphore<Clock>* semaphore_;
    std::ptrdiff_t n_;
    wait_status status_ = wait_status::ok;
    permit permit_;
    typename Clock::time_point queued_at_{};
    bool was_queued_ = false;
  };

  template <class Clock, class Handler>
  static void async_acquire(basic_semaphore<Clock>& semaphore, std::ptrdiff_t n, Handler handler) {
    async_acquire(semaphore, n, std::move(handler), acquire_result<Clock>(semaphore, n));
  }

  // An async acquire of n whose outcome `result` settles and delivers, as
  // acquire_result does: for a caller that hands its handler something
  // other than a permit for what it was granted.
  template <class Clock, class Handler, class Result>
  static void async_acquire(basic_semaphore<Clock>& semaphore, std::ptrdiff_t n, Handler handler,
                            Result result) {
    using waiter_type = async_waiter<Handler, Result>;
    auto waiter = std::make_unique<waiter_type>(std::move(handler), std::move(result), semaphore.queue_);
    waiter->request = n;
    waiter->watch_cancellation();
    bool taken = false;
    {
      auto lock = semaphore.queue_.lock();
      if (!waiter->enlist()) {
        lock.unlock();
        return waiter_type::discard(std::move(waiter));
      }
      taken = semaphore.take_or_enqueue(*waiter);
      if constexpr (requires { waiter->result().queued(Clock::now()); }) {
        if (!taken) waiter->result().queued(Clock::now());
      }
    }
    if (!taken) {
      waiter.release();  // owned by the queue until completed
      return;
    }
    waiter_type::finish(std::move(waiter), wait_status::ok);
  }

  template <class Clock>
  static void count_failure(basic_semaphore<Clock>& semaphore, wait_status status) noexcept {
    semaphore.count_failure(status);
  }

  template <class Clock>
  static void check_weight(basic_semaphore<Clock>& semaphore, std::ptrdiff_t n) {
    semaphore.check_weight(n, "async_acquire");
  }
};

}  // namespace detail

template <class Clock, class CompletionToken = boost::asio::deferred_t>
auto async_acquire(basic_semaphore<Clock>& semaphore, std::ptrdiff_t n,
                   CompletionToken&& token = {}) {
  detail::semaphore_access::check_weight(semaphore, n);
  using permit = typename basic_semaphore<Clock>::permit;
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code, permit)>(
      [](auto handler, basic_semaphore<Clock>* target, std::ptrdiff_t weight) {
        detail::semaphore_access::async_acquire(*target, weight, std::move(handler));
      },
      token, &semaphore, n);
}

}  // namespace weft
