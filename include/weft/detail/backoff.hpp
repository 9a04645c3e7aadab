// SPDX-License-Identifier: BSL-1.0
// detail::backoff: the bounded wait a waiter spends before it queues or
// parks.
//
// Waking a parked thread costs 5-20 us on virtual machines, while what a
// waiter waits for usually comes within a microsecond on a busy system. So a
// waiter first polls with a pause instruction (WEFT_SPIN_LIMIT times), then
// yields its core a few times (WEFT_YIELD_LIMIT): when threads outnumber
// cores, the thread that will release is often waiting for this very core,
// and a yield lets it run where more spinning would only keep it out.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/futex.hpp>

#include <thread>

namespace weft::detail {

class backoff {
 public:
  backoff() = default;
  // For a wait whose end is usually on its way (see WEFT_WORKER_SPIN_LIMIT).
  explicit backoff(int spin_limit) noexcept : spin_limit_(spin_limit) {}

  // Waits a little; returns false once the budget is spent.
  bool wait() noexcept {
    if (spins_ < spin_limit_) {
      ++spins_;
      cpu_relax();
      return true;
    }
    if (yields_ < WEFT_YIELD_LIMIT) {
      ++yields_;
      std::this_thread::yield();
      return true;
    }
    return false;
  }

 private:
  int spin_limit_ = WEFT_SPIN_LIMIT;
  int spins_ = 0;
  int yields_ = 0;
};

// Returns once done() holds: spins, then keeps yielding. For waits that
// last a few instructions, or a short hold of a lock, on another thread
// (an operation that let a waiter through and is still returning).
template <class Done>
void spin_until(Done done) noexcept {
  for (backoff pause; !done();) {
    if (!pause.wait()) std::this_thread::yield();
  }
}

}  // namespace weft::detail
