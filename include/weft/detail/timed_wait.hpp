// SPDX-License-Identifier: BSL-1.0
// detail::wait_completed_until: park on a parker until it is completed or a
// deadline on any clock passes.
//
// Real clocks (steady, system, or any clock without its own timers) use the
// futex timeout, re-reading the clock after every wake, so a clock that jumps
// is honoured at the next wake-up. A clock with its own timers (the manual
// clock) gets a timer node that pokes the parker when the clock is advanced;
// should scheduling it fail (its timer heap cannot grow), the waits that
// call this are noexcept, so the wait reads the clock every millisecond
// instead: a deadline seen up to a millisecond late, never missed.
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
    bool scheduled = true;
    try {
      schedule_timer(timer);
    } catch (...) {
      scheduled = false;
    }
    bool completed = false;
    for (;;) {
      if (waiter.is_completed()) {
        completed = true;
        break;
      }
      if (Clock::now() >= deadline) break;
      if (!scheduled) {
        waiter.wait(std::chrono::milliseconds{1});
      } else if (waiter.wait() & parker::poked_bit) {
        waiter.clear_poke();
      }
    }
    if (scheduled) cancel_timer(timer);
    return completed;
  } else {
    for (;;) {
      if (waiter.is_completed()) return true;
      const auto now = Clock::now();
      if (now >= deadline) return false;
      // Long waits are cut into a day at a time so no conversion overflows.
      // Nor the subtraction: deadline - now overflows for a clock read
      // before its epoch and a far deadline, so it is taken only once it is
      // known to be within a day.
      const auto one_day = std::chrono::hours{24};
      const bool far = now <= Clock::time_point::max() - one_day && deadline > now + one_day;
      waiter.wait(far ? std::chrono::nanoseconds{one_day}
                      : std::chrono::ceil<std::chrono::nanoseconds>(deadline - now));
    }
  }
}

}  // namespace weft::detail
