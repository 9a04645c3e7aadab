// SPDX-License-Identifier: BSL-1.0
// Regression tests for bugs found in the executors (task_group, fan-out,
// co_spawn into a group) by a second reading of the code; each failed or
// hung before its fix.
#include <weft/asio.hpp>
#include <weft/fan.hpp>
#include <weft/task_group.hpp>
#include <boost/asio.hpp>
#include <doctest/doctest.h>
#include <atomic>
#include <chrono>
#include <future>
#include <latch>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "pool_support.hpp"
#include "support.hpp"

namespace asio = boost::asio;
using namespace std::chrono_literals;

// parallel_map / for_each stopped by a cancellation must say so.
TEST_CASE("parallel_map and for_each report a cancellation that stopped them half-way" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source request;
  int calls = 0;
  CHECK_THROWS_AS(weft::parallel_map(std::vector<int>{1, 2, 3, 4, 5},
                                     [&](int x) { ++calls; request.cancel(); return x * 10; },
                                     {.limit = 1, .token = request.token(), .executor = pool.executor()}),
                  std::system_error);
  CHECK(calls == 1);

  weft::cancel_source request2;
  calls = 0;
  CHECK_THROWS_AS(weft::for_each(std::vector<int>{1, 2, 3, 4, 5}, [&](int) { ++calls; request2.cancel(); },
                                 {.limit = 1, .token = request2.token(), .executor = pool.executor()}),
                  std::system_error);
  CHECK(calls == 1);
}

TEST_CASE("result_group: a second wait after a reported skip does not return an unfilled result" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::result_group<std::string> group{pool.executor()};
  group.cancel();
  group.go([] { return std::string("never runs"); });
  CHECK_THROWS_AS(group.wait(), std::system_error);
  std::vector<std::string> second;
  CHECK_NOTHROW(second = group.wait());
  CHECK(second.empty());
}

// A group runs as many tasks at once as its pool has workers.
TEST_CASE("task_group: two tasks that meet both run on a two-worker pool before wait()" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::latch both{2};
  std::promise<void> met;
  auto met_future = met.get_future();
  group.go([&] { both.arrive_and_wait(); });
  group.go([&] { both.arrive_and_wait(); met.set_value(); });
  // The bound turns a deadlock into a failure.
  CHECK(met_future.wait_for(10s) == std::future_status::ready);
  group.wait();  // helps: runs the second task, so the test ends either way
}

TEST_CASE("task_group: limit 2 on a two-worker pool, two tasks that meet, a third go()" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  group.set_limit(2);
  std::latch both{2};
  std::atomic<int> ran{0};
  for (int i = 0; i < 3; ++i) {
    group.go([&, i] {
      if (i < 2) both.arrive_and_wait();
      ran.fetch_add(1);
    });
  }
  group.wait();
  CHECK(ran.load() == 3);
}

// A group never leaves queued tasks without a runner: with the pool full and
// no runner out, go() waits for room, whatever the pool's policy.
TEST_CASE("async_wait(group) completes when the pool was full at go()" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  weft::cancel_source gate;
  weft_test::hold_only_worker(pool, gate.token(), 1);  // the queue is full now
  weft::task_group group{pool.executor()};
  std::atomic<bool> ran{false};
  std::thread spawner([&] { group.go([&] { ran = true; }); });  // waits for room
  // Opened once go() waits for room (it must, not return or strand its task).
  weft_test::spin_until([&] { return pool.stats().waiting_for_room == 1; });
  CHECK_FALSE(ran.load());
  gate.cancel();
  spawner.join();
  auto waited = weft::async_wait(group, asio::use_future);
  CHECK_NOTHROW(waited.get());
  CHECK(ran.load());
}

TEST_CASE("task_group: on a full overflow::reject pool, go() waits for room instead of stranding its task" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::reject}};
  weft::cancel_source gate;
  weft_test::hold_only_worker(pool, gate.token(), 1);  // the queue is full now
  weft::task_group group{pool.executor()};
  std::atomic<bool> ran{false};
  std::thread spawner([&] { group.go([&] { ran = true; }); });
  // Opened once go() waits for room (it must, not return or strand its task).
  weft_test::spin_until([&] { return pool.stats().waiting_for_room == 1; });
  CHECK_FALSE(ran.load());
  gate.cancel();
  spawner.join();
  auto waited = weft::async_wait(group, asio::use_future);
  CHECK_NOTHROW(waited.get());
  CHECK(ran.load());
}

// The group's cancellation is emitted on the coroutine's strand: before, it
// raced the coroutine (TSan: asio::cancellation_state; plain builds: a lost
// completion and a hang).
asio::awaitable<void> busy(std::latch& started) {
  started.count_down();
  for (int i = 0; i < 2000; ++i) {
    asio::steady_timer timer{co_await asio::this_coro::executor, 0ms};
    auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
  }
}
TEST_CASE("co_spawn(group): cancelling the group while the coroutine runs on a multi-worker pool" * doctest::timeout(120)) {
  for (int round = 0; round < 50; ++round) {
    weft::worker_pool pool{{.workers = 4}};
    weft::task_group group{pool.executor()};
    std::latch started{1};
    weft::co_spawn(group, busy(started));
    started.wait();
    for (int i = 0; i < round * 20; ++i) std::this_thread::yield();
    group.cancel();
    try { group.wait(); } catch (const boost::system::system_error&) {}  // a cancelled co_await may throw
  }
}

