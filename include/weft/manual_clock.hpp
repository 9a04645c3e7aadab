// SPDX-License-Identifier: BSL-1.0
// weft::manual_clock: a clock that moves only when a test moves it.
//
// Every weft primitive that waits takes a Clock template parameter (default
// std::chrono::steady_clock); two timers run on steady_clock only: a
// pipeline's batch(n, max_delay) and gather_for. Instantiate it with
// manual_clock in a test and time-dependent behaviour (deadlines, timeouts)
// becomes deterministic: nothing sleeps, and `advance()` fires every deadline
// it passes before it returns, on the calling thread. A waiter woken that way
// may still be on its way out of the wait when advance() returns; join it (or
// wait on a latch) as usual.
//
// It meets the Cpp17TrivialClock requirements with one process-wide time,
// starting at zero. There is no Go analogue; Go tests use fake clocks such as
// `k8s.io/utils/clock/testing`.
//
// Thread safety: every member may be called concurrently. advance() and
// set() serialise with each other; now() is one atomic load.
//
// Example:
//   weft::basic_semaphore<weft::manual_clock> sem{1};
//   sem.acquire();
//   std::thread t{[&] { CHECK(sem.acquire_for(1, 5s) == weft::wait_status::timeout); }};
//   // ... once t waits:
//   weft::manual_clock::advance(5s);   // t's deadline fires now
//   t.join();
#pragma once

#include <weft/detail/never_destroyed.hpp>
#include <weft/detail/timer_queue.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <stdexcept>

namespace weft {

class manual_clock {
 public:
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<manual_clock>;
  static constexpr bool is_steady = true;

  static time_point now() noexcept {
    return time_point{duration{state().now.load(std::memory_order_acquire)}};
  }

  // Moves time forward by `by` (a negative amount is an error) and fires the
  // deadlines that have come.
  static void advance(duration by) {
    if (by < duration::zero()) throw_backwards();
    std::lock_guard lock(state().advancing);
    state().now.fetch_add(by.count(), std::memory_order_acq_rel);
    timers().fire_due(now());
  }

  // Sets the time; it may not go backwards (a steady clock never does).
  static void set(time_point to) {
    std::lock_guard lock(state().advancing);
    if (to < now()) throw_backwards();
    state().now.store(to.time_since_epoch().count(), std::memory_order_release);
    timers().fire_due(now());
  }

  // The deadlines waiting for time to move; weft's internals schedule here.
  static detail::timer_queue<manual_clock>& timers() noexcept { return state().timers; }

  // How many deadlines are waiting: lets a test wait until a thread has
  // really begun its timed wait before it advances time.
  static std::size_t pending_timers() { return timers().size(); }

 private:
  struct shared_state {
    std::atomic<std::int64_t> now{0};
    std::mutex advancing;
    detail::timer_queue<manual_clock> timers;
  };

  // Never destroyed: a pool made before the clock's first use joins its
  // workers after the exit has destroyed the statics made later, and their
  // tasks may still read the clock or make deadlines on it.
  static shared_state& state() noexcept {
    static detail::never_destroyed<shared_state> instance;
    return instance.get();
  }

  [[noreturn]] static void throw_backwards() {
    throw std::invalid_argument("weft::manual_clock: time may only move forward");
  }
};

}  // namespace weft
