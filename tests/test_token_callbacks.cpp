// SPDX-License-Identifier: BSL-1.0
// Tests that weft's waits and structured operations leave no cancel callback
// behind on the caller's token: a long-lived server or request token that
// gained one registration per operation would grow without bound (the
// failsafe-go#134 / concourse#5099 leak, PITFALLS.md). Each case repeats one
// operation many times on one token that is never cancelled, and checks the
// token's callback count after every operation.
//
// Hand-offs, never sleeps: a thread has parked in a wait when its primitive
// counts it (stats()) and its callback is registered on the token
// (weft_test::callbacks_on); only then does the test let it through.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/fan.hpp>
#include <weft/resource_pool.hpp>
#include <weft/select.hpp>
#include <weft/semaphore.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <numeric>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include <doctest/doctest.h>

#include "pool_support.hpp"
#include "support.hpp"

namespace {

// Operations that finish at once are cheap: many rounds. Those that park a
// thread cost a thread each.
constexpr int token_callbacks_quick_rounds = 1000;
constexpr int token_callbacks_parked_rounds = 200;

// Runs `operation` on a thread of its own, waits (bounded) until `parked()`
// holds, then calls `release()` and joins. release() runs either way, so the
// thread always ends; returns whether the operation was seen parked.
template <class Operation, class Parked, class Release>
bool token_callbacks_park_then_release(Operation operation, Parked parked, Release release) {
  std::thread waiter(operation);
  const bool was_parked = weft_test::eventually(parked);
  release();
  waiter.join();
  return was_parked;
}

// Each case's operations share one token of a source that is never
// cancelled, as a service's requests share its server token.
struct long_lived_token_fixture {
  weft::cancel_source server;
  const weft::cancel_token token = server.token();
};

}  // namespace

// A semaphore acquire with a request token must drop its registration both
// on the fast path and after a queued wait that a release ended.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "semaphore acquire with a long-lived token leaves no callback on it" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  weft::semaphore sem{2};

  SUBCASE("granted at once") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      const std::ptrdiff_t weight = 1 + round % 2;
      REQUIRE(sem.acquire(weight, token) == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
      sem.release(weight);
      {
        auto permit = sem.acquire_permit(weight, token);
        REQUIRE(permit);
        REQUIRE(callbacks_on(token) == 0);
      }
      REQUIRE(callbacks_on(token) == 0);
    }
    CHECK(sem.available() == 2);
  }

  SUBCASE("granted after waiting behind a holder") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      const std::ptrdiff_t weight = 1 + round % 2;
      sem.acquire(2);  // every permit: the waiter queues
      std::optional<wait_status> status;
      const bool parked = token_callbacks_park_then_release(
          [&] { status = sem.acquire(weight, token); },
          [&] { return sem.stats().waiters == 1 && callbacks_on(token) == 1; },
          [&] { sem.release(2); });
      REQUIRE(parked);
      REQUIRE(status == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
      sem.release(weight);
    }
    CHECK(sem.available() == 2);
    CHECK(sem.stats().cancellations == 0);
  }
}

// Buffered channel sends and receives, immediate or queued, must each take
// their registration away when they complete.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "buffered channel send and recv with a long-lived token leave no callback on it" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  weft::channel<int> channel{1};

  SUBCASE("room and a value already there") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      REQUIRE(channel.send(int{round}, token) == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
      auto received = channel.recv(token);
      REQUIRE(received.has_value());
      REQUIRE(*received == round);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("recv that waits for a value sent after it queued") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      std::optional<int> received;
      wait_status sent = wait_status::closed;
      const bool parked = token_callbacks_park_then_release(
          [&] { received = channel.recv(token).value(); },
          [&] { return channel.stats().waiting_receivers == 1 && callbacks_on(token) == 1; },
          [&] { sent = channel.send(int{round}); });
      REQUIRE(parked);
      REQUIRE(sent == wait_status::ok);
      REQUIRE(received == round);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("send on a full channel that waits for room") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      REQUIRE(channel.try_send(-1));  // full now
      std::optional<wait_status> status;
      std::optional<int> made_room_with;
      const bool parked = token_callbacks_park_then_release(
          [&] { status = channel.send(int{round}, token); },
          [&] { return channel.stats().waiting_senders == 1 && callbacks_on(token) == 1; },
          [&] { made_room_with = channel.recv(); });
      REQUIRE(parked);
      REQUIRE(status == wait_status::ok);
      REQUIRE(made_room_with == -1);
      REQUIRE(callbacks_on(token) == 0);
      REQUIRE(channel.try_recv() == round);
    }
  }
}

