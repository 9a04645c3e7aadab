// SPDX-License-Identifier: BSL-1.0
// weft::select: wait on several channel operations at once and complete
// exactly one, Go's `select` statement.
//
//   auto done = weft::select(request_token,
//       weft::on_recv(jobs, [&](std::optional<job> j) { if (j) handle(*j); }),
//       weft::on_send(results, std::move(next), [&] { next = {}; }));
//   if (done.status == weft::wait_status::cancelled) return;
//
//   if (!weft::try_select(weft::on_recv(jobs, handle_one))) idle();   // `default:`
//
// Semantics:
//  - Exactly one case completes, and it is the only one with an effect: no
//    value is taken from a channel without being delivered to its case, and
//    a send case's value is moved from only if that case completed.
//  - Among cases ready at once, one is chosen at random, as Go does, so no
//    case starves another.
//  - A receive case is ready when a value is, or when its channel is closed
//    and drained; its handler gets the value, or an empty optional for the
//    end of the stream. A send case is ready when the channel takes the
//    value, or is closed; its handler runs only when the value was sent.
//  - The result names the case that completed and its status: ok, or closed
//    (its channel was closed). select with a token or deadline may instead
//    end with cancelled or timeout and no case; try_select (Go's select with
//    `default`) ends with `none` when no case is ready, without waiting for
//    one; like a channel's try_recv and try_send (see channel.hpp), it
//    waits out a value or a slot another thread is moving.
//  - Handlers run on the selecting thread, after every channel's lock is
//    released; an exception from one propagates out of select.
//
// Thread safety: a select may run concurrently with any channel operation
// and other selects on the same channels. A send case refers to the
// caller's value: keep it alive (and untouched) until select returns, and
// make a case from a temporary only inside the select call.
//
// Cost: when a case is ready at once, the cost of that operation plus one
// lock per distinct channel queue involved (taken in address order, as Go's
// select does). Otherwise the select queues a node on each channel and
// parks; a buffered channel that becomes ready wakes it to look again, a
// rendezvous channel hands the value over directly. Nothing is allocated.
#pragma once

#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/config.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/parker.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/timed_wait.hpp>
#include <weft/detail/wait_queue.hpp>
#include <weft/wait_status.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>

namespace weft {

struct select_result {
  static constexpr std::size_t none = static_cast<std::size_t>(-1);

  std::size_t index = none;  // the case that completed, in argument order
  wait_status status = wait_status::ok;

  // A case completed and its operation succeeded.
  explicit operator bool() const noexcept { return index != none && status == wait_status::ok; }
};

namespace detail {

enum class case_readiness { ready, not_ready, in_flight };

// What a receive case and a send case share: the channel, the slot a
// channel's hand-off fills or empties, and queueing in and out of the
// Case's queue() (Case also says, in settle_mark_locked, which of the
// channel's marks follows that queue).
template <class Case, class T, class Clock>
class channel_case {
 public:
  void enqueue_locked(select_node& node, select_state& state, int index) noexcept {
    slot_.select = &state;
    slot_.select_case = index;
    node.state = &state;
    node.context = &slot_;
    self().queue().push_back(node);
  }

  void withdraw(select_node& node) noexcept {
    auto lock = self().queue().lock();
    if (node.queued) self().queue().erase(node);
    self().settle_mark_locked();
  }

  wait_status status() const noexcept { return closed_ ? wait_status::closed : wait_status::ok; }

 protected:
  explicit channel_case(basic_channel<T, Clock>& channel) noexcept : channel_(&channel) {}

  basic_channel<T, Clock>* channel_;
  channel_slot<T> slot_;
  bool closed_ = false;

 private:
  Case& self() noexcept { return static_cast<Case&>(*this); }
};

// A receive case. F is called with std::optional<T>.
template <class T, class Clock, class F>
class recv_case : public channel_case<recv_case<T, Clock, F>, T, Clock> {
  using base = channel_case<recv_case, T, Clock>;
  using base::channel_;
  using base::closed_;
  using base::slot_;

 public:
  recv_case(basic_channel<T, Clock>& channel, F handler) : base(channel), handler_(std::move(handler)) {}

  wait_queue& queue() const noexcept { return channel_->receivers_; }

