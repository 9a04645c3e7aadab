// SPDX-License-Identifier: BSL-1.0
// worker_pool::post(f, token) on a full pool spins before it parks, for up
// to WEFT_YIELD_LIMIT yields (80 us on the 2-vCPU VM). A token cancelled
// during the spin must end the wait: the spin used to ignore the token, so
// room that freed after the cancellation still took the task, and post
// returned ok.
//
// A process of its own: it builds weft with a spin that never ends
// (WEFT_YIELD_LIMIT as large as an int holds; a config macro must be the
// same in every translation unit of a program), so that the producer is
// still spinning when the token is cancelled, and room frees only once
// post has returned. Exits 0 when post returned cancelled and never ran
// the task, 1 otherwise (also when post has not returned within a minute:
// the spin missed the cancellation).
#define WEFT_YIELD_LIMIT 2147483647
#include <weft/cancel.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <latch>
#include <thread>

int main() {
  std::atomic<bool> opened{false};
  std::atomic<bool> ran{false};
  int result = 0;
  {
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
    std::latch holding{1};
    pool.post([&] {
      holding.count_down();
      opened.wait(false);
    });
    holding.wait();
    pool.post([] {});  // the queue is full from here until `opened`

    weft::cancel_source source;
    std::latch started{1};
    std::promise<weft::wait_status> status;
    std::thread producer([&] {
      started.count_down();
      status.set_value(pool.post([&] { ran = true; }, source.token()));
    });
    started.wait();
    source.cancel();
    auto returned = status.get_future();
    // A watchdog, not a hand-off: a correct post returns at once.
    if (returned.wait_for(std::chrono::minutes(1)) != std::future_status::ready) {
      std::printf("FAIL: post(f, token) still waits for room after its token was cancelled\n");
      result = 1;
    }
    opened = true;
    opened.notify_all();
    producer.join();
    if (result == 0 && returned.get() != weft::wait_status::cancelled) {
      std::printf("FAIL: post(f, token) did not return cancelled\n");
      result = 1;
    }
  }
  if (ran.load()) {
    std::printf("FAIL: the task of a cancelled post ran\n");
    result = 1;
  }
  return result;
}
