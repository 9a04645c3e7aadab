// SPDX-License-Identifier: BSL-1.0
// weft::async_acquire for a weft::resource_pool: lease a resource without
// blocking a thread, with any Asio completion token.
//
//   auto conn = co_await weft::async_acquire(db, asio::use_awaitable);
//
// Completion signature: void(std::exception_ptr, resource_pool::lease).
// On success the exception_ptr is null and the lease holds a resource. It
// holds boost::system::system_error(weft::errc::cancelled) when the wait was
// cancelled through the handler's cancellation slot (terminal, partial or
// total: a cancelled wait has no side effect), or whatever open() threw. With
// use_awaitable either is thrown in the coroutine; use as_tuple to inspect it.
//
// The wait is the pool's semaphore's async_acquire, so coroutines and
// threads share one FIFO of waiters. The handler runs on its associated
// executor (asio::system_executor when it has none), never inside
// async_acquire. When no idle resource is left, open() runs on that
// executor, just before the handler: keep open() short there, or give the
// coroutines that need fresh connections an executor that may block.
#pragma once

#include <weft/asio/semaphore.hpp>
#include <weft/resource_pool.hpp>
#include <weft/wait_status.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <exception>
#include <tuple>
#include <utility>

namespace weft {
namespace detail {

struct resource_pool_access {
  template <class R, class Clock>
  using pool_type = basic_resource_pool<R, Clock>;

  // Runs on the handler's executor, with a slot held: completes the handler
  // with a lease, or with what open() threw.
  template <class R, class Clock, class Handler>
  static void complete_with_lease(pool_type<R, Clock>& pool, Handler& handler) {
    using lease = typename pool_type<R, Clock>::lease;
    lease leased;
    std::exception_ptr error;
    try {
      leased = pool.lease_for_slot();
    } catch (...) {
      error = std::current_exception();
    }
    std::move(handler)(error, std::move(leased));
  }

  // What an async acquire delivers: the slot is held the moment the waiter
  // is granted, so it goes back (see held_slot) if the handler never runs.
  template <class R, class Clock>
  class slot_result {
   public:
    using held_slot = typename pool_type<R, Clock>::held_slot;

    explicit slot_result(pool_type<R, Clock>& pool) noexcept : pool_(&pool) {}

    void settle(wait_status status) noexcept {
      status_ = status;
      if (status == wait_status::ok) {
        slot_ = held_slot{*pool_};
      } else {
        semaphore_access::count_failure(pool_->slots_, status);
      }
    }

    std::tuple<boost::system::error_code, held_slot> arguments() noexcept {
      return {to_boost_error(status_), std::move(slot_)};
    }

   private:
    pool_type<R, Clock>* pool_;
    wait_status status_ = wait_status::ok;
    held_slot slot_;
  };

  template <class R, class Clock, class Handler>
  static void async_acquire(pool_type<R, Clock>& pool, Handler handler) {
    using held_slot = typename pool_type<R, Clock>::held_slot;
    auto executor = boost::asio::get_associated_executor(handler, boost::asio::system_executor{});
    if (pool.slots_.try_acquire(1)) {
      boost::asio::post(executor,
                        [&pool, slot = held_slot{pool}, handler = std::move(handler)]() mutable {
                          slot.hand_over();
                          complete_with_lease<R, Clock>(pool, handler);
                        });
      return;
    }
    auto slot = boost::asio::get_associated_cancellation_slot(handler);
    const auto start = pool.begin_wait();
    semaphore_access::async_acquire(
        pool.slots_, 1,
        boost::asio::bind_cancellation_slot(
            slot, boost::asio::bind_executor(
                      executor,
                      [&pool, start, handler = std::move(handler)](boost::system::error_code error,
                                                                   held_slot granted) mutable {
                        pool.end_wait(start);
                        if (error) {
                          using lease = typename pool_type<R, Clock>::lease;
                          std::move(handler)(std::make_exception_ptr(boost::system::system_error(error)),
                                             lease{});
                          return;
                        }
                        granted.hand_over();
                        complete_with_lease<R, Clock>(pool, handler);
                      })),
        slot_result<R, Clock>(pool));
  }
};

}  // namespace detail

template <class R, class Clock, class CompletionToken = boost::asio::deferred_t>
auto async_acquire(basic_resource_pool<R, Clock>& pool, CompletionToken&& token = {}) {
  using lease = typename basic_resource_pool<R, Clock>::lease;
  return boost::asio::async_initiate<CompletionToken, void(std::exception_ptr, lease)>(
      [](auto handler, basic_resource_pool<R, Clock>* target) {
        detail::resource_pool_access::async_acquire<R, Clock>(*target, std::move(handler));
      },
      token, &pool);
}

}  // namespace weft
