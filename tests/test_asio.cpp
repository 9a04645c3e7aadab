// SPDX-License-Identifier: BSL-1.0
// Tests for weft's Asio layer (weft/asio.hpp): async_acquire with every kind
// of completion token, posting instead of inline completion, per-operation
// cancellation, FIFO order shared by threads and coroutines, async_wait on a
// wait_group and on a cancel_token, and the bridges between weft tokens and
// Asio cancellation slots.
//
// Hand-offs: sem.stats().waiters tells when a thread or a coroutine has
// queued; an io_context run on the test's own thread decides when posted
// completions run. Nothing here sleeps; the only timer is cancelled, never
// waited out.
#include <weft/asio.hpp>
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/resource_pool.hpp>
#include <weft/semaphore.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <future>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "asio_support.hpp"
#include "support.hpp"
#include <boost/asio.hpp>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

using error_code = boost::system::error_code;

using weft_test::eventually;
using weft_test::grant_log;
using weft_test::io_threads;
using weft_test::under_sanitizer;
using weft_test::waiters_reach;

int more_than_cores() {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(16, 2 * cores + 1);
}

bool is_cancelled(const error_code& ec) {
  return ec == weft::errc::cancelled && ec == std::errc::operation_canceled;
}

// The result of one async_acquire, filled in by its completion handler.
struct acquire_result {
  bool ran = false;
  std::thread::id thread;
  error_code error;
  weft::permit permit;
};

// A callback that stores its completion into `result` (no associated
// executor of its own: bind one to choose where it runs).
auto store_into(acquire_result& result) {
  return [&result](error_code ec, weft::permit permit) {
    result.ran = true;
    result.thread = std::this_thread::get_id();
    result.error = ec;
    result.permit = std::move(permit);
  };
}

}  // namespace

// ---------------------------------------------------------------------------
// Completion tokens

TEST_CASE("async_acquire completes a plain callback with a permit" * doctest::timeout(60)) {
  weft::semaphore sem{3};
  std::atomic<bool> done{false};
  error_code error;
  std::ptrdiff_t count = -1;
  std::ptrdiff_t available_inside = -1;
  // No associated executor: it runs on Asio's system executor.
  weft::async_acquire(sem, 2, [&](error_code ec, weft::permit permit) {
    error = ec;
    count = permit.count();
    available_inside = sem.available();
    permit.release();
    done.store(true, std::memory_order_release);
  });
  REQUIRE(eventually([&] { return done.load(std::memory_order_acquire); }));
  CHECK_FALSE(error);
  CHECK(count == 2);
  CHECK(available_inside == 1);
  CHECK(sem.available() == 3);
  CHECK(sem.stats().acquisitions == 1);
}

TEST_CASE(
    "async_acquire: a wait that queued counts in stats() wait times, on the semaphore's clock" *
    doctest::timeout(60)) {
  weft::basic_semaphore<weft::manual_clock> sem{1};
  sem.acquire(1);
  asio::io_context io;
  std::vector<error_code> results;
  const auto record = [&](error_code ec, weft::basic_semaphore<weft::manual_clock>::permit) {
    results.push_back(ec);
  };
  weft::async_acquire(sem, 1, asio::bind_executor(io, record));
  REQUIRE(sem.stats().waiters == 1);
  weft::manual_clock::advance(5s);
  sem.release(1);
  io.run();
  REQUIRE(results.size() == 1);
  CHECK_FALSE(results[0]);
  auto stats = sem.stats();
  CHECK(stats.total_wait == 5s);
  CHECK(stats.max_wait == 5s);

  // A wait cancelled through its slot counts its time, and as a cancellation.
  sem.acquire(1);
  asio::cancellation_signal signal;
  weft::async_acquire(sem, 1,
                      asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, record)));
  REQUIRE(sem.stats().waiters == 1);
  weft::manual_clock::advance(7s);
  signal.emit(asio::cancellation_type::terminal);
  io.restart();
  io.run();
  REQUIRE(results.size() == 2);
  CHECK(is_cancelled(results[1]));
  stats = sem.stats();
  CHECK(stats.total_wait == 12s);
  CHECK(stats.max_wait == 7s);
  CHECK(stats.cancellations == 1);
  CHECK(stats.acquisitions == 3);  // the two blocking ones and the granted async one
  sem.release(1);
}

