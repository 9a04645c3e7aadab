// SPDX-License-Identifier: BSL-1.0
// detail::wait_completed_until: park on a parker until it is completed or a
// deadline on any clock passes.
//
// Real clocks (steady, system, or any clock without its own timers) use the
// futex timeout, re-reading the clock after every wake, so a clock that jumps
// is honoured at the next wake-up. A clock with its own timers (the manual
// clock) gets a timer node that pokes the parker when the clock is advanced.
#pragma once

#include <weft/detail/deadline.hpp>
#include <weft/detail/parker.hpp>
#include <weft/detail/timer_queue.hpp>

#include <chrono>

namespace weft::detail {

// Returns true when the parker was completed, false when the deadline passed
// first. After false the parker may still be completed later by whoever owns
// the operation; the caller must settle that before it destroys the parker.
template <class Clock, class Duration>
bool wait_completed_until(parker& waiter,
                          const std::chrono::time_point<Clock, Duration>& given_deadline) {
  const auto deadline = clock_deadline(given_deadline);
  if constexpr (clock_with_own_timers<Clock>) {
    struct poke_timer : timer_node<Clock> {
      parker* target = nullptr;
    } timer;
    timer.deadline = deadline;
    timer.target = &waiter;
    timer.fire = [](timer_node<Clock>& node) noexcept { static_cast<poke_timer&>(node).target->poke(); };
    schedule_timer(timer);
    bool completed = false;
    for (;;) {
      if (waiter.is_completed()) {
        completed = true;
        break;
      }
      if (Clock::now() >= deadline) break;
      if (waiter.wait() & parker::poked_bit) waiter.clear_poke();
    }
    cancel_timer(timer);
    return completed;
  } else {
    for (;;) {
      if (waiter.is_completed()) return true;
      const auto now = Clock::now();
      if (now >= deadline) return false;
      // Long waits are cut into a day at a time so no conversion overflows.
      const auto remaining = deadline - now;
      const auto one_day = std::chrono::hours{24};
      waiter.wait(remaining > one_day ? std::chrono::nanoseconds{one_day}
                                      : std::chrono::ceil<std::chrono::nanoseconds>(remaining));
    }
  }
}

}  // namespace weft::detail