  // With queue() locked: completes now if it can.
  case_readiness ready_locked(completion_list& done) noexcept {
    auto& ch = *channel_;
    if (ch.rendezvous()) {
      if (ch.take_from_sender(value_, done)) return case_readiness::ready;
      if (ch.ring_.closed()) return close_ready();
      return case_readiness::not_ready;
    }
    ch.receivers_waiting_.store(true, std::memory_order_seq_cst);
    T value;
    if (ch.ring_.try_pop(value, ch.waking_hook())) {
      value_.emplace(std::move(value));
      popped_ = true;
      return case_readiness::ready;
    }
    const bool closed = ch.ring_.closed();  // first: see basic_channel::recv_queued
    if (ch.ring_.claimed_unpopped()) return case_readiness::in_flight;
    return closed ? close_ready() : case_readiness::not_ready;
  }

  // The value's address is taken here, not at construction: the case may
  // have moved since.
  void enqueue_locked(select_node& node, select_state& state, int index) noexcept {
    slot_.incoming = &value_;
    base::enqueue_locked(node, state, index);
  }

  // With queue() locked: the channel's mark follows its queue.
  void settle_mark_locked() noexcept {
    if (!channel_->rendezvous()) channel_->receivers_waiting_.store(!queue().empty(), std::memory_order_relaxed);
  }

  // After every lock is released: what the operation owes the channel,
  // which it has been waking since the pop (see basic_channel::begin_waking).
  void after_unlock() noexcept {
    if (popped_) channel_->finish_pop();
  }

  void finish() { std::invoke(handler_, std::move(value_)); }

 private:
  case_readiness close_ready() noexcept {
    closed_ = true;
    return case_readiness::ready;
  }

  F handler_;
  std::optional<T> value_;
  bool popped_ = false;
};

// A send case. F is called with no arguments once the value is sent.
template <class T, class Clock, class F>
class send_case : public channel_case<send_case<T, Clock, F>, T, Clock> {
  using base = channel_case<send_case, T, Clock>;
  using base::channel_;
  using base::closed_;
  using base::slot_;

 public:
  send_case(basic_channel<T, Clock>& channel, T& value, F handler)
      : base(channel), value_(&value), handler_(std::move(handler)) {
    slot_.outgoing = value_;
  }

  wait_queue& queue() const noexcept {
    return channel_->rendezvous() ? channel_->receivers_ : channel_->senders_;
  }

  case_readiness ready_locked(completion_list& done) noexcept {
    auto& ch = *channel_;
    if (ch.ring_.closed()) {
      closed_ = true;
      return case_readiness::ready;
    }
    if (ch.rendezvous()) {
      return ch.give_to_receiver(*value_, done) ? case_readiness::ready : case_readiness::not_ready;
    }
    ch.senders_waiting_.store(true, std::memory_order_seq_cst);
    if (ch.ring_.try_push(*value_, ch.waking_hook())) {
      pushed_ = true;
      return case_readiness::ready;
    }
    return ch.ring_.full() ? case_readiness::not_ready : case_readiness::in_flight;
  }

  void settle_mark_locked() noexcept {
    if (!channel_->rendezvous()) channel_->senders_waiting_.store(!queue().empty(), std::memory_order_relaxed);
  }

  void after_unlock() noexcept {
    if (pushed_) channel_->finish_push();
  }

  void finish() {
    if (!closed_) std::invoke(handler_);
  }

 private:
  T* value_;
  F handler_;
  bool pushed_ = false;
};

template <class C>
inline constexpr bool is_select_case = false;
template <class T, class Clock, class F>
inline constexpr bool is_select_case<recv_case<T, Clock, F>> = true;
template <class T, class Clock, class F>
inline constexpr bool is_select_case<send_case<T, Clock, F>> = true;

template <class... Cases>
concept select_cases = sizeof...(Cases) > 0 && (is_select_case<std::remove_cvref_t<Cases>> && ...);

struct no_handler {
  void operator()() const noexcept {}
};

// A fresh random order of the cases for each select (a Fisher-Yates
// shuffle), as Go's pollorder: the first ready case in it is a uniform
// choice among the ready ones. A random rotation was not: it favoured the
// ready case after a run of unready ones.
template <std::size_t N>
std::array<std::size_t, N> random_order() noexcept {
  thread_local std::uint64_t state = 0x9e3779b97f4a7c15ULL ^ reinterpret_cast<std::uintptr_t>(&state);
  std::array<std::size_t, N> order;
  for (std::size_t i = 0; i < N; ++i) order[i] = i;
  for (std::size_t i = N; i > 1; --i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::swap(order[i - 1], order[static_cast<std::size_t>(state % i)]);
  }
  return order;
}

// Locks the distinct queues of the cases in address order, and unlocks
// them when destroyed.
template <std::size_t N>
class queue_locks {
 public:
  explicit queue_locks(std::array<wait_queue*, N> queues) noexcept : queues_(queues) {
    std::sort(queues_.begin(), queues_.end(), std::less<>{});
    count_ = static_cast<std::size_t>(std::unique(queues_.begin(), queues_.end()) - queues_.begin());
    for (std::size_t i = 0; i < count_; ++i) locks_[i] = queues_[i]->lock();
  }