// A rendezvous channel queues both sides in one queue, a path of its own;
// its waits must unregister as the buffered ones do.
TEST_CASE_FIXTURE(
    long_lived_token_fixture,
    "rendezvous channel send and recv with a long-lived token leave no callback on it" *
        doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  weft::channel<int> channel{0};

  SUBCASE("recv that waits for a sender") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      std::optional<int> received;
      wait_status sent = wait_status::closed;
      const bool parked = token_callbacks_park_then_release(
          [&] { received = channel.recv(token).value(); },
          [&] { return channel.stats().waiting_receivers == 1 && callbacks_on(token) == 1; },
          [&] { sent = channel.send_for(int{round}, std::chrono::seconds{30}); });
      REQUIRE(parked);
      REQUIRE(sent == wait_status::ok);
      REQUIRE(received == round);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("send that waits for a receiver") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      std::optional<wait_status> status;
      std::optional<int> received;
      const bool parked = token_callbacks_park_then_release(
          [&] { status = channel.send(int{round}, token); },
          [&] { return channel.stats().waiting_senders == 1 && callbacks_on(token) == 1; },
          [&] { received = channel.recv_for(std::chrono::seconds{30}).value(); });
      REQUIRE(parked);
      REQUIRE(status == wait_status::ok);
      REQUIRE(received == round);
      REQUIRE(callbacks_on(token) == 0);
    }
  }
}

// select parks on every channel and registers on the token itself; a case
// that completes must take that registration away.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "select with a long-lived token leaves no callback on it once a case completes" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  weft::channel<int> idle{1};
  weft::channel<int> busy{1};
  for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
    CAPTURE(round);
    std::optional<int> received;
    weft::select_result result;
    wait_status sent = wait_status::closed;
    const bool parked = token_callbacks_park_then_release(
        [&] {
          result = weft::select(
              token, weft::on_recv(idle, [](std::optional<int>) {}),
              weft::on_recv(busy, [&](std::optional<int> value) { received = value; }));
        },
        [&] { return callbacks_on(token) == 1; }, [&] { sent = busy.send(int{round}); });
    REQUIRE(parked);
    REQUIRE(sent == wait_status::ok);
    REQUIRE(result.index == 1);
    REQUIRE(result.status == wait_status::ok);
    REQUIRE(received == round);
    REQUIRE(callbacks_on(token) == 0);
  }
}

// A pool acquire with the request's token, the usual way to take a
// connection in a service, must not pin a registration per checkout.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "resource_pool acquire with a long-lived token leaves no callback on it" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  std::atomic<int> opened{0};
  weft::resource_pool<int> pool{{.max_open = 1, .name = "token_callbacks"},
                                [&opened] { return opened.fetch_add(1) + 1; },
                                [](int&) {}};

  SUBCASE("a slot free at once") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      auto lease = pool.acquire(token);
      REQUIRE(lease);
      REQUIRE(*lease == 1);  // the one resource, reused
      REQUIRE(callbacks_on(token) == 0);
      lease.release();
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("a slot freed by another lease after the acquire queued") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      auto holder = pool.acquire();
      std::optional<weft::resource_pool<int>::lease> waited;
      const bool parked = token_callbacks_park_then_release(
          [&] { waited.emplace(pool.acquire(token)); },
          [&] { return pool.stats().waiting == 1 && callbacks_on(token) == 1; },
          [&] { holder.release(); });
      REQUIRE(parked);
      REQUIRE(waited.has_value());
      REQUIRE(waited->status() == wait_status::ok);
      REQUIRE(*waited);
      REQUIRE(callbacks_on(token) == 0);
      waited.reset();
      REQUIRE(callbacks_on(token) == 0);
    }
  }
  CHECK(opened.load() == 1);
}

