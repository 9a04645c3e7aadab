// SPDX-License-Identifier: BSL-1.0
// detail::deadline_after: the deadline of every *_for(timeout), and
// detail::clock_deadline: the deadline of every *_until(time_point); and
// detail::waited_ns, what a wait's statistics add up.
//
// `Clock::now() + timeout` overflows for long timeouts (seconds::max() is
// converted to nanoseconds before it is added), and the wrapped sum lies in
// the past, so a wait meant to be unbounded would time out at once. So does
// a far time_point in a coarser unit than the clock's (a deadline in
// seconds, a thousand years on), converted or compared to the clock's. The
// deadline saturates at time_point::max() instead, which every wait treats
// as a deadline that never comes.
#pragma once

#include <chrono>
#include <cstdint>
#include <ratio>
#include <type_traits>
#include <utility>

namespace weft::detail {

// Now plus `timeout`, rounded up to the clock's tick so a wait is never
// shorter than asked, or time_point::max() where that would not fit. A zero
// or negative timeout gives now: a deadline that has already passed.
template <class Clock, class Rep, class Period>
typename Clock::time_point deadline_after(std::chrono::duration<Rep, Period> timeout) {
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;
  const time_point now = Clock::now();
  if (timeout <= timeout.zero()) return now;
  // A clock read before its epoch has more room than a duration can hold.
  const duration room =
      now.time_since_epoch() < duration::zero() ? duration::max() : time_point::max() - now;
  // Each branch compares in the coarser of the two units, where converting
  // only divides, so the comparison itself cannot overflow.
  using ticks_per_unit = std::ratio_divide<Period, typename duration::period>;
  if constexpr (std::is_integral_v<Rep> && ticks_per_unit::den == 1) {
    if (std::cmp_greater(timeout.count(), room.count() / ticks_per_unit::num))
      return time_point::max();
    return now + std::chrono::duration_cast<duration>(timeout);
  } else if constexpr (std::is_integral_v<Rep> && ticks_per_unit::num == 1) {
    const auto whole = timeout.count() / ticks_per_unit::den;
    const bool part = timeout.count() % ticks_per_unit::den != 0;
    if (std::cmp_greater(whole, room.count()) || (std::cmp_equal(whole, room.count()) && part)) {
      return time_point::max();
    }
    return now + duration{static_cast<typename duration::rep>(whole + part)};
  } else {
    // Floating-point counts, and units that are no whole multiple of each
    // other: long double decides the clear cases (NaN waits forever), ticks
    // the close one.
    using long_ticks = std::chrono::duration<long double, typename duration::period>;
    const long_ticks wanted = timeout;
    if (!(wanted < long_ticks{room})) return time_point::max();
    const duration ticks = std::chrono::ceil<duration>(wanted);
    return ticks > room ? time_point::max() : now + ticks;
  }
}

// `deadline` in the clock's own unit: rounded up to the clock's tick, so a
// wait is never shorter than asked (as the clock measures it: a clock whose
// reading lags, as a coarse one does, ends a wait as early as it lags),
// and saturated at the clock's range.
template <class Clock, class Duration>
typename Clock::time_point clock_deadline(
    const std::chrono::time_point<Clock, Duration>& deadline) {
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;
  if constexpr (std::is_same_v<Duration, duration>) {
    return deadline;
  } else {
    // long double decides whether it fits (NaN never comes), and is rounded
    // up to ticks: converted in its own Rep, a far deadline overflows there
    // (float seconds round up past the clock's range; a count of 1/1024 s
    // is multiplied before it is divided) and lands in the past.
    using long_ticks = std::chrono::duration<long double, typename duration::period>;
    const long_ticks wanted = deadline.time_since_epoch();
    if (!(wanted < long_ticks{duration::max()})) return time_point::max();
    if (!(wanted > long_ticks{duration::min()})) return time_point::min();
    return time_point{std::chrono::ceil<duration>(wanted)};
  }
}

// How long a wait took, from two readings of its clock, in nanoseconds for
// a wait's statistics: never negative, as a clock that can be set back
// (system_clock) may read less at the end of a wait than at its start.
template <class Duration>
std::int64_t waited_ns(Duration waited) noexcept {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count();
  return ns > 0 ? ns : 0;
}

}  // namespace weft::detail
