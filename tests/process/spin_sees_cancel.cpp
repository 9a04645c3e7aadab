// SPDX-License-Identifier: BSL-1.0
// A wait with a token or a deadline spins before it queues, for up to
// WEFT_YIELD_LIMIT yields (80 us on the 2-vCPU VM; a time slice each on a
// loaded machine). A token cancelled, or a deadline passed, during the spin
// must end the wait: the spins of worker_pool::post(f, token),
// semaphore::acquire(n, token) and acquire_until, and channel send and recv
// with a token or a deadline used to go on, so room, a permit or a value
// that came afterwards was still taken, and the wait returned ok.
//
// A process of its own: it builds weft with a spin that never ends
// (WEFT_YIELD_LIMIT as large as an int holds; a config macro must be the
// same in every translation unit of a program), so that each wait is still
// spinning when it is told to stop, and what it waits for comes only once
// it has returned. Each scenario runs several rounds: a round whose stop
// comes before the wait has begun to spin passes on the wait's first check,
// and shows nothing. Exits 0 when every wait returned cancelled (timeout for
// a deadline) and took nothing, 1 otherwise (also when a wait has not
// returned within 10 seconds of its stop: its spin missed it).
#define WEFT_YIELD_LIMIT 2147483647
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/semaphore.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <latch>
#include <thread>

namespace {

using namespace std::chrono_literals;
using weft::wait_status;

constexpr int rounds = 20;

// Runs `wait` on a thread of its own, calls `stop` once the thread has
// started, and, once the wait has returned (or 10 seconds have passed),
// calls `unblock`, which must end any wait still running. True if the wait
// returned `expected`.
template <class Wait, class Stop, class Unblock>
bool stops_while_spinning(const char* what, wait_status expected, Wait wait, Stop stop,
                          Unblock unblock) {
  std::latch started{1};
  std::promise<wait_status> status;
  std::thread waiter([&] {
    started.count_down();
    status.set_value(wait());
  });
  started.wait();
  stop();
  auto returned = status.get_future();
  // A watchdog, not a hand-off: a correct wait returns at once.
  const bool in_time = returned.wait_for(10s) == std::future_status::ready;
  unblock();
  waiter.join();
  if (!in_time) {
    std::printf("FAIL: %s still waits after it was told to stop\n", what);
    return false;
  }
  if (const auto got = returned.get(); got != expected) {
    std::printf("FAIL: %s returned %s, not %s\n", what, weft::to_string(got),
                weft::to_string(expected));
    return false;
  }
  return true;
}

// A token and how to stop it: cancelled, or its deadline passed (on the
// manual clock).
struct stoppable {
  bool by_deadline;
  weft::cancel_source source =
      by_deadline ? weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1h)
                  : weft::cancel_source{};
  wait_status expected() const {
    return by_deadline ? wait_status::timeout : wait_status::cancelled;
  }
  void stop() {
    if (by_deadline) {
      weft::manual_clock::advance(2h);
    } else {
      source.cancel();
    }
  }
};

bool pool_post(bool by_deadline) {
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
    stoppable token{by_deadline};
    held = stops_while_spinning(
        "worker_pool::post(f, token)", token.expected(),
        [&] { return pool.post([&] { ran = true; }, token.source.token()); }, [&] { token.stop(); },
        [&] {
          opened = true;
          opened.notify_all();
        });
  }
  if (ran.load()) {
    std::printf("FAIL: the task of a stopped worker_pool::post ran\n");
    return false;
  }
  return held;
}

// The semaphore's and the channel's deadlines are on the manual clock.
using semaphore = weft::basic_semaphore<weft::manual_clock>;
using channel = weft::basic_channel<int, weft::manual_clock>;

bool semaphore_acquire(bool with_token, bool by_deadline) {
  semaphore permits{1};
  permits.acquire();
  stoppable token{by_deadline};
  const auto due = weft::manual_clock::now() + 1h;
  const bool held = stops_while_spinning(
      with_token ? "semaphore::acquire(1, token)" : "semaphore::acquire_until", token.expected(),
      [&] {
        return with_token ? permits.acquire(1, token.source.token())
                          : permits.acquire_until(1, due);
      },
      [&] { token.stop(); }, [&] { permits.release(); });
  // The stopped acquire took nothing: the one permit is free.
  if (!permits.try_acquire(1) || permits.try_acquire(1)) {
    std::printf("FAIL: a stopped semaphore acquire took a permit\n");
    return false;
  }
  return held;
}

bool channel_send(bool with_token, bool by_deadline) {
  channel values{1};
  if (!values.try_send(1)) return false;
  stoppable token{by_deadline};
  const auto due = weft::manual_clock::now() + 1h;
  const bool held = stops_while_spinning(
      with_token ? "channel::send(v, token)" : "channel::send_until", token.expected(),
      [&] { return with_token ? values.send(2, token.source.token()) : values.send_until(2, due); },
      [&] { token.stop(); }, [&] { (void)values.try_recv(); });
  if (values.try_recv().has_value()) {
    std::printf("FAIL: a stopped channel send queued its value\n");
    return false;
  }
  return held;
}

bool channel_recv(bool with_token, bool by_deadline) {
  channel values{1};
  stoppable token{by_deadline};
  const auto due = weft::manual_clock::now() + 1h;
  const bool held = stops_while_spinning(
      with_token ? "channel::recv(token)" : "channel::recv_until", token.expected(),
      [&] {
        return (with_token ? values.recv(token.source.token()) : values.recv_until(due)).status();
      },
      [&] { token.stop(); }, [&] { (void)values.try_send(1); });
  if (values.try_recv() != 1) {
    std::printf("FAIL: a stopped channel recv took a value\n");
    return false;
  }
  return held;
}

}  // namespace

int main() {
  for (int round = 0; round < rounds; ++round) {
    for (const bool by_deadline : {false, true}) {
      if (!pool_post(by_deadline)) return 1;
      // A plain deadline stops the way a deadline token does.
      for (const bool with_token : {true, false}) {
        if (!with_token && !by_deadline) continue;
        if (!semaphore_acquire(with_token, by_deadline) || !channel_send(with_token, by_deadline) ||
            !channel_recv(with_token, by_deadline)) {
          return 1;
        }
      }
    }
  }
  return 0;
}