TEST_CASE("async_acquire works with use_awaitable in a coroutine" * doctest::timeout(60)) {
  weft::semaphore sem{3};
  asio::io_context io;
  bool finished = false;

  SUBCASE("permits free") {
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto permit = co_await weft::async_acquire(sem, 3, asio::use_awaitable);
          CHECK(permit.count() == 3);
          CHECK(sem.available() == 0);
          permit.release();
          CHECK(sem.available() == 3);
          finished = true;
        },
        asio::detached);
    io.run();
  }
  SUBCASE("waiting for a release from another thread") {
    sem.acquire(3);
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto permit = co_await weft::async_acquire(sem, 2, asio::use_awaitable);
          CHECK(permit.count() == 2);
          finished = true;
        },
        asio::detached);
    std::thread runner([&] { io.run(); });  // returns once the coroutine is done
    REQUIRE(waiters_reach(sem, 1));
    sem.release(3);
    runner.join();
    CHECK(sem.available() == 3);
  }
  SUBCASE("an error is thrown into the coroutine") {
    sem.acquire(3);
    asio::cancellation_signal signal;
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          try {
            auto permit = co_await weft::async_acquire(
                sem, 1, asio::bind_cancellation_slot(signal.slot(), asio::use_awaitable));
            FAIL("the acquire was not cancelled");
          } catch (const boost::system::system_error& error) {
            CHECK(is_cancelled(error.code()));
            finished = true;
          }
        },
        asio::detached);
    io.run_one();  // starts the coroutine: it queues
    REQUIRE(sem.stats().waiters == 1);
    signal.emit(asio::cancellation_type::terminal);
    io.run();
    CHECK(sem.available() == 0);
    sem.release(3);
  }
  SUBCASE("as_tuple gives the error code as a value") {
    sem.acquire(3);
    asio::cancellation_signal signal;
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          auto [ec, permit] = co_await weft::async_acquire(
              sem, 1,
              asio::bind_cancellation_slot(signal.slot(), asio::as_tuple(asio::use_awaitable)));
          CHECK(is_cancelled(ec));
          CHECK_FALSE(permit);
          finished = true;
        },
        asio::detached);
    io.run_one();
    REQUIRE(sem.stats().waiters == 1);
    signal.emit(asio::cancellation_type::terminal);
    io.run();
    sem.release(3);
  }
  CHECK(finished);
  CHECK(sem.available() == 3);
  CHECK(sem.stats().waiters == 0);
}

TEST_CASE("async_acquire with deferred takes nothing until the operation is launched" *
          doctest::timeout(60)) {
  weft::semaphore sem{2};
  asio::io_context io;
  auto operation = weft::async_acquire(sem, 2, asio::deferred);
  CHECK(sem.available() == 2);  // not initiated yet
  CHECK(sem.stats().acquisitions == 0);

  acquire_result result;
  std::move(operation)(asio::bind_executor(io, store_into(result)));
  CHECK(sem.available() == 0);  // initiated: the permits are taken
  CHECK_FALSE(result.ran);
  io.run();
  CHECK(result.ran);
  CHECK_FALSE(result.error);
  CHECK(result.permit.count() == 2);
  result.permit.release();
  CHECK(sem.available() == 2);
}

// With no completion token an operation is deferred (Asio 1.81's own
// default is void: such a call did not compile), so a coroutine may
// co_await it directly.
TEST_CASE("every weft async operation called without a token is deferred, and co_await runs it" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::semaphore sem{1};
  weft::wait_group pending;
  weft::channel<int> numbers{1};
  weft::cancel_source stop;
  weft::resource_pool<int> connections{{.max_open = 1}, [] { return 42; }, [](int&) {}};
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  std::atomic<bool> task_ran{false};
  group.go([&] { task_ran = true; });

  // Nothing starts before it is launched.
  auto acquire = weft::async_acquire(sem, 1);
  CHECK(sem.available() == 1);

  bool finished = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto permit = co_await std::move(acquire);
        CHECK(permit.count() == 1);
        CHECK(sem.available() == 0);
        co_await weft::async_wait(pending);  // the count is zero
        co_await weft::async_send(numbers, 7);
        CHECK(co_await weft::async_recv(numbers) == std::optional<int>{7});
        stop.cancel();
        co_await weft::async_wait(stop.token());
        // Boost 1.81 cannot co_await an operation that completes with an
        // exception_ptr and a value (chriskohlhoff/asio#1172): launched
        // with use_awaitable instead, the deferred operation still works.
        auto lease = co_await weft::async_acquire(connections)(asio::use_awaitable);
        CHECK(*lease == 42);
        co_await weft::async_wait(group);  // rethrows nothing: the task did not fail
        CHECK(task_ran.load());
        finished = true;
      },
      [](std::exception_ptr error) {
        if (error) std::rethrow_exception(error);
      });
  io.run();
  CHECK(finished);
  CHECK(sem.available() == 1);
}

TEST_CASE("async_acquire with use_future delivers the permit through the future" *
          doctest::timeout(60)) {
  weft::semaphore sem{2};
  SUBCASE("permits free") {
    std::future<weft::permit> future = weft::async_acquire(sem, 1, asio::use_future);
    auto permit = future.get();
    CHECK(permit.count() == 1);
    CHECK(sem.available() == 1);
  }
  SUBCASE("after a release") {
    sem.acquire(2);
    std::future<weft::permit> future = weft::async_acquire(sem, 2, asio::use_future);
    CHECK(sem.stats().waiters == 1);
    sem.release(2);
    auto permit = future.get();
    CHECK(permit.count() == 2);
    CHECK(sem.available() == 0);
  }
  SUBCASE("a cancelled acquire throws from get()") {
    sem.acquire(2);
    asio::cancellation_signal signal;
    auto future =
        weft::async_acquire(sem, 1, asio::bind_cancellation_slot(signal.slot(), asio::use_future));
    CHECK(sem.stats().waiters == 1);
    signal.emit(asio::cancellation_type::terminal);
    try {
      auto permit = future.get();
      FAIL("the acquire was not cancelled");
    } catch (const boost::system::system_error& error) {
      CHECK(is_cancelled(error.code()));
    }
    sem.release(2);
  }
  CHECK(sem.available() == 2);
  CHECK(sem.stats().waiters == 0);
}

