// SPDX-License-Identifier: BSL-1.0
// A wait with a token spins before it queues, for up to WEFT_YIELD_LIMIT
// yields (80 us on the 2-vCPU VM). A token cancelled during the spin must
// end the wait: the spins of worker_pool::post(f, token),
// semaphore::acquire(n, token), channel::send(v, token) and
// channel::recv(token) used to ignore the token, so room, a permit or a
// value that came after the cancellation was still taken, and the wait
// returned ok.
//
// A process of its own: it builds weft with a spin that never ends
// (WEFT_YIELD_LIMIT as large as an int holds; a config macro must be the
// same in every translation unit of a program), so that each wait is still
// spinning when its token is cancelled, and what it waits for comes only
// once it has returned. Exits 0 when every wait returned cancelled and took
// nothing, 1 otherwise (also when a wait has not returned within a minute
// of its cancellation: its spin missed it).
#define WEFT_YIELD_LIMIT 2147483647
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/semaphore.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <latch>
#include <thread>

namespace {

// Runs `wait` (which takes the token and returns a wait_status) on a thread
// of its own, cancels its token once the thread has started, and, once the
// wait has returned (or a minute has passed), calls `unblock`, which must
// end any wait still running. True if the wait returned cancelled.
template <class Wait, class Unblock>
bool cancelled_while_spinning(const char* what, Wait wait, Unblock unblock) {
  weft::cancel_source source;
  std::latch started{1};
  std::promise<weft::wait_status> status;
  std::thread waiter([&] {
    started.count_down();
    status.set_value(wait(source.token()));
  });
  started.wait();
  source.cancel();
  auto returned = status.get_future();
  // A watchdog, not a hand-off: a correct wait returns at once.
  const bool in_time = returned.wait_for(std::chrono::minutes(1)) == std::future_status::ready;
  unblock();
  waiter.join();
  if (!in_time) {
    std::printf("FAIL: %s still waits after its token was cancelled\n", what);
    return false;
  }
  if (const auto got = returned.get(); got != weft::wait_status::cancelled) {
    std::printf("FAIL: %s returned %s, not cancelled\n", what, weft::to_string(got));
    return false;
  }
  return true;
}

bool pool_post() {
  std::atomic<bool> opened{false};
  std::atomic<bool> ran{false};
  bool held = false;
  {
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
    std::latch holding{1};
    pool.post([&] {
      holding.count_down();
      opened.wait(false);
    });
    holding.wait();
    pool.post([] {});  // the queue is full until `opened`
    held = cancelled_while_spinning(
        "worker_pool::post(f, token)",
        [&](const weft::cancel_token& token) { return pool.post([&] { ran = true; }, token); },
        [&] {
          opened = true;
          opened.notify_all();
        });
  }
  if (ran.load()) {
    std::printf("FAIL: the task of a cancelled worker_pool::post ran\n");
    return false;
  }
  return held;
}

bool semaphore_acquire() {
  weft::semaphore permits{1};
  permits.acquire();
  const bool held = cancelled_while_spinning(
      "semaphore::acquire(1, token)",
      [&](const weft::cancel_token& token) { return permits.acquire(1, token); },
      [&] { permits.release(); });
  // The cancelled acquire took nothing: the one permit is free.
  if (!permits.try_acquire(1) || permits.try_acquire(1)) {
    std::printf("FAIL: a cancelled semaphore::acquire took a permit\n");
    return false;
  }
  return held;
}

bool channel_send() {
  weft::channel<int> values{1};
  if (!values.try_send(1)) return false;
  const bool held = cancelled_while_spinning(
      "channel::send(v, token)",
      [&](const weft::cancel_token& token) { return values.send(2, token); },
      [&] { (void)values.try_recv(); });
  if (values.try_recv().has_value()) {
    std::printf("FAIL: a cancelled channel::send queued its value\n");
    return false;
  }
  return held;
}

bool channel_recv() {
  weft::channel<int> values{1};
  const bool held = cancelled_while_spinning(
      "channel::recv(token)",
      [&](const weft::cancel_token& token) { return values.recv(token).status(); },
      [&] { (void)values.try_send(1); });
  if (values.try_recv() != 1) {
    std::printf("FAIL: a cancelled channel::recv took a value\n");
    return false;
  }
  return held;
}

}  // namespace

int main() {
  const bool pool_ok = pool_post();
  const bool semaphore_ok = semaphore_acquire();
  const bool send_ok = channel_send();
  const bool recv_ok = channel_recv();
  return pool_ok && semaphore_ok && send_ok && recv_ok ? 0 : 1;
}