// A group's token is a child of its parent, so it holds one registration on
// the parent while the group lives; group states are reused, and a reused
// one must neither keep that child nor hand it to the next group.
TEST_CASE_FIXTURE(
    long_lived_token_fixture,
    "task_group with a long-lived parent token holds one callback on it only while it lives" *
        doctest::timeout(120)) {
  using weft_test::callbacks_on;
  weft::worker_pool pool{{.workers = 2, .name = "token_callbacks"}};
  std::atomic<int> ran{0};
  for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
    CAPTURE(round);
    {
      weft::task_group group{pool.executor(), token};
      REQUIRE(callbacks_on(token) == 1);
      group.go([&ran](weft::cancel_token task_token) {
        if (!task_token.cancelled()) ran.fetch_add(1);
      });
      group.go([&ran] { ran.fetch_add(1); });
      group.wait();
      REQUIRE(callbacks_on(token) == 1);
    }
    REQUIRE(ran.load() == 2 * (round + 1));
    REQUIRE(callbacks_on(token) == 0);
    {
      // Likely the state the group above just left.
      weft::task_group parentless{pool.executor()};
      REQUIRE(callbacks_on(token) == 0);
      parentless.go([] {});
      parentless.wait();
      REQUIRE(callbacks_on(token) == 0);
    }
    {
      weft::result_group<int> results{pool.executor(), token};
      REQUIRE(callbacks_on(token) == 1);
      results.go([round] { return round; });
      REQUIRE(results.wait() == std::vector<int>{round});
    }
    REQUIRE(callbacks_on(token) == 0);
  }
}

// parallel_map, for_each and gather make a child of the caller's token per
// call and keep their shared state for the next call: the child must go
// with the call, even when a late helper still holds the state.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "fan-outs under a long-lived token leave no callback on it" *
                      doctest::timeout(120)) {
  using weft_test::callbacks_on;
  using namespace std::chrono_literals;
  weft::worker_pool pool{{.workers = 2, .name = "token_callbacks"}};
  std::vector<int> input(32);
  std::iota(input.begin(), input.end(), 0);
  std::vector<int> doubled;
  for (const int x : input) doubled.push_back(2 * x);
  const int input_sum = std::accumulate(input.begin(), input.end(), 0);

  SUBCASE("parallel_map") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      const auto out = weft::parallel_map(input,
                                          [](int x, const weft::cancel_token& call_token) {
                                            return call_token.cancelled() ? -1 : 2 * x;
                                          },
                                          {.token = token, .executor = pool.executor()});
      REQUIRE(out == doubled);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("for_each") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      std::atomic<int> sum{0};
      weft::for_each(input, [&sum](int x) { sum.fetch_add(x); },
                     {.token = token, .executor = pool.executor()});
      REQUIRE(sum.load() == input_sum);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("gather") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      const auto [number, cancelled] = weft::gather(
          pool.executor(), token, [round] { return round; },
          [](const weft::cancel_token& call_token) { return call_token.cancelled(); });
      REQUIRE(number == round);
      REQUIRE_FALSE(cancelled);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("gather_for whose deadline is a child of the token too") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      const auto [number] = weft::gather_for(1h, token, [round] { return round; });
      REQUIRE(number == round);
      REQUIRE(callbacks_on(token) == 0);
    }
  }
}