TEST_CASE("async_acquire rejects a bad weight before it starts" * doctest::timeout(60)) {
  weft::semaphore sem{2};
  asio::io_context io;
  bool ran = false;
  auto handler = asio::bind_executor(io, [&](error_code, weft::permit) { ran = true; });
  CHECK_THROWS_AS(weft::async_acquire(sem, 3, handler), std::invalid_argument);
  CHECK_THROWS_AS(weft::async_acquire(sem, -1, handler), std::invalid_argument);
  CHECK_THROWS_AS(static_cast<void>(weft::async_acquire(sem, 3, asio::deferred)),
                  std::invalid_argument);
  io.run();
  CHECK_FALSE(ran);
  CHECK(sem.available() == 2);
  CHECK(sem.stats().waiters == 0);
}

// ---------------------------------------------------------------------------
// Where completions run

TEST_CASE("an async_acquire granted at once completes through the executor, not inline" *
          doctest::timeout(60)) {
  weft::semaphore sem{2};
  asio::io_context io;
  acquire_result result;
  weft::async_acquire(sem, 1, asio::bind_executor(io, store_into(result)));
  CHECK_FALSE(result.ran);      // not run inside async_acquire
  CHECK(sem.available() == 1);  // though the permit is already taken
  io.run();
  CHECK(result.ran);
  CHECK(result.thread == std::this_thread::get_id());
  CHECK_FALSE(result.error);
  CHECK(result.permit.count() == 1);
}

TEST_CASE("an async_acquire granted by release() completes on its executor, not inside release()" *
          doctest::timeout(60)) {
  weft::semaphore sem{2};
  sem.acquire(2);
  asio::io_context io;
  acquire_result result;
  weft::async_acquire(sem, 2, asio::bind_executor(io, store_into(result)));
  CHECK(sem.stats().waiters == 1);
  std::thread releaser([&] { sem.release(2); });
  releaser.join();
  CHECK_FALSE(result.ran);  // granted, but the handler waits for its executor
  CHECK(sem.stats().waiters == 0);
  CHECK(sem.available() == 0);
  io.run();
  CHECK(result.ran);
  CHECK(result.thread == std::this_thread::get_id());
  CHECK(result.permit.count() == 2);
  result.permit.release();
  CHECK(sem.available() == 2);
}

TEST_CASE("a pending async_acquire keeps its io_context's run() from returning" *
          doctest::timeout(60)) {
  weft::semaphore sem{1};
  sem.acquire();
  asio::io_context io;
  acquire_result result;
  weft::async_acquire(sem, 1, asio::bind_executor(io, store_into(result)));
  // Nothing to run, but outstanding work: poll() returns without stopping
  // the io_context (with no work it would stop, and run() would return).
  CHECK(io.poll() == 0);
  CHECK_FALSE(io.stopped());
  std::thread runner([&] { io.run(); });
  sem.release();
  runner.join();  // run() returns once the completion has run
  CHECK(result.ran);
  CHECK(result.permit.count() == 1);
}

// ---------------------------------------------------------------------------
// Per-operation cancellation

TEST_CASE(
    "async_acquire cancelled through its slot completes with errc::cancelled and an empty permit" *
    doctest::timeout(60)) {
  for (const auto type : {asio::cancellation_type::terminal, asio::cancellation_type::partial,
                          asio::cancellation_type::total}) {
    CAPTURE(static_cast<unsigned>(type));
    weft::semaphore sem{3};
    sem.acquire(2);  // 1 free; the waiter asks for 2
    asio::io_context io;
    asio::cancellation_signal signal;
    acquire_result result;
    weft::async_acquire(
        sem, 2,
        asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, store_into(result))));
    REQUIRE(sem.stats().waiters == 1);

    signal.emit(type);
    CHECK(sem.stats().waiters == 0);  // removed at once
    CHECK_FALSE(result.ran);          // the handler still runs on its executor
    io.run();
    REQUIRE(result.ran);
    CHECK(is_cancelled(result.error));
    CHECK(result.error == weft::make_error_code(weft::errc::cancelled));
    CHECK_FALSE(result.permit);
    CHECK(result.permit.count() == 0);

    const auto stats = sem.stats();
    CHECK(stats.available == 1);  // no permit lost
    CHECK(stats.cancellations == 1);
    CHECK(stats.acquisitions == 1);  // the main thread's
    sem.release(2);
    CHECK(sem.available() == 3);
  }
}

TEST_CASE("a slot emitted after the grant does not take the permits back" * doctest::timeout(60)) {
  weft::semaphore sem{2};
  sem.acquire(2);
  asio::io_context io;
  asio::cancellation_signal signal;
  acquire_result result;
  weft::async_acquire(
      sem, 2,
      asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, store_into(result))));
  sem.release(2);  // granted; the completion is posted
  signal.emit(asio::cancellation_type::terminal);
  io.run();
  CHECK_FALSE(result.error);
  CHECK(result.permit.count() == 2);
  result.permit.release();
  CHECK(sem.available() == 2);
  CHECK(sem.stats().cancellations == 0);
}

