// SPDX-License-Identifier: BSL-1.0
// Helpers shared by weft's tests.
#pragma once

#include <weft/cancel.hpp>
#include <weft/semaphore.hpp>
#include <weft/wait_status.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

namespace weft {
// Lets doctest print a wait_status by name (found by argument-dependent
// lookup).
inline doctest::String toString(wait_status status) { return to_string(status); }
}  // namespace weft

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

// Thread counts for concurrent cases, the same on every machine.
inline constexpr int fixed_thread_counts[] = {1, 2, 3, 8, 16};

// The types every clock declares, for a test's own clock, which derives
// from clock_types<itself> and adds is_steady and now().
template <class Clock, class Duration = std::chrono::nanoseconds>
struct clock_types {
  using duration = Duration;
  using rep = typename Duration::rep;
  using period = typename Duration::period;
  using time_point = std::chrono::time_point<Clock, Duration>;
};

// Waits, yielding, until `condition` holds: a hand-off, never a sleep. A hang
// is caught by the test's timeout.
template <class Condition>
void spin_until(Condition condition) {
  while (!condition()) std::this_thread::yield();
}

// Yields until `condition` holds. The 30 s bound only turns a lost wake-up
// into a failure instead of a hang; no test relies on it for timing.
template <class Condition>
[[nodiscard]] bool eventually(Condition&& condition) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds{30};
  while (!condition()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::yield();
  }
  return true;
}

// Whether exactly `count` acquires wait on `sem`, within eventually()'s
// bound.
template <class Semaphore>
[[nodiscard]] bool waiters_reach(const Semaphore& sem, std::size_t count) {
  return eventually([&] { return sem.stats().waiters == count; });
}

// Who got permits, in the order they were granted, with the permits they
// hold until the test drops them.
template <class Semaphore = weft::semaphore>
class grant_log {
 public:
  void record(int who, typename Semaphore::permit permit = {}) {
    std::lock_guard lock(mutex_);
    order_.push_back(who);
    permits_.push_back(std::move(permit));
  }
  std::vector<int> order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }
  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return order_.size();
  }
  // Takes the permits of the grant at `index` out of the log.
  typename Semaphore::permit take(std::size_t index) {
    std::lock_guard lock(mutex_);
    return std::move(permits_.at(index));
  }
  void drop_permits() {
    std::lock_guard lock(mutex_);
    permits_.clear();
  }

 private:
  mutable std::mutex mutex_;
  std::vector<int> order_;
  std::vector<typename Semaphore::permit> permits_;
};

// Opened once by the test; tasks block on it through a copy of `closed`, so
// the gate may be destroyed while one is leaving wait(). (A cancel token,
// not a std::shared_future: libc++'s reference count for the future's state
// is in the uninstrumented runtime, and TSan then reports its free.)
struct gate {
  weft::cancel_source source;
  weft::cancel_token closed = source.token();
  void open() { source.cancel(); }
};

// How many cancel callbacks are registered on `token`: a waiter parked
// with the token holds one, and none are left once every waiter returned.
inline std::size_t callbacks_on(const weft::cancel_token& token) {
  return weft::detail::state_of(token)->callback_count();
}

// Calls in flight now (between enter() and leave()), and the most there
// ever were: the peak a test checks a concurrency limit against.
struct high_water {
  std::atomic<int> now{0};
  std::atomic<int> most{0};
  void enter() {
    const int n = now.fetch_add(1) + 1;
    for (int seen = most.load(); n > seen && !most.compare_exchange_weak(seen, n);) {
    }
  }
  void leave() { now.fetch_sub(1); }
};

// A deadline on `Clock` a thousand years on, in seconds: a unit coarser
// than the clock's, so converting it to the clock's without saturating
// overflows.
template <class Clock>
auto thousand_years_on_in_seconds() {
  return std::chrono::time_point_cast<std::chrono::seconds>(Clock::now()) +
         std::chrono::hours{24 * 365 * 1000};
}

// Runs `wait` on a thread of its own; once it has returned or `parked()`
// holds, calls `release()`, then returns what `wait` returned.
template <class Wait, class Parked, class Release>
auto wait_on_thread(Wait wait, Parked parked, Release release) {
  std::atomic<bool> returned{false};
  decltype(wait()) result{};
  std::thread waiter([&] {
    result = wait();
    returned = true;
  });
  spin_until([&] { return returned.load() || parked(); });
  release();
  waiter.join();
  return result;
}

// A value whose n-th move out of it (counting the moves of the objects it
// was moved to), once armed, stops until `stall` is set: a channel's sender
// held between claiming a slot and publishing its value (the first move,
// into the ring), or a receiver between claiming a slot and freeing it
// (the second, out of the ring).
struct stalling_move {
  explicit stalling_move(int v = 0) : value(v) {}
  stalling_move(stalling_move&& other) noexcept { take(other); }
  stalling_move& operator=(stalling_move&& other) noexcept {
    take(other);
    return *this;
  }

  void arm(int nth_move, std::atomic<bool>& entered_flag, std::atomic<bool>& stall_until) {
    moves_left = nth_move;
    entered = &entered_flag;
    stall = &stall_until;
  }

  int value = 0;
  int moves_left = 0;
  std::atomic<bool>* entered = nullptr;
  std::atomic<bool>* stall = nullptr;

 private:
  void take(stalling_move& other) noexcept {
    value = other.value;
    if (other.moves_left == 0) return;
    if (other.moves_left == 1) {
      other.entered->store(true);
      spin_until([&] { return other.stall->load(); });
      return;
    }
    moves_left = other.moves_left - 1;
    entered = other.entered;
    stall = other.stall;
  }
};

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

// Sends what this process writes to stderr (file descriptor 2) to a
// temporary file until text() is called, or the capture is destroyed.
class stderr_capture {
 public:
  stderr_capture() : file_(std::tmpfile()) {
    if (file_ == nullptr) throw std::runtime_error("stderr_capture: no temporary file");
    std::fflush(stderr);
    saved_ = ::dup(2);
    if (saved_ < 0 || ::dup2(::fileno(file_), 2) < 0) {
      if (saved_ >= 0) ::close(saved_);
      std::fclose(file_);
      throw std::runtime_error("stderr_capture: cannot redirect stderr");
    }
  }
  stderr_capture(const stderr_capture&) = delete;
  stderr_capture& operator=(const stderr_capture&) = delete;
  ~stderr_capture() {
    restore();
    std::fclose(file_);
  }

  // Ends the capture; returns what was written.
  std::string text() {
    restore();
    std::string out;
    std::rewind(file_);
    for (int c; (c = std::fgetc(file_)) != EOF;) out.push_back(static_cast<char>(c));
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
  }

  std::FILE* file_;
  int saved_ = -1;
};

}  // namespace weft_test