 private:
  std::array<wait_queue*, N> queues_;
  std::array<wait_queue::lock_type, N> locks_;
  std::size_t count_ = 0;
};

// Runs a select over `cases` (a tuple of recv_case / send_case). `cancel`
// and `deadline` may be null; `poll` makes it try_select.
template <class Clock, class Duration, class... Cases>
select_result run_select(std::tuple<Cases...>& cases, cancel_state* cancel,
                         const std::chrono::time_point<Clock, Duration>* deadline, bool poll) {
  constexpr std::size_t count = sizeof...(Cases);
  const auto for_each_case = [&](auto&& visit) {
    std::apply([&](auto&... each) {
      std::size_t index = 0;
      (visit(each, index++), ...);
    }, cases);
  };
  const auto with_case = [&](std::size_t wanted, auto&& visit) {
    for_each_case([&](auto& each, std::size_t index) {
      if (index == wanted) visit(each);
    });
  };
  const auto gave_up = [&]() -> select_result {
    return {select_result::none, cancel != nullptr && cancel->cancelled() && !cancel->by_deadline()
                                     ? wait_status::cancelled
                                     : wait_status::timeout};
  };

  for (detail::backoff pause;;) {
    if (cancel != nullptr && cancel->cancelled()) return gave_up();
    select_state state;
    std::array<select_node, count> nodes;
    {
      completion_list done;  // completed after the locks below are released
      std::array<wait_queue*, count> queues{};
      for_each_case([&](auto& each, std::size_t index) { queues[index] = &each.queue(); });
      std::size_t winner = select_result::none;
      bool in_flight = false;
      {
        queue_locks<count> locks{queues};
        for (const std::size_t index : random_order<count>()) {
          if (winner != select_result::none) break;
          with_case(index, [&](auto& each) {
            const auto readiness = each.ready_locked(done);
            if (readiness == case_readiness::ready) winner = index;
            if (readiness == case_readiness::in_flight) in_flight = true;
          });
        }
        const bool wait_now = winner == select_result::none && !in_flight && !poll;
        if (wait_now) {
          for_each_case([&](auto& each, std::size_t index) {
            each.enqueue_locked(nodes[index], state, static_cast<int>(index));
          });
        } else {
          for_each_case([&](auto& each, std::size_t) { each.settle_mark_locked(); });
        }
      }
      if (winner != select_result::none) {
        done.complete_all();
        select_result result{winner, wait_status::ok};
        with_case(winner, [&](auto& each) {
          each.after_unlock();
          result.status = each.status();
          each.finish();
        });
        return result;
      }
      // A case in flight (a sender has claimed a slot and not yet
      // published it, a receiver is still emptying the slot a send needs)
      // is waited out, by try_select too, as the channel's try_recv and
      // try_send do: another operation may have returned after it, leaving
      // a value or room behind it. A select past its deadline stops.
      if (in_flight) {
        if (deadline != nullptr && Clock::now() >= *deadline) return gave_up();
        if (!pause.wait()) std::this_thread::yield();
        continue;
      }
      if (poll) return {};
    }

    // Parked on every channel; the first to claim `state` wakes us.
    bool claimed_by_us = false;
    {
      const blocked_scope blocked{"select", nullptr};
      struct cancel_link : callback_node {
        select_state* state = nullptr;
      } link;
      link.state = &state;
      link.invoke = [](callback_node& self) noexcept {
        auto& target = *static_cast<cancel_link&>(self).state;
        if (target.claim(select_state::given_up)) target.waiter.complete();
      };
      if (cancel != nullptr) cancel->add_callback(link);
      if (deadline != nullptr && !wait_completed_until(state.waiter, *deadline)) {
        claimed_by_us = state.claim(select_state::given_up);
      }
      if (!claimed_by_us) state.waiter.wait_completed();
      if (cancel != nullptr) cancel->remove_callback(link);
    }
    for_each_case([&](auto& each, std::size_t index) { each.withdraw(nodes[index]); });

    const int winner = state.winner.load(std::memory_order_acquire);
    if (winner == select_state::given_up) return gave_up();
    if (state.handed_over) {
      select_result result{static_cast<std::size_t>(winner), wait_status::ok};
      with_case(result.index, [&](auto& each) {
        result.status = each.status();
        each.finish();
      });
      return result;
    }
    // A buffered channel became ready (or closed): look again.
  }
}

}  // namespace detail

// A receive case: handler(std::optional<T>) runs if it completes.
template <class T, class Clock, class F>
auto on_recv(basic_channel<T, Clock>& channel, F handler) {
  static_assert(std::is_invocable_v<F&, std::optional<T>>,
                "weft::on_recv: the handler must take a std::optional<T> (empty: the channel is closed)");
  return detail::recv_case<T, Clock, F>{channel, std::move(handler)};
}

// A send case: moves from `value` only if it completes; handler() runs then.
// The case refers to `value`, so pass it straight to select: a case made
// from a temporary (on_send(ch, std::string("x"))) and kept in a variable
// refers to a dead object by the time select runs (Clang warns, -Wdangling).
template <class T, class Clock, class F = detail::no_handler>
auto on_send(basic_channel<T, Clock>& channel, std::type_identity_t<T>& value WEFT_LIFETIMEBOUND,
             F handler = {}) {
  static_assert(std::is_invocable_v<F&>, "weft::on_send: the handler takes no arguments");
  return detail::send_case<T, Clock, F>{channel, value, std::move(handler)};
}
template <class T, class Clock, class F = detail::no_handler>
auto on_send(basic_channel<T, Clock>& channel, std::type_identity_t<T>&& value WEFT_LIFETIMEBOUND,
             F handler = {}) {
  return on_send(channel, static_cast<T&>(value), std::move(handler));
}

// Waits as long as it takes for one case.
template <class... Cases>
  requires detail::select_cases<Cases...>
select_result select(Cases&&... cases) {
  std::tuple<std::remove_cvref_t<Cases>...> all{std::forward<Cases>(cases)...};
  return detail::run_select<std::chrono::steady_clock, std::chrono::steady_clock::duration>(all, nullptr, nullptr,
                                                                                             false);
}

// Waits for one case, or until the token is cancelled.
template <class... Cases>
  requires detail::select_cases<Cases...>
select_result select(const cancel_token& token, Cases&&... cases) {
  std::tuple<std::remove_cvref_t<Cases>...> all{std::forward<Cases>(cases)...};
  return detail::run_select<std::chrono::steady_clock, std::chrono::steady_clock::duration>(
      all, detail::state_of(token), nullptr, false);
}

template <class Clock, class Duration, class... Cases>
  requires detail::select_cases<Cases...>
select_result select_until(const std::chrono::time_point<Clock, Duration>& deadline, Cases&&... cases) {
  std::tuple<std::remove_cvref_t<Cases>...> all{std::forward<Cases>(cases)...};
  const auto due = detail::clock_deadline(deadline);
  return detail::run_select(all, nullptr, &due, false);
}

template <class Rep, class Period, class... Cases>
  requires detail::select_cases<Cases...>
select_result select_for(std::chrono::duration<Rep, Period> timeout, Cases&&... cases) {
    return select_until(detail::deadline_after<std::chrono::steady_clock>(timeout),
                        std::forward<Cases>(cases)...);
}

// Go's select with `default`: completes a case that is ready now, or
// returns a result with index none.
template <class... Cases>
  requires detail::select_cases<Cases...>
select_result try_select(Cases&&... cases) {
  std::tuple<std::remove_cvref_t<Cases>...> all{std::forward<Cases>(cases)...};
  return detail::run_select<std::chrono::steady_clock, std::chrono::steady_clock::duration>(all, nullptr, nullptr,
                                                                                             true);
}

}  // namespace weft