TEST_CASE("a slot emitted after an immediate grant does not take the permits back" *
          doctest::timeout(60)) {
  weft::semaphore sem{2};
  asio::io_context io;
  asio::cancellation_signal signal;
  acquire_result result;
  weft::async_acquire(
      sem, 1,
      asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io, store_into(result))));
  signal.emit(asio::cancellation_type::terminal);
  io.run();
  CHECK_FALSE(result.error);
  CHECK(result.permit.count() == 1);
  result.permit.release();
  CHECK(sem.available() == 2);
}

TEST_CASE("an async waiter cancelled at the head passes the free permits to the waiters behind it" *
          doctest::timeout(60)) {
  weft::semaphore sem{4};
  sem.acquire(3);  // 1 free
  asio::io_context io;
  asio::cancellation_signal head_signal;
  acquire_result head;
  weft::async_acquire(
      sem, 3,
      asio::bind_cancellation_slot(head_signal.slot(), asio::bind_executor(io, store_into(head))));
  acquire_result async_behind;
  weft::async_acquire(sem, 1, asio::bind_executor(io, store_into(async_behind)));
  REQUIRE(sem.stats().waiters == 2);
  std::atomic<bool> thread_granted{false};
  std::thread thread_behind([&] {
    sem.acquire(0);  // queues behind both, granted as soon as they are
    thread_granted.store(true);
  });
  REQUIRE(waiters_reach(sem, 3));

  head_signal.emit(asio::cancellation_type::terminal);  // 1 free goes to the next in line
  thread_behind.join();
  CHECK(thread_granted.load());
  CHECK(sem.stats().waiters == 0);
  CHECK(sem.available() == 0);
  io.run();
  CHECK(is_cancelled(head.error));
  CHECK_FALSE(head.permit);
  CHECK_FALSE(async_behind.error);
  CHECK(async_behind.permit.count() == 1);
  async_behind.permit.release();
  sem.release(3);
  CHECK(sem.available() == 4);
}

TEST_CASE("cancelling a coroutine spawned with a slot cancels its pending acquire" *
          doctest::timeout(60)) {
  weft::semaphore sem{1};
  sem.acquire();
  asio::io_context io;
  asio::cancellation_signal signal;
  std::optional<error_code> outcome;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto [ec, permit] =
            co_await weft::async_acquire(sem, 1, asio::as_tuple(asio::use_awaitable));
        outcome = ec;
      },
      asio::bind_cancellation_slot(signal.slot(), asio::detached));
  io.run_one();
  REQUIRE(sem.stats().waiters == 1);
  // Emitted on the io_context's thread, where the coroutine runs.
  asio::post(io, [&] { signal.emit(asio::cancellation_type::terminal); });
  io.run();
  REQUIRE(outcome.has_value());
  CHECK(is_cancelled(*outcome));
  CHECK(sem.stats().waiters == 0);
  sem.release();
  CHECK(sem.available() == 1);
}

// ---------------------------------------------------------------------------
// One FIFO for threads and coroutines

TEST_CASE("threads and coroutines on one semaphore are granted in the order they queued" *
          doctest::timeout(60)) {
  for (const int waiters : {4, 8, more_than_cores()}) {
    CAPTURE(waiters);
    const std::ptrdiff_t capacity = waiters;
    weft::semaphore sem{capacity};
    sem.acquire(capacity);
    asio::io_context io;
    io_threads runner{io, 1};
    grant_log<> log;
    std::vector<std::thread> threads;

    // Thread, coroutine, thread, coroutine, ...: each queues before the next starts.
    for (int id = 0; id < waiters; ++id) {
      if (id % 2 == 0) {
        threads.emplace_back([&, id] { log.record(id, sem.acquire_permit(1)); });
      } else {
        asio::co_spawn(
            io,
            [&, id]() -> asio::awaitable<void> {
              log.record(id, co_await weft::async_acquire(sem, 1, asio::use_awaitable));
            },
            asio::detached);
      }
      REQUIRE(waiters_reach(sem, static_cast<std::size_t>(id) + 1));
    }

    // One permit at a time; each grant is seen before the next release.
    for (int i = 0; i < waiters; ++i) {
      sem.release(1);
      CHECK(sem.stats().waiters == static_cast<std::size_t>(waiters - i - 1));
      REQUIRE(eventually([&] { return log.size() == static_cast<std::size_t>(i) + 1; }));
    }
    for (auto& t : threads) t.join();
    runner.stop();

    std::vector<int> expected;
    for (int id = 0; id < waiters; ++id) expected.push_back(id);
    CHECK(log.order() == expected);
    log.drop_permits();
    CHECK(sem.available() == capacity);
    CHECK(sem.stats().waiters == 0);
  }
}