// post(f, token) on a full queue waits for room on the caller's token; once
// the task is queued the registration must be gone (test_worker_pool.cpp
// checks it only after a cancelled wait).
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "worker_pool post with a long-lived token leaves no callback on it" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  std::atomic<int> ran{0};  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .name = "token_callbacks"}};

  SUBCASE("room at once") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      REQUIRE(pool.post([&ran] { ran.fetch_add(1); }, token) == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
      // The queue is empty again before the next post.
      REQUIRE(weft_test::eventually([&] { return ran.load() == round + 1; }));
    }
  }

  SUBCASE("room made by the worker after the post queued") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      weft_test::gate worker_gate;
      weft_test::hold_only_worker(pool, worker_gate.closed, 1);  // the queue is full
      std::optional<wait_status> status;
      const bool parked = token_callbacks_park_then_release(
          [&] { status = pool.post([&ran] { ran.fetch_add(1); }, token); },
          [&] { return pool.stats().waiting_for_room == 1 && callbacks_on(token) == 1; },
          [&] { worker_gate.open(); });
      REQUIRE(parked);
      REQUIRE(status == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
      REQUIRE(weft_test::eventually([&] { return ran.load() == round + 1; }));
    }
  }
}

// wait_group::wait(token) parks on the group's queue with the token; the
// done() that releases it must leave the token as it found it.
TEST_CASE_FIXTURE(long_lived_token_fixture,
                  "wait_group wait with a long-lived token leaves no callback on it" *
                      doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  weft::wait_group group;

  SUBCASE("a zero count") {
    for (int round = 0; round < token_callbacks_quick_rounds; ++round) {
      CAPTURE(round);
      group.add(1);
      group.done();
      REQUIRE(group.wait(token) == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
    }
  }

  SUBCASE("a done() after the wait queued") {
    for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
      CAPTURE(round);
      group.add(1);
      std::optional<wait_status> status;
      const bool parked = token_callbacks_park_then_release(
          [&] { status = group.wait(token); },
          [&] { return group.stats().waiters == 1 && callbacks_on(token) == 1; },
          [&] { group.done(); });
      REQUIRE(parked);
      REQUIRE(status == wait_status::ok);
      REQUIRE(callbacks_on(token) == 0);
    }
  }
}

// Many requests share a server token at once, so its list holds several
// waiters' registrations; each must take out its own, in whatever order
// they finish, and leave the others (a middle unlink is the easy one to get
// wrong).
TEST_CASE_FIXTURE(
    long_lived_token_fixture,
    "waiters parked on one long-lived token at once each remove only their own callback" *
        doctest::timeout(120)) {
  using weft::wait_status;
  using weft_test::callbacks_on;
  using weft_test::eventually;
  weft::semaphore sem{1};
  weft::channel<int> channel{1};
  weft::wait_group group;
  for (int round = 0; round < token_callbacks_parked_rounds; ++round) {
    CAPTURE(round);
    sem.acquire(1);
    group.add(1);
    std::optional<wait_status> acquired;
    std::optional<int> received;
    std::optional<wait_status> waited;
    std::thread acquirer([&] { acquired = sem.acquire(1, token); });
    const bool first_parked = eventually([&] { return callbacks_on(token) == 1; });
    std::thread receiver([&] { received = channel.recv(token).value(); });
    const bool second_parked = eventually([&] { return callbacks_on(token) == 2; });
    std::thread waiter([&] { waited = group.wait(token); });
    const bool all_parked = eventually([&] { return callbacks_on(token) == 3; });
    // The middle registration first, then the first, then the last.
    const wait_status sent = channel.send(int{round});
    receiver.join();
    const std::size_t after_middle = callbacks_on(token);
    sem.release(1);
    acquirer.join();
    const std::size_t after_first = callbacks_on(token);
    group.done();
    waiter.join();
    REQUIRE(first_parked);
    REQUIRE(second_parked);
    REQUIRE(all_parked);
    REQUIRE(sent == wait_status::ok);
    REQUIRE(received == round);
    REQUIRE(after_middle == 2);
    REQUIRE(acquired == wait_status::ok);
    REQUIRE(after_first == 1);
    REQUIRE(waited == wait_status::ok);
    REQUIRE(callbacks_on(token) == 0);
    sem.release(1);
  }
}
