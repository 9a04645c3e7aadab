// SPDX-License-Identifier: BSL-1.0
// weft::wait_group: wait for a collection of tasks to finish. Go's
// sync.WaitGroup; in the standard library, a std::latch whose count can also
// go up.
//
// add(n) before starting n tasks, done() as each finishes, wait() until the
// count is zero. The count may return to zero and go up again (reuse);
// every wait that began while the count was above zero ends when it next
// reaches zero, even if another add() raises it again before the waiter runs.
//
// Errors: done() or add(-n) that would take the count below zero throws
// std::logic_error and leaves the count unchanged; a count above 2^32 - 1
// throws std::overflow_error.
//
// Thread safety: every member may be called concurrently. Destroying the
// wait_group while a thread waits on it is undefined (WEFT_ASSERT); pending
// async waits are destroyed without being completed. A waiter may destroy it
// as soon as wait() returns ok, even while the done() that released it is
// still returning: that done() touches the group no more.
//
// Memory ordering: everything a task did before its done() is visible to a
// waiter once wait() returns ok.
//
// Cost: add/done are one compare-and-swap; the last done() takes the queue's
// mutex only when someone waits. wait() on a zero count is one load.
//
// Example:
//   weft::wait_group pending;
//   for (auto& shard : shards) {
//     pending.add(1);
//     pool.post([&] { flush(shard); pending.done(); });
//   }
//   pending.wait();
#pragma once

#include <weft/cancel.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/wait_queue.hpp>
#include <weft/wait_status.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace weft {

struct wait_group_stats {
  std::int64_t count = 0;
  std::size_t waiters = 0;
  std::string_view name;  // as given to the constructor; empty if none
};

namespace detail {
struct wait_group_access;
}

template <class Clock = std::chrono::steady_clock>
class basic_wait_group {
 public:
  using clock = Clock;

  basic_wait_group() noexcept : queue_(this, &on_waiter_removed, "wait_group") {}
  // `name` shows in stats() and in the task registry, where a task blocked
  // in wait() is listed as blocked on `wait_group "name"`.
  explicit basic_wait_group(std::string_view name)
      : name_(detail::intern(name)), queue_(this, &on_waiter_removed, "wait_group", name_) {}

  std::string_view name() const noexcept { return name_ != nullptr ? std::string_view{name_} : std::string_view{}; }
  basic_wait_group(const basic_wait_group&) = delete;
  basic_wait_group& operator=(const basic_wait_group&) = delete;

  void add(std::int64_t delta = 1) {
    auto state = state_.load(std::memory_order_relaxed);
    for (;;) {
      // Checked before adding: current + delta may not fit an int64_t.
      const std::int64_t current = count_of(state);
      if (delta < -current) {
        throw std::logic_error("weft::wait_group: the count would go negative (" +
                               std::to_string(current) + " + " + std::to_string(delta) +
                               "); call done() once per add(1)");
      }
      if (delta > max_count - current) {
        throw std::overflow_error("weft::wait_group: the count would exceed 2^32 - 1");
      }
      const std::int64_t count = current + delta;
      auto next = (state & ~count_bits) | (static_cast<std::uint64_t>(count) << count_shift);
      // Reaching zero with waiters starts a new epoch: the waiters queued in
      // the old one are released, later ones are not. One release at a
      // time: an earlier one still under way is a few instructions from its
      // end (see release_waiters).
      const bool releases = count == 0 && (state & waiters_mark) != 0;
      if (releases && (state & releasing_mark) != 0) {
        wait_out_release();
        state = state_.load(std::memory_order_relaxed);
        continue;
      }
      if (releases) next = (next + epoch_one) | releasing_mark;
      if (state_.compare_exchange_weak(state, next, std::memory_order_acq_rel,
                                       std::memory_order_relaxed)) {
        if (releases) release_waiters();
        return;
      }
    }
  }

  void done() { add(-1); }

  // Blocks until the count is zero.
  void wait() {
    if (ready()) return;
    wait_in_queue<Clock, typename Clock::duration>(nullptr, nullptr);
  }

  // ok when the count reached zero; cancelled (or timeout, for a token's own
  // deadline) when the token was cancelled first.
  wait_status wait(const cancel_token& token) {
    if (ready()) return wait_status::ok;
    if (token.cancelled()) {
      return detail::state_of(token)->stop_status();
    }
    return wait_in_queue<Clock, typename Clock::duration>(detail::state_of(token), nullptr);
  }