TEST_CASE("a large coroutine waiter is not overtaken by later small thread requests" *
          doctest::timeout(60)) {
  weft::semaphore sem{4};
  sem.acquire(4);
  asio::io_context io;
  acquire_result big;
  weft::async_acquire(sem, 4, asio::bind_executor(io, store_into(big)));
  REQUIRE(sem.stats().waiters == 1);
  std::atomic<int> small_granted{0};
  std::thread small([&] {
    sem.acquire(1);
    small_granted.fetch_add(1);
    sem.release(1);
  });
  REQUIRE(waiters_reach(sem, 2));
  sem.release(3);  // 3 free: enough for the thread, not for the head
  CHECK(sem.stats().waiters == 2);
  CHECK_FALSE(sem.try_acquire(1));
  CHECK(small_granted.load() == 0);
  sem.release(1);  // the head gets all 4; the thread still waits
  CHECK(sem.stats().waiters == 1);
  io.run();
  CHECK(big.permit.count() == 4);
  CHECK(small_granted.load() == 0);
  big.permit.release();  // now the thread
  small.join();
  CHECK(small_granted.load() == 1);
  CHECK(sem.available() == 4);
}

// ---------------------------------------------------------------------------
// wait_group

TEST_CASE("async_wait on a wait_group completes when the count reaches zero" *
          doctest::timeout(60)) {
  weft::wait_group group;
  asio::io_context io;
  std::optional<error_code> outcome;
  auto handler = asio::bind_executor(io, [&](error_code ec) { outcome = ec; });

  SUBCASE("zero already: posted, not inline") {
    weft::async_wait(group, handler);
    CHECK_FALSE(outcome.has_value());
    io.run();
  }
  SUBCASE("done() from other threads") {
    for (const int tasks : {1, 2, 3, 8, more_than_cores()}) {
      CAPTURE(tasks);
      outcome.reset();
      io.restart();
      group.add(tasks);
      weft::async_wait(group, handler);
      CHECK(group.stats().waiters == 1);
      std::vector<std::thread> threads;
      for (int i = 0; i < tasks; ++i) threads.emplace_back([&] { group.done(); });
      for (auto& t : threads) t.join();
      CHECK(group.stats().waiters == 0);
      CHECK_FALSE(outcome.has_value());
      io.run();
      REQUIRE(outcome.has_value());
      CHECK_FALSE(*outcome);
    }
  }
  SUBCASE("in a coroutine") {
    group.add(1);
    asio::co_spawn(
        io,
        [&]() -> asio::awaitable<void> {
          co_await weft::async_wait(group, asio::use_awaitable);
          outcome = error_code{};
        },
        asio::detached);
    io.run_one();
    REQUIRE(group.stats().waiters == 1);
    std::thread finisher([&] { group.done(); });
    finisher.join();
    io.run();
  }
  REQUIRE(outcome.has_value());
  CHECK_FALSE(*outcome);
  CHECK(group.count() == 0);
}

TEST_CASE("async_wait on a wait_group cancelled through its slot completes with errc::cancelled" *
          doctest::timeout(60)) {
  weft::wait_group group;
  group.add(1);
  asio::io_context io;
  asio::cancellation_signal signal;
  std::optional<error_code> outcome;
  weft::async_wait(
      group, asio::bind_cancellation_slot(
                 signal.slot(), asio::bind_executor(io, [&](error_code ec) { outcome = ec; })));
  REQUIRE(group.stats().waiters == 1);
  signal.emit(asio::cancellation_type::terminal);
  CHECK(group.stats().waiters == 0);
  io.run();
  REQUIRE(outcome.has_value());
  CHECK(is_cancelled(*outcome));
  CHECK(group.count() == 1);
  group.done();
  CHECK(group.count() == 0);
}

// ---------------------------------------------------------------------------
// cancel_token <-> Asio

TEST_CASE("async_wait on a cancel_token completes when the token is cancelled" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::cancel_source source;
  std::optional<error_code> outcome;
  std::thread::id ran_on;
  weft::async_wait(source.token(), asio::bind_executor(io, [&](error_code ec) {
                     outcome = ec;
                     ran_on = std::this_thread::get_id();
                   }));
  CHECK_FALSE(outcome.has_value());
  std::thread canceller([&] { source.cancel(); });
  canceller.join();
  CHECK_FALSE(outcome.has_value());  // not run inline on the cancelling thread
  io.run();                          // returns once the wait completed
  REQUIRE(outcome.has_value());
  CHECK_FALSE(*outcome);
  CHECK(ran_on == std::this_thread::get_id());  // on the io_context's thread
}

TEST_CASE("async_wait on a cancel_token already cancelled completes through the executor" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::cancel_source source;
  source.cancel();
  std::optional<error_code> outcome;
  weft::async_wait(source.token(), asio::bind_executor(io, [&](error_code ec) { outcome = ec; }));
  CHECK_FALSE(outcome.has_value());  // posted, not inline
  io.run();
  REQUIRE(outcome.has_value());
  CHECK_FALSE(*outcome);
}

TEST_CASE("async_wait on a cancel_token completes with errc::cancelled when its slot is emitted" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::cancel_source source;
  asio::cancellation_signal signal;
  std::optional<error_code> outcome;
  weft::async_wait(
      source.token(),
      asio::bind_cancellation_slot(signal.slot(),
                                   asio::bind_executor(io, [&](error_code ec) { outcome = ec; })));
  signal.emit(asio::cancellation_type::terminal);
  io.run();
  REQUIRE(outcome.has_value());
  CHECK(is_cancelled(*outcome));
  CHECK_FALSE(source.token().cancelled());  // the wait was cancelled, not the token
  source.cancel();                          // nobody is registered any more: nothing runs
  io.restart();
  CHECK(io.run() == 0);
}

