// SPDX-License-Identifier: BSL-1.0
// weft::async_send and weft::async_recv: use a weft::channel from Asio
// without blocking a thread, with any completion token.
//
//   co_await weft::async_send(jobs, std::move(j), asio::use_awaitable);
//   for (;;) {
//     auto [error, job] = co_await weft::async_recv(jobs, asio::as_tuple(asio::use_awaitable));
//     if (!job) break;  // closed and drained (error == weft::errc::closed), or cancelled
//     handle(*job);
//   }
//
// Completion signatures:
//   async_send: void(boost::system::error_code): empty once the channel
//     took the value; weft::errc::closed when it was closed (the value is
//     destroyed with the operation: unlike the blocking send, an async send
//     cannot hand it back); weft::errc::cancelled when cancelled.
//   async_recv: void(boost::system::error_code, std::optional<T>): the
//     value, or an empty optional with weft::errc::closed (closed and
//     drained) or weft::errc::cancelled.
// Cancellation goes through the handler's cancellation slot (terminal,
// partial or total: a cancelled operation has no side effect). The waiter
// joins the same queue as blocked threads, so threads and coroutines share
// one channel. The handler runs on its associated executor, never inline.
#pragma once

#include <weft/channel.hpp>
#include <weft/detail/asio_waiter.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/system/error_code.hpp>

#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace weft {
namespace detail {

template <class T, class Clock>
struct channel_access {
  using channel_type = basic_channel<T, Clock>;

  struct send_result {
    explicit send_result(T value) noexcept : value(std::move(value)) {}
    send_result(send_result&& other) noexcept : value(std::move(other.value)), status(other.status) {}
    T value;
    wait_status status = wait_status::ok;
    channel_slot<T> slot;
    void settle(wait_status settled) noexcept { status = settled; }
    std::tuple<boost::system::error_code> arguments() const noexcept { return {to_boost_error(status)}; }
  };

  struct recv_result {
    recv_result() noexcept = default;
    recv_result(recv_result&& other) noexcept : incoming(std::move(other.incoming)), status(other.status) {}
    std::optional<T> incoming;
    wait_status status = wait_status::ok;
    channel_slot<T> slot;
    void settle(wait_status settled) noexcept { status = settled; }
    std::tuple<boost::system::error_code, std::optional<T>> arguments() noexcept {
      return {to_boost_error(status), std::move(incoming)};
    }
  };

  template <class Handler>
  static void async_send(channel_type& channel, T value, Handler handler) {
    detail::wait_queue& queue = channel.send_queue();
    using waiter_type = async_waiter<Handler, send_result>;
    auto waiter = std::make_unique<waiter_type>(std::move(handler), send_result{std::move(value)}, queue);
    send_result& result = waiter->result();
    result.slot.outgoing = &result.value;
    waiter->context = &result.slot;
    waiter->watch_cancellation();
    if (!channel.rendezvous() && channel.fast_push(result.value)) {
      return waiter_type::finish(std::move(waiter), wait_status::ok);
    }
    auto lock = queue.lock();
    if (!waiter->enlist()) return discard_unlocked(std::move(waiter), lock);
    const auto finished = channel.send_or_enqueue(result.value, *waiter, lock);
    if (!finished) {
      waiter.release();  // owned by the queue until completed
      return;
    }
    finish_unlocked(std::move(waiter), *finished, lock);
  }

  template <class Handler>
  static void async_recv(channel_type& channel, Handler handler) {
    detail::wait_queue& queue = channel.receivers_;
    using waiter_type = async_waiter<Handler, recv_result>;
    auto waiter = std::make_unique<waiter_type>(std::move(handler), recv_result{}, queue);
    recv_result& result = waiter->result();
    result.slot.incoming = &result.incoming;
    waiter->context = &result.slot;
    waiter->watch_cancellation();
    if (!channel.rendezvous()) {
      T value;
      if (channel.fast_pop(value)) {
        result.incoming.emplace(std::move(value));
        return waiter_type::finish(std::move(waiter), wait_status::ok);
      }
    }
    auto lock = queue.lock();
    if (!waiter->enlist()) return discard_unlocked(std::move(waiter), lock);
    const auto finished = channel.recv_or_enqueue(result.incoming, *waiter, lock);
    if (!finished) {
      waiter.release();  // owned by the queue until completed
      return;
    }
    finish_unlocked(std::move(waiter), *finished, lock);
  }

 private:
  // The completion may run on another thread at once and destroy the
  // channel: the queue's lock is released first.
  template <class Waiter>
  static void finish_unlocked(std::unique_ptr<Waiter> waiter, wait_status status,
                              detail::wait_queue::lock_type& lock) {
    if (lock.owns_lock()) lock.unlock();
    Waiter::finish(std::move(waiter), status);
  }

  // The handler's context is shut down: the operation ends unstarted (its
  // value, for a send, destroyed with it), after the lock is released.
  template <class Waiter>
  static void discard_unlocked(std::unique_ptr<Waiter> waiter,
                               detail::wait_queue::lock_type& lock) {
    lock.unlock();
    Waiter::discard(std::move(waiter));
  }
};

}  // namespace detail

template <class T, class Clock, class CompletionToken = boost::asio::deferred_t>
auto async_send(basic_channel<T, Clock>& channel, std::type_identity_t<T> value,
                CompletionToken&& token = {}) {
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
      [](auto handler, basic_channel<T, Clock>* target, T moved) {
        detail::channel_access<T, Clock>::async_send(*target, std::move(moved), std::move(handler));
      },
      token, &channel, std::move(value));
}

template <class T, class Clock, class CompletionToken = boost::asio::deferred_t>
auto async_recv(basic_channel<T, Clock>& channel, CompletionToken&& token = {}) {
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code, std::optional<T>)>(
      [](auto handler, basic_channel<T, Clock>* target) {
        detail::channel_access<T, Clock>::async_recv(*target, std::move(handler));
      },
      token, &channel);
}

}  // namespace weft
