// SPDX-License-Identifier: BSL-1.0
// Helpers shared by weft's tests.
#pragma once

#include <thread>

namespace weft_test {

// Sanitizer builds run several times slower; stress loops scale down there.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool under_sanitizer = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool under_sanitizer = true;
#else
inline constexpr bool under_sanitizer = false;
#endif
#else
inline constexpr bool under_sanitizer = false;
#endif

// ThreadSanitizer alone, which slows threads far more than AddressSanitizer.
#if defined(__SANITIZE_THREAD__)
inline constexpr bool under_tsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool under_tsan = true;
#else
inline constexpr bool under_tsan = false;
#endif
#else
inline constexpr bool under_tsan = false;
#endif

// Waits, yielding, until `condition` holds: a hand-off, never a sleep. A hang
// is caught by the test's timeout.
template <class Condition>
void spin_until(Condition condition) {
  while (!condition()) std::this_thread::yield();
}

}  // namespace weft_test