TEST_CASE(
    "async_wait on a cancel_token in a coroutine, raced by its cancellation from other threads" *
    doctest::timeout(60)) {
  for (const int waiters : {1, 2, 3, 8, more_than_cores()}) {
    CAPTURE(waiters);
    asio::io_context io;
    weft::cancel_source source;
    std::atomic<int> woken{0};
    for (int i = 0; i < waiters; ++i) {
      asio::co_spawn(
          io,
          [&]() -> asio::awaitable<void> {
            co_await weft::async_wait(source.token(), asio::use_awaitable);
            woken.fetch_add(1);
          },
          asio::detached);
    }
    std::thread canceller([&] { source.cancel(); });
    std::vector<std::thread> runners;
    for (int i = 0; i < 2; ++i) runners.emplace_back([&] { io.run(); });
    canceller.join();
    for (auto& t : runners) t.join();
    CHECK(woken.load() == waiters);
  }
}

TEST_CASE("async_wait on a token that can never be cancelled throws logic_error" *
          doctest::timeout(60)) {
  asio::io_context io;
  CHECK_THROWS_AS(
      weft::async_wait(weft::cancel_token{}, asio::bind_executor(io, [](error_code) {})),
      std::logic_error);
  CHECK(io.run() == 0);
}

TEST_CASE("cancel_source_for gives a source that a cancellation slot cancels" *
          doctest::timeout(60)) {
  asio::cancellation_signal signal;
  auto source = weft::cancel_source_for(signal.slot());
  CHECK_FALSE(source.cancelled());

  SUBCASE("emitting cancels it") {
    signal.emit(asio::cancellation_type::terminal);
    CHECK(source.cancelled());
    CHECK(source.token().cause().code() == weft::errc::cancelled);
  }
  SUBCASE("emitting none does not") {
    signal.emit(asio::cancellation_type::none);
    CHECK_FALSE(source.cancelled());
  }
  SUBCASE("it stops a blocking acquire on another thread") {
    weft::semaphore sem{1};
    sem.acquire();
    weft::wait_status status = weft::wait_status::ok;
    std::thread waiter([&] { status = sem.acquire(1, source.token()); });
    REQUIRE(waiters_reach(sem, 1));
    signal.emit(asio::cancellation_type::terminal);
    waiter.join();
    CHECK(status == weft::wait_status::cancelled);
    CHECK(sem.available() == 0);
    sem.release();
  }
  SUBCASE("it outlives the signal") {
    std::optional<asio::cancellation_signal> short_lived{std::in_place};
    auto other = weft::cancel_source_for(short_lived->slot());
    short_lived.reset();
    CHECK_FALSE(other.cancelled());
    other.cancel();
    CHECK(other.cancelled());
  }
  SUBCASE("an unconnected slot gives a source only cancel() cancels") {
    auto unconnected = weft::cancel_source_for(asio::cancellation_slot{});
    CHECK_FALSE(unconnected.cancelled());
    unconnected.cancel();
    CHECK(unconnected.cancelled());
  }
}

TEST_CASE("cancellation_bridge cancels a steady_timer wait when the weft token is cancelled" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::cancel_source source;
  // An hour: the wait ends by cancellation or never.
  asio::steady_timer timer{io, std::chrono::hours(1)};
  std::optional<error_code> outcome;

  SUBCASE("cancelled from another thread while the timer waits") {
    weft::cancellation_bridge bridge{source.token(), io.get_executor()};
    timer.async_wait(
        asio::bind_cancellation_slot(bridge.slot(), [&](error_code ec) { outcome = ec; }));
    std::thread canceller([&] { source.cancel(); });
    io.run();  // returns once the timer's handler has run
    canceller.join();
  }
  SUBCASE("a token already cancelled stops the operation started after the bridge") {
    source.cancel();
    weft::cancellation_bridge bridge{source.token(), io.get_executor()};
    timer.async_wait(
        asio::bind_cancellation_slot(bridge.slot(), [&](error_code ec) { outcome = ec; }));
    io.run();
  }
  SUBCASE("a token cancelled while nothing was bound stops the operation bound after") {
    weft::cancellation_bridge bridge{source.token(), io.get_executor()};
    source.cancel();
    io.run();  // the emission runs into an empty slot
    io.restart();
    timer.async_wait(
        asio::bind_cancellation_slot(bridge.slot(), [&](error_code ec) { outcome = ec; }));
    io.run();
  }
  SUBCASE("a token's own deadline, through a weft manual-clock timer") {
    auto request = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
    weft::cancellation_bridge bridge{request.token(), io.get_executor()};
    timer.async_wait(
        asio::bind_cancellation_slot(bridge.slot(), [&](error_code ec) { outcome = ec; }));
    std::thread runner([&] { io.run(); });
    weft::manual_clock::advance(1s);
    runner.join();
  }
  REQUIRE(outcome.has_value());
  CHECK(*outcome == asio::error::operation_aborted);
}

