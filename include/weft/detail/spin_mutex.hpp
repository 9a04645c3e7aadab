// SPDX-License-Identifier: BSL-1.0
// detail::spin_mutex: a lock for critical sections of a few instructions.
//
// cancel_state holds its lock only to link or unlink a callback node and to
// publish a cause, never while a callback runs. For that, std::mutex's
// unlock (an atomic read-modify-write, to learn whether to wake a sleeper)
// is a third of the cost of a cancel cycle; here unlock is a plain release
// store. A waiter backs off like every weft waiter (detail::backoff), then
// keeps yielding its core, so a holder preempted mid-section gets to run. Meets Lockable, so
// std::lock_guard and std::unique_lock work with it.
#pragma once

#include <weft/detail/backoff.hpp>

#include <atomic>
#include <thread>

namespace weft::detail {

class spin_mutex {
 public:
  spin_mutex() = default;
  spin_mutex(const spin_mutex&) = delete;
  spin_mutex& operator=(const spin_mutex&) = delete;

  void lock() noexcept {
    for (backoff pause; !try_lock();) {
      while (locked_.load(std::memory_order_relaxed)) {
        if (!pause.wait()) std::this_thread::yield();  // past the budget: keep yielding
      }
    }
  }

  bool try_lock() noexcept { return !locked_.exchange(true, std::memory_order_acquire); }

  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

}  // namespace weft::detail