  template <class Rep, class Period>
  wait_status wait_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_until(detail::deadline_after<Clock>(timeout));
  }

  template <class Duration>
  wait_status wait_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    if (ready()) return wait_status::ok;
    const auto due = detail::clock_deadline(deadline);
    if (Clock::now() >= due) return wait_status::timeout;
    return wait_in_queue(nullptr, &due);
  }

  // A snapshot. A zero read here comes after everything the tasks whose
  // done() brought the count there did (task_group::set_limit relies on
  // it to free the semaphore they released).
  std::int64_t count() const noexcept { return count_of(state_.load(std::memory_order_acquire)); }

  wait_group_stats stats() const noexcept { return {count(), queue_.size(), name()}; }

 private:
  friend struct detail::wait_group_access;

  // Bit 0: waiters are queued (set and cleared under the queue's mutex).
  // Bit 1: the done() that took the count to zero with waiters queued is
  // still releasing them. Bits 2-33: the count. Bits 34-63: the epoch,
  // bumped each time the count reaches zero while waiters are queued.
  static constexpr std::uint64_t waiters_mark = 1;
  static constexpr std::uint64_t releasing_mark = 2;
  static constexpr unsigned count_shift = 2;
  static constexpr std::int64_t max_count = 0xFFFF'FFFF;
  static constexpr std::uint64_t count_bits = std::uint64_t{0xFFFF'FFFF} << count_shift;
  static constexpr unsigned epoch_shift = 34;
  static constexpr std::uint64_t epoch_one = std::uint64_t{1} << epoch_shift;

  static std::int64_t count_of(std::uint64_t state) noexcept {
    return static_cast<std::int64_t>((state & count_bits) >> count_shift);
  }

  // True when the count is zero, once no release is under way.
  bool ready() const noexcept {
    const auto state = state_.load(std::memory_order_acquire);
    if (count_of(state) != 0) return false;
    if ((state & releasing_mark) != 0) wait_out_release();
    return true;
  }

  // Returns once no done() is releasing waiters. A waiter that sees the
  // count at zero may return and destroy the group, and the done() that
  // took it there with waiters queued touches the group until it clears
  // releasing_mark: a few instructions after the zero, around a short hold
  // of the queue's lock. So this spins, then yields.
  void wait_out_release() const noexcept {
    detail::spin_until(
        [this] { return (state_.load(std::memory_order_acquire) & releasing_mark) == 0; });
  }

  // With the queue's mutex held: true if the count is zero, else marks the
  // state and queues `node`, tagged with the current epoch.
  bool ready_or_enqueue(detail::wait_node& node) noexcept {
    auto state = state_.load(std::memory_order_acquire);
    for (;;) {
      if (count_of(state) == 0) return true;
      if ((state & waiters_mark) != 0 ||
          state_.compare_exchange_weak(state, state | waiters_mark, std::memory_order_acquire)) {
        node.request = static_cast<std::ptrdiff_t>(state >> epoch_shift);
        queue_.push_back(node);
        return false;
      }
    }
  }

  // Called by the done() whose count reached zero with waiters queued, with
  // releasing_mark set; clearing it is its last touch of the group, and the
  // released waiters are completed after that, from this stack.
  void release_waiters() noexcept {
    detail::completion_list released;
    {
      auto lock = queue_.lock();
      const auto epoch =
          static_cast<std::ptrdiff_t>(state_.load(std::memory_order_acquire) >> epoch_shift);
      while (detail::wait_node* head = queue_.front()) {
        if (head->request == epoch) break;  // queued after the count went up again
        queue_.remove(*head, wait_status::ok, released);
      }
      if (queue_.empty()) state_.fetch_and(~waiters_mark, std::memory_order_relaxed);
    }
    state_.fetch_and(~releasing_mark, std::memory_order_release);
  }

  static void on_waiter_removed(void* self, detail::completion_list&) noexcept {
    auto& group = *static_cast<basic_wait_group*>(self);
    if (group.queue_.empty()) group.state_.fetch_and(~waiters_mark, std::memory_order_relaxed);
  }

  template <class WaitClock, class Duration>
  wait_status wait_in_queue(detail::cancel_state* cancel, const std::chrono::time_point<WaitClock, Duration>* deadline) {
    detail::thread_waiter waiter;
    auto lock = queue_.lock();
    if (ready_or_enqueue(waiter)) {
      lock.unlock();
      wait_out_release();
      return wait_status::ok;
    }
    const auto status = queue_.wait(waiter, lock, cancel, deadline);
    // The done() that released this waiter is done with the group; one that
    // took the count to zero again meanwhile may not be.
    if (status == wait_status::ok) wait_out_release();
    return status;
  }

  const char* const name_ = nullptr;  // interned, for the registry; null if unnamed
  std::atomic<std::uint64_t> state_{0};
  detail::wait_queue queue_;
};

using wait_group = basic_wait_group<>;

}  // namespace weft