TEST_CASE("cancellation_bridge emits on its executor, not on the thread that cancels the token" *
          doctest::timeout(60)) {
  weft::semaphore sem{1};
  sem.acquire();
  asio::io_context io;
  weft::cancel_source source;
  weft::cancellation_bridge bridge{source.token(), io.get_executor()};
  acquire_result result;
  weft::async_acquire(
      sem, 1,
      asio::bind_cancellation_slot(bridge.slot(), asio::bind_executor(io, store_into(result))));
  REQUIRE(sem.stats().waiters == 1);
  std::thread canceller([&] { source.cancel(); });
  canceller.join();
  CHECK(sem.stats().waiters == 1);  // the emission is posted to io, not run by the canceller
  io.run();
  CHECK(sem.stats().waiters == 0);
  REQUIRE(result.ran);
  CHECK(is_cancelled(result.error));
  CHECK_FALSE(result.permit);
  sem.release();
  CHECK(sem.available() == 1);
}

TEST_CASE("cancellation_bridge leaves the operation alone while the token is not cancelled" *
          doctest::timeout(60)) {
  asio::io_context io;
  weft::cancel_source source;
  asio::steady_timer timer{io, asio::steady_timer::clock_type::now()};  // due at once
  std::optional<error_code> outcome;
  {
    weft::cancellation_bridge bridge{source.token(), io.get_executor()};
    timer.async_wait(
        asio::bind_cancellation_slot(bridge.slot(), [&](error_code ec) { outcome = ec; }));
    io.run();
  }
  REQUIRE(outcome.has_value());
  CHECK_FALSE(*outcome);
  source.cancel();  // the bridge is gone: nothing is posted
  io.restart();
  CHECK(io.run() == 0);
}

// ---------------------------------------------------------------------------
// Coroutines and threads together

TEST_CASE(
    "coroutines on a multi-threaded io_context and plain threads share permits without losing any" *
    doctest::timeout(60)) {
  struct shape {
    int io_threads;
    int plain_threads;
  };
  for (const shape s :
       {shape{1, 1}, shape{2, 2}, shape{3, 3}, shape{4, 8}, shape{2, more_than_cores()}}) {
    CAPTURE(s.io_threads);
    CAPTURE(s.plain_threads);
    constexpr std::ptrdiff_t capacity = 3;
    constexpr int coroutines = 8;
    const int rounds = under_sanitizer ? 40 : 200;
    weft::semaphore sem{capacity};
    asio::io_context io;
    std::atomic<std::ptrdiff_t> held{0};
    std::atomic<int> over_capacity{0};
    std::atomic<std::uint64_t> granted{0};
    std::atomic<std::uint64_t> cancelled{0};
    std::atomic<int> coroutines_done{0};
    std::atomic<int> bad_permits{0};

    // A weft source that a chaos thread cancels and replaces; coroutines
    // bridge it into their acquire's slot, on their own strand.
    std::mutex chaos_mutex;
    weft::cancel_source chaos_source;
    const auto chaos_token = [&] {
      std::lock_guard lock(chaos_mutex);
      return chaos_source.token();
    };

    const auto enter = [&](std::ptrdiff_t n) {
      if (held.fetch_add(n) + n > capacity) over_capacity.fetch_add(1);
    };
    const auto leave = [&](std::ptrdiff_t n) { held.fetch_sub(n); };

    for (int c = 0; c < coroutines; ++c) {
      auto strand = asio::make_strand(io);
      asio::co_spawn(
          strand,
          [&, c, strand]() -> asio::awaitable<void> {
            std::mt19937 rng{static_cast<unsigned>(c)};
            for (int i = 0; i < rounds; ++i) {
              const std::ptrdiff_t n =
                  std::uniform_int_distribution<std::ptrdiff_t>{1, capacity}(rng);
              weft::permit permit;
              if (i % 4 == 3) {
                weft::cancellation_bridge bridge{chaos_token(), strand};
                auto [ec, p] = co_await weft::async_acquire(
                    sem, n,
                    asio::bind_cancellation_slot(bridge.slot(),
                                                 asio::as_tuple(asio::use_awaitable)));
                if (ec) {
                  if (!is_cancelled(ec) || p) bad_permits.fetch_add(1);
                  cancelled.fetch_add(1);
                  continue;
                }
                permit = std::move(p);
              } else {
                permit = co_await weft::async_acquire(sem, n, asio::use_awaitable);
              }
              if (permit.count() != n) bad_permits.fetch_add(1);
              granted.fetch_add(1);
              enter(n);
              if (i % 2 == 0)
                co_await asio::post(strand, asio::use_awaitable);  // hold across a suspension
              leave(n);
            }
            coroutines_done.fetch_add(1);
          },
          asio::detached);
    }

    std::vector<std::thread> threads;
    for (int t = 0; t < s.plain_threads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng{static_cast<unsigned>(1000 + t)};
        for (int i = 0; i < rounds; ++i) {
          const std::ptrdiff_t n = std::uniform_int_distribution<std::ptrdiff_t>{1, capacity}(rng);
          if (i % 3 == 2) {
            if (sem.acquire(n, chaos_token()) != weft::wait_status::ok) {
              cancelled.fetch_add(1);
              continue;
            }
          } else {
            sem.acquire(n);
          }
          granted.fetch_add(1);
          enter(n);
          std::this_thread::yield();
          leave(n);
          sem.release(n);
        }
      });
    }
    std::atomic<bool> stop_chaos{false};
    std::thread chaos([&] {
      while (!stop_chaos.load()) {
        weft::cancel_source old;
        {
          std::lock_guard lock(chaos_mutex);
          old = chaos_source;
          chaos_source = weft::cancel_source{};
        }
        old.cancel();
        for (int i = 0; i < 16; ++i) std::this_thread::yield();
      }
    });
    std::vector<std::thread> runners;
    for (int r = 0; r < s.io_threads; ++r) runners.emplace_back([&] { io.run(); });
    for (auto& t : threads) t.join();
    for (auto& t : runners) t.join();  // run() returns once every coroutine is done
    stop_chaos.store(true);
    chaos.join();

    CHECK(coroutines_done.load() == coroutines);
    CHECK(over_capacity.load() == 0);
    CHECK(bad_permits.load() == 0);
    const auto stats = sem.stats();
    CHECK(stats.available == capacity);
    CHECK(stats.waiters == 0);
    CHECK(stats.acquisitions == granted.load());
    CHECK(stats.cancellations == cancelled.load());
    CHECK(granted.load() + cancelled.load() ==
          static_cast<std::uint64_t>((coroutines + s.plain_threads) * rounds));
  }
}