// Finished groups hand their shared state to the next group (task_group.hpp,
// core::retire). Nothing of one group may show through in another.
TEST_CASE("task_group: a reused group state never cancels a token an earlier group handed out" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_token kept_by_task;
  weft::cancel_token kept_by_caller;
  {
    weft::task_group group{pool.executor()};
    group.go([&](const weft::cancel_token& token) { kept_by_task = token; });
    kept_by_caller = group.token();
    group.wait();
  }
  for (int i = 0; i < 200; ++i) {
    weft::task_group group{pool.executor()};
    group.cancel();
    group.go([] {});  // skipped, whenever it is taken: wait() says so
    CHECK_THROWS_AS(group.wait(), std::system_error);
  }
  CHECK_FALSE(kept_by_task.cancelled());
  CHECK_FALSE(kept_by_caller.cancelled());
}

TEST_CASE("task_group: a group made after failed and cancelled groups starts clean" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  for (int i = 0; i < 200; ++i) {
    {
      weft::task_group failing{pool.executor()};
      failing.set_limit(1);
      failing.go([] { throw std::runtime_error("first"); });
      CHECK_THROWS_AS(failing.wait(), std::runtime_error);
    }
    weft::task_group clean{pool.executor()};
    CHECK_FALSE(clean.token().cancelled());
    std::atomic<int> ran{0};
    for (int t = 0; t < 100; ++t) clean.go([&] { ran.fetch_add(1, std::memory_order_relaxed); });  // no limit left over
    CHECK_NOTHROW(clean.wait());
    CHECK(ran.load() == 100);
  }
}

TEST_CASE("task_group: a reused group state follows the new group's parent, not the old one" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  for (int i = 0; i < 100; ++i) {
    weft::cancel_source old_parent;
    { weft::task_group with_parent{pool.executor(), old_parent.token()}; }
    { weft::task_group without_parent{pool.executor()}; }
    weft::task_group orphan{pool.executor()};
    weft::cancel_source new_parent;
    weft::task_group child{pool.executor(), new_parent.token()};
    old_parent.cancel();
    CHECK_FALSE(orphan.token().cancelled());
    CHECK_FALSE(child.token().cancelled());
    new_parent.cancel();
    CHECK(child.token().cancelled());
    CHECK_FALSE(orphan.token().cancelled());
  }
}

// A deferred async_wait(token) held the token's state by a raw pointer: the
// state could be freed (or, with reuse, handed to a later group) before the
// operation was launched.
TEST_CASE("async_wait(token) deferred past the group's end waits on that group's token, not the next one's" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  using wait_operation =
      decltype(weft::async_wait(std::declval<const weft::cancel_token&>(), asio::deferred));
  std::optional<wait_operation> operation;
  {
    weft::task_group first{pool.executor()};
    operation.emplace(weft::async_wait(first.token(), asio::deferred));
    first.wait();
  }
  weft::task_group second{pool.executor()};
  asio::io_context io;
  bool fired = false;
  std::move (*operation)(asio::bind_executor(io, [&](boost::system::error_code) { fired = true; }));
  second.cancel();
  io.poll();
  CHECK_FALSE(fired);
}

namespace {
asio::awaitable<void> short_timer(bool throw_at_end) {
  asio::steady_timer timer{co_await asio::this_coro::executor, 100us};
  auto [error] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
  (void)error;
  if (throw_at_end) throw std::runtime_error("coroutine failed");
}
}  // namespace

// Asio 1.81's co_spawn freed the cancellation handler that a queued emission
// still pointed to (chriskohlhoff/asio#1332), and a cancellation that came
// before the coroutine started, or as it ended, threw operation_aborted out
// of the executor: the group then never finished.
TEST_CASE("co_spawn(group): cancellation racing the coroutines' start and end neither crashes nor strands the group" *
          doctest::timeout(120)) {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<int> escaped{0};
  pool.set_error_handler([&](std::exception_ptr) { escaped.fetch_add(1); });
  std::mt19937 random{7};
  for (int round = 0; round < 400; ++round) {
    weft::task_group group{pool.executor()};
    const int coroutines = 1 + static_cast<int>(random() % 3);
    const auto when = random() % 3;  // cancel before the coroutines run, at once, or not at all
    if (when == 0) group.cancel();
    for (int i = 0; i < coroutines; ++i) weft::co_spawn(group, short_timer(random() % 4 == 0));
    if (when == 1) group.cancel();
    try {
      group.wait();
    } catch (const std::exception&) {  // a failure, or the cancellation, reported
    }
  }
  CHECK(escaped.load() == 0);
}
