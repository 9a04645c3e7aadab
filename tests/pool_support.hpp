// SPDX-License-Identifier: BSL-1.0
// Test helpers that need a weft::worker_pool.
#pragma once

#include <weft/cancel.hpp>
#include <weft/worker_pool.hpp>

#include <future>
#include <utility>

namespace weft_test {

// Holds the only worker of `pool` in a task until `released` is cancelled,
// and returns once the worker runs that task; then fills the first `queued`
// slots of the queue with tasks that do nothing. What the test posts next
// waits behind them.
inline void hold_only_worker(weft::worker_pool& pool, const weft::cancel_token& released,
                             int queued = 0) {
  // The task owns the promise: nothing on this stack is touched once the
  // future is ready.
  std::promise<void> running;
  auto started = running.get_future();
  pool.post([running = std::move(running), released]() mutable {
    running.set_value();
    released.wait();
  });
  started.wait();
  for (int i = 0; i < queued; ++i) pool.post([] {});
}

}  // namespace weft_test