// ---------------------------------------------------------------------------
// Lifetime

TEST_CASE(
    "permits granted to a handler whose io_context is destroyed before it runs go back to the "
    "semaphore" *
    doctest::timeout(60)) {
  weft::semaphore sem{2};
  SUBCASE("granted at once") {
    {
      asio::io_context io;
      weft::async_acquire(sem, 2, asio::bind_executor(io, [](error_code, weft::permit) {}));
      CHECK(sem.available() == 0);
    }  // the posted completion is destroyed, never run
  }
  SUBCASE("granted by release()") {
    sem.acquire(2);
    {
      asio::io_context io;
      weft::async_acquire(sem, 1, asio::bind_executor(io, [](error_code, weft::permit) {}));
      sem.release(2);  // one goes to the async waiter
      CHECK(sem.available() == 1);
    }
  }
  // Nobody ever held those permits: they must not be lost.
  CHECK(sem.available() == 2);
  CHECK(sem.stats().waiters == 0);
}

TEST_CASE(
    "async waiters whose io_context is destroyed while they wait are withdrawn, and a later release or "
    "cancel does not touch the dead context" *
    doctest::timeout(60)) {
  weft::semaphore sem{2};
  sem.acquire(2);
  weft::wait_group group;
  group.add(1);
  weft::cancel_source source;
  std::atomic<int> handlers_run{0};
  {
    asio::io_context io;
    // Queued behind a thread-sized request, so the io_context dies with them waiting.
    weft::async_acquire(sem, 2, asio::bind_executor(io, [&](error_code, weft::permit) { ++handlers_run; }));
    weft::async_acquire(sem, 1, asio::bind_executor(io, [&](error_code, weft::permit) { ++handlers_run; }));
    weft::async_wait(group, asio::bind_executor(io, [&](error_code) { ++handlers_run; }));
    weft::async_wait(source.token(), asio::bind_executor(io, [&](error_code) { ++handlers_run; }));
    CHECK(sem.stats().waiters == 2);
  }
  CHECK(sem.stats().waiters == 0);
  CHECK(group.stats().waiters == 0);
  CHECK(weft::detail::state_of(source.token())->callback_count() == 0);
  sem.release(2);
  group.done();
  source.cancel();
  CHECK(handlers_run.load() == 0);
  CHECK(sem.available() == 2);
  CHECK(sem.acquire_for(2, 0s) == weft::wait_status::ok);
  sem.release(2);
}

// A completion that its executor destroyed unrun (here a shut-down pool
// refused it) left the waiter's handler installed in the cancellation slot,
// so the next emission reached the freed waiter (ASan:
// heap-use-after-free).
TEST_CASE("asio: a completion destroyed unrun leaves nothing in its handler's cancellation slot" *
          doctest::timeout(30)) {
  weft::semaphore sem{1};
  sem.acquire(1);
  weft::cancel_source source;
  asio::cancellation_signal acquire_signal;
  asio::cancellation_signal wait_signal;
  int ran = 0;
  {
    weft::worker_pool pool{{.workers = 1}};
    auto acquired = [&ran](boost::system::error_code, weft::permit) { ++ran; };
    auto woken = [&ran](boost::system::error_code) { ++ran; };
    weft::async_acquire(sem, 1,
                        asio::bind_cancellation_slot(
                            acquire_signal.slot(), asio::bind_executor(pool.executor(), acquired)));
    weft::async_wait(source.token(),
                     asio::bind_cancellation_slot(wait_signal.slot(),
                                                  asio::bind_executor(pool.executor(), woken)));
    pool.shutdown();
    sem.release(1);   // grants the acquire; the pool refuses its completion
    source.cancel();  // ends the wait; refused the same way
    CHECK(pool.stats().rejected == 2);
  }
  CHECK(ran == 0);
  CHECK_FALSE(acquire_signal.slot().has_handler());
  CHECK_FALSE(wait_signal.slot().has_handler());
  acquire_signal.emit(asio::cancellation_type::terminal);
  wait_signal.emit(asio::cancellation_type::terminal);
  CHECK(sem.try_acquire(1));  // the refused grant gave its permit back
}
