// SPDX-License-Identifier: BSL-1.0
// detail::invocation_tracker: std::stop_callback's removal rule, reusable.
//
// A container of callbacks (cancel_state's callback list, timer_queue's heap)
// invokes each callback after unlinking it and releasing its own mutex, so a
// callback may take other locks, register callbacks, or destroy its own
// registration. Whoever removes a registration while its callback runs on
// another thread must wait for that invocation to finish before the memory
// the callback uses may go; from inside the callback itself it must not wait
// (that would deadlock), and the invoker must then not touch the node again.
//
// All members except the futex word are guarded by the container's mutex,
// which every function here expects to be held by the caller.
#pragma once

#include <weft/detail/futex.hpp>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>

namespace weft::detail {

class invocation_tracker {
 public:
  void begin(const void* node) noexcept {
    running_ = node;
    running_thread_ = std::this_thread::get_id();
  }

  // Ends the invocation begun last and wakes removers waiting for it.
  void end() noexcept {
    running_ = nullptr;
    if (waiting_removers_ != 0) {
      finished_.fetch_add(1, std::memory_order_release);
      futex_wake_all(finished_);
    }
  }

  // Called by a remover that did not find `node` in the container. Returns
  // once `node`'s callback is not running, or at once when the caller is that
  // callback. May unlock and relock `lock` while it waits.
  template <class Mutex>
  void wait_until_not_running(const void* node, std::unique_lock<Mutex>& lock) noexcept {
    while (running_ == node && running_thread_ != std::this_thread::get_id()) {
      const auto seen = finished_.load(std::memory_order_acquire);
      ++waiting_removers_;
      lock.unlock();
      futex_wait(finished_, seen);
      lock.lock();
      --waiting_removers_;
    }
  }

 private:
  const void* running_ = nullptr;
  std::thread::id running_thread_;
  unsigned waiting_removers_ = 0;
  std::atomic<std::uint32_t> finished_{0};
};

}  // namespace weft::detail
