// SPDX-License-Identifier: BSL-1.0
// Helpers shared by weft's tests.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <future>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

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

// A reusable barrier on a mutex and a condition variable. Not std::barrier:
// libc++'s changes phase inside the uninstrumented libc++.so, so
// ThreadSanitizer would not see the hand-off it makes.
class round_barrier {
 public:
  explicit round_barrier(std::size_t parties) : parties_(parties) {}

  round_barrier(const round_barrier&) = delete;
  round_barrier& operator=(const round_barrier&) = delete;

  void arrive_and_wait() {
    std::unique_lock lock(mutex_);
    const std::uint64_t phase = phase_;
    if (++arrived_ == parties_) {
      arrived_ = 0;
      ++phase_;
      lock.unlock();
      changed_.notify_all();
      return;
    }
    changed_.wait(lock, [&] { return phase_ != phase; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  const std::size_t parties_;
  std::size_t arrived_ = 0;
  std::uint64_t phase_ = 0;
};

// Keeps futures whose results nobody reads until it is destroyed. Declared
// before the pool that fulfils them, it drops the last reference to each
// shared state after the pool has joined its workers. A future dropped
// before its task ran leaves the free of the state to whichever thread
// releases it last, through libc++'s reference count, which ThreadSanitizer
// cannot see: a false race with the worker's set_value (get() avoids it by
// taking the state's mutex). Thread-safe.
class future_sink {
 public:
  void keep(std::future<void> future) {
    std::lock_guard lock(mutex_);
    futures_.push_back(std::move(future));
  }

 private:
  std::mutex mutex_;
  std::vector<std::future<void>> futures_;
};

}  // namespace weft_test
