// SPDX-License-Identifier: BSL-1.0
// Tests for the pool as an Asio executor (weft/asio/executor.hpp) and for
// coroutines in task groups (weft/asio/task_group.hpp): post / dispatch /
// defer onto a pool, co_spawn with timers, any_io_executor, the pool's
// execution_context and its lifetime, weft::co_spawn(group, ...) failures,
// cancellation of a coroutine's timer through the group's token,
// async_wait(group) with every kind of completion, and cancelling that wait
// through a cancellation slot.
//
// Hand-offs: latches, promises and futures (use_future). Timers are either of
// 0 ms (they complete at once; no duration is asserted) or of a day and
// always cancelled, never waited out. A coroutine that a test cancels runs
// on a pool of one worker (or a strand), so the cancellation, which the
// group posts to the coroutine's executor, cannot run beside the coroutine.
#include <weft/asio.hpp>
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/detail/futex.hpp>
#include <weft/registry.hpp>
#include <weft/semaphore.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <future>
#include <latch>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <boost/asio.hpp>
#include "pool_support.hpp"
#include "support.hpp"

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

using error_code = boost::system::error_code;

using weft_test::gate;

// Counts live objects, so a test can tell a coroutine frame was destroyed.
struct frame_marker {
  frame_marker() { ++live; }
  frame_marker(const frame_marker&) = delete;
  frame_marker& operator=(const frame_marker&) = delete;
  ~frame_marker() { --live; }
  static inline std::atomic<int> live{0};
};

std::string message_of(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
  }
  return "not a std::exception";
}

// A 0 ms timer (it expires at once), then x * 2; also says whether it ran
// on `pool` after the timer.
asio::awaitable<std::pair<int, bool>> double_after_timer_checking_pool(weft::worker_pool& pool,
                                                                       int x) {
  frame_marker marker;
  asio::steady_timer timer{co_await asio::this_coro::executor, 0ms};
  co_await timer.async_wait(asio::use_awaitable);
  co_return std::pair{2 * x, pool.running_in_this_thread()};
}

// Waits on a day-long timer; reports how the wait ended.
asio::awaitable<void> wait_a_day(std::latch& started, std::promise<error_code>& ended) {
  frame_marker marker;
  asio::steady_timer timer{co_await asio::this_coro::executor, 24h};
  started.count_down();
  auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
  ended.set_value(ec);
}

asio::awaitable<void> fail_after_timer(std::string what) {
  frame_marker marker;
  asio::steady_timer timer{co_await asio::this_coro::executor, 0ms};
  co_await timer.async_wait(asio::use_awaitable);
  throw std::runtime_error(what);
}

asio::awaitable<void> count_after_timer(std::atomic<int>& done) {
  frame_marker marker;
  asio::steady_timer timer{co_await asio::this_coro::executor, 0ms};
  co_await timer.async_wait(asio::use_awaitable);
  done.fetch_add(1);
}

// A service in a pool's execution context that owns a thread, as Asio's
// reactor does, and joins it when the context shuts down (on join()).
struct thread_owning_service final : asio::execution_context::service {
  static inline asio::execution_context::id id;
  explicit thread_owning_service(asio::execution_context& context) : service(context) {
    alive = true;
  }
  ~thread_owning_service() override { alive = false; }
  void shutdown() override {
    stopping.open();
    if (thread.joinable()) thread.join();
  }
  std::thread thread;
  gate stopping;
  static inline std::atomic<bool> alive{false};
};

// A handler whose first move (the pool's, inside execute(), once the pool
// was found open) waits for the service to start stopping. Records whether
// it was run, and whether it was destroyed while the service was alive.
struct handed_over_late {
  std::latch* inside;
  weft::cancel_token stopping;
  bool owner = true;
  static inline std::atomic<bool> ran{false};
  static inline std::atomic<int> destroyed_with_service{0};
  static inline std::atomic<int> destroyed_after_service{0};

  handed_over_late(std::latch& inside_execute, weft::cancel_token service_stopping)
      : inside(&inside_execute), stopping(std::move(service_stopping)) {}
  handed_over_late(handed_over_late&& other) noexcept
      : inside(std::exchange(other.inside, nullptr)),
        stopping(other.stopping),
        owner(std::exchange(other.owner, false)) {
    if (inside != nullptr) {
      inside->count_down();
      stopping.wait();
    }
  }
  handed_over_late& operator=(handed_over_late&&) = delete;
  ~handed_over_late() {
    if (!owner) return;
    if (thread_owning_service::alive) {
      ++destroyed_with_service;
    } else {
      ++destroyed_after_service;
    }
  }
  void operator()() { ran = true; }
};

}  // namespace

// ---------------------------------------------------------------------------
// The executor.

TEST_CASE("asio executor: post, dispatch and defer run handlers on the pool's workers" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  const auto test_thread = std::this_thread::get_id();
  weft::wait_group pending;
  std::atomic<int> on_pool{0};
  std::atomic<int> on_test_thread{0};
  auto handler = [&] {
    if (pool.running_in_this_thread()) on_pool.fetch_add(1);
    if (std::this_thread::get_id() == test_thread) on_test_thread.fetch_add(1);
    pending.done();
  };
  for (int i = 0; i < 30; ++i) {
    pending.add(3);
    asio::post(pool.executor(), handler);
    asio::dispatch(pool.executor(), handler);  // not a worker here: must not run inline
    asio::defer(pool.executor(), handler);
  }
  pending.wait();
  CHECK(on_pool.load() == 90);
  CHECK(on_test_thread.load() == 0);
}

// Asio hands an executor the completions of operations already under way
// (a timer's, a semaphore release()'s), from threads that must not wait for
// the pool's workers (Asio's reactor, weft's deadline thread). execute()
// used to wait for room on a full queue: a group's cancellation, which posts
// to its coroutines' strands, then blocked the deadline thread, and every
// deadline in the process, until a worker made room.
TEST_CASE("asio executor: a full queue takes Asio work past it at once, under every policy" *
          doctest::timeout(30)) {
  for (const auto policy :
       {weft::overflow::block, weft::overflow::reject, weft::overflow::caller_runs}) {
    CAPTURE(static_cast<int>(policy));
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = policy}};
    gate worker_gate;
    weft_test::hold_only_worker(pool, worker_gate.closed, 1);
    std::promise<bool> first_ran_on_pool;
    std::promise<bool> second_ran_on_pool;
    // On this thread, with the one worker held: a post that waited for room,
    // or ran its handler here, would never return, or fail the checks below.
    asio::post(pool.executor(),
               [&] { first_ran_on_pool.set_value(pool.running_in_this_thread()); });
    asio::post(pool.executor(),
               [&] { second_ran_on_pool.set_value(pool.running_in_this_thread()); });
    const weft::worker_pool_stats held = pool.stats();
    CHECK(held.queued == 3);
    CHECK(held.over_capacity == 2);
    CHECK(held.rejected == 0);
    worker_gate.open();
    CHECK(first_ran_on_pool.get_future().get());
    CHECK(second_ran_on_pool.get_future().get());
    pool.shutdown();
    pool.join();
    const weft::worker_pool_stats after = pool.stats();
    CHECK(after.submitted == 4);
    CHECK(after.completed == 4);
    CHECK(after.queued == 0);
  }
}

// A worker takes work past a full queue and work from the queue in turns,
// so neither can keep the other waiting however fast it refills. Serving
// the list first, a handler that hands itself back to a full pool (as a
// coroutine that yields in a loop does) ran to its end before the queued
// task ran.
TEST_CASE("asio executor: work past a full queue and the queue take turns" * doctest::timeout(30)) {
  constexpr int rounds = 8;
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  gate worker_gate;
  weft_test::hold_only_worker(pool, worker_gate.closed);
  // Written by the one worker; read once the last round has run.
  std::string order;
  int rounds_left = rounds;
  std::promise<void> all_ran;

  SUBCASE("Asio work that keeps coming past the queue") {
    pool.post([&] { order += 'q'; });  // fills the queue
    std::function<void()> run_past_queue;
    run_past_queue = [&] {
      order += 'a';
      if (--rounds_left == 0) {
        all_ran.set_value();
      } else {
        asio::post(pool.executor(), run_past_queue);  // past the queue while 'q' waits in it
      }
    };
    asio::post(pool.executor(), run_past_queue);
    CHECK(pool.stats().over_capacity == 1);
    worker_gate.open();
    all_ran.get_future().wait();
    pool.shutdown();
    pool.join();
    REQUIRE(order.size() == rounds + 1);
    CHECK(order.find('q') <= 1);
  }
  SUBCASE("a queue that keeps refilling") {
    bool refilled = true;
    std::function<void()> round;
    round = [&] {
      order += 'q';
      if (--rounds_left == 0) {
        all_ran.set_value();
      } else {
        refilled = refilled && pool.try_post(round);  // into the slot this task left
      }
    };
    pool.post(round);  // fills the queue
    asio::post(pool.executor(), [&] { order += 'a'; });
    CHECK(pool.stats().over_capacity == 1);
    worker_gate.open();
    all_ran.get_future().wait();
    pool.shutdown();
    pool.join();
    CHECK(refilled);
    REQUIRE(order.size() == rounds + 1);
    CHECK(order.find('a') <= 1);
  }
}

TEST_CASE("asio executor: work past a full queue is dropped by shutdown_now" *
          doctest::timeout(30)) {
  weft::worker_pool dropping{{.workers = 1, .queue_capacity = 1}};
  gate second_gate;
  weft_test::hold_only_worker(dropping, second_gate.closed, 1);
  std::atomic<bool> ran{false};
  asio::post(dropping.executor(), [&] { ran = true; });
  CHECK(dropping.shutdown_now() == 2);  // the queued task and the one past it
  second_gate.open();
  dropping.join();
  CHECK_FALSE(ran.load());
  CHECK(dropping.stats().dropped == 2);
}

TEST_CASE("asio executor: work handed over after the pool shut down is dropped, never thrown" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .name = "target"}};
  weft::semaphore permits{1};
  permits.acquire(1);
  std::atomic<bool> granted{false};
  weft::async_acquire(
      permits, 1,
      asio::bind_executor(pool.executor(), [&](error_code, weft::permit) { granted = true; }));
  pool.shutdown();
  std::atomic<bool> posted_ran{false};
  CHECK_NOTHROW(asio::post(pool.executor(), [&] { posted_ran = true; }));
  // Completes the async_acquire, whose completion goes to the shut-down pool.
  CHECK_NOTHROW(permits.release(1));
  pool.join();
  CHECK_FALSE(posted_ran.load());
  CHECK_FALSE(granted.load());
  CHECK(permits.available() == 1);  // the dropped completion gave its permit back
  CHECK(pool.stats().rejected == 2);
  CHECK(pool.stats().dropped == 0);
}

// Once join() has shut the pool's Asio services down, nothing would
// withdraw a wait for a handler on the pool: such a wait is destroyed as
// it starts, as an operation started on a shut-down io_context is, and
// takes nothing. It used to be queued, keeping its handler alive until a
// grant came, and to take what that grant gave.
TEST_CASE("asio executor: an async wait started after join() is destroyed at once, never queued" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::semaphore permits{1};
  permits.acquire(1);
  weft::wait_group group;
  group.add(1);
  weft::channel<int> empty{1};
  weft::channel<int> full{1};
  full.send(1);
  weft::cancel_source source;
  // Warms the pool's context up, so its services exist when it shuts down.
  weft::async_acquire(permits, 1,
                      asio::bind_executor(pool.executor(), [](error_code, weft::permit) {}));
  pool.shutdown();
  pool.join();

  std::atomic<int> ran{0};
  const auto held = std::make_shared<int>(0);
  const auto handler = [&] {
    return asio::bind_executor(pool.executor(), [&ran, held](auto&&...) { ran.fetch_add(1); });
  };
  weft::async_acquire(permits, 1, handler());
  CHECK(held.use_count() == 1);
  weft::async_wait(group, handler());
  CHECK(held.use_count() == 1);
  weft::async_recv(empty, handler());
  CHECK(held.use_count() == 1);
  weft::async_send(full, 2, handler());
  CHECK(held.use_count() == 1);
  weft::async_wait(source.token(), handler());
  CHECK(held.use_count() == 1);

  CHECK(permits.stats().waiters == 0);
  permits.release(1);
  CHECK(permits.available() == 1);
  group.done();
  source.cancel();
  CHECK(empty.try_send(3));
  CHECK(full.try_recv() == std::optional<int>{1});
  CHECK(full.try_recv() == std::nullopt);  // the discarded send's value never arrived
  CHECK(ran.load() == 0);
}

// join() shuts the pool's Asio services down, and a service that owns a
// thread (Asio's reactor) joins it then: what that thread hands the pool
// meanwhile comes after join() has run or dropped the queue. It stayed
// queued, to be destroyed with the pool after the services it may refer to
// (a strand's: a use after free). It is dropped before join() returns.
TEST_CASE("asio executor: work handed over as join() stops the services is dropped before them" *
          doctest::timeout(30)) {
  // Destroyed at the end of the block: shutdown(), join(), then the services.
  {
    weft::worker_pool pool{{.workers = 1}};
    auto& service = asio::use_service<thread_owning_service>(
        asio::query(pool.executor(), asio::execution::context));
    std::latch inside_execute{1};
    service.thread = std::thread([&pool, &inside_execute, stopping = service.stopping.closed] {
      pool.executor().execute(handed_over_late{inside_execute, stopping});
    });
    inside_execute.wait();  // past execute()'s check that the pool is open
  }
  CHECK_FALSE(handed_over_late::ran.load());
  CHECK(handed_over_late::destroyed_with_service.load() == 1);
  CHECK(handed_over_late::destroyed_after_service.load() == 0);
}

TEST_CASE("asio executor: the pool's execution_context is one per pool, and blocking is never" *
          doctest::timeout(30)) {
  weft::worker_pool a{{.workers = 1}};
  weft::worker_pool b{{.workers = 1}};
  asio::execution_context& ca = asio::query(a.executor(), asio::execution::context);
  asio::execution_context& ca_again = asio::query(a.executor(), asio::execution::context);
  asio::execution_context& cb = asio::query(b.executor(), asio::execution::context);
  CHECK(&ca == &ca_again);
  CHECK(&ca != &cb);
  CHECK(asio::query(a.executor(), asio::execution::blocking) == asio::execution::blocking.never);
  static_assert(asio::execution::is_executor_v<weft::pool_executor>);
}

// A service that says when the execution context holding it destroys it.
struct destruction_witness final : asio::execution_context::service {
  using key_type = destruction_witness;
  static inline asio::execution_context::id id;
  explicit destruction_witness(asio::execution_context& context) : service(context) {}
  ~destruction_witness() override { destroyed = true; }
  void shutdown() override {}
  static inline std::atomic<bool> destroyed{false};
};

TEST_CASE("asio executor: outstanding_work.tracked gives an executor that owns the pool's context" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  const auto tracked = asio::prefer(pool.executor(), asio::execution::outstanding_work.tracked);
  static_assert(
      std::is_same_v<std::remove_const_t<decltype(tracked)>, weft::tracked_pool_executor>);
  static_assert(asio::execution::is_executor_v<weft::tracked_pool_executor>);
  CHECK(asio::query(tracked, asio::execution::outstanding_work) ==
        asio::execution::outstanding_work.tracked);
  CHECK(&asio::query(tracked, asio::execution::context) ==
        &asio::query(pool.executor(), asio::execution::context));
  CHECK(asio::query(tracked, asio::execution::blocking) == asio::execution::blocking.never);
  CHECK(asio::prefer(tracked, asio::execution::outstanding_work.untracked) == pool.executor());
  CHECK(asio::require(pool.executor(), asio::execution::outstanding_work.untracked) ==
        pool.executor());
  const weft::tracked_pool_executor copy = tracked;
  CHECK(copy == tracked);
  std::promise<bool> ran_on_pool;
  asio::post(tracked, [&] { ran_on_pool.set_value(pool.running_in_this_thread()); });
  CHECK(ran_on_pool.get_future().get());
}

// What Asio holds on another context for an operation that completes on a
// pool (the work guard of a co_spawn awaited by one of the pool's
// coroutines) may outlive the pool: the pool's services live until it is
// let go, so the pool's strand in it is destroyed with its service still
// there. Before, the strand's destructor locked its service's mutex after
// the pool had freed it (heap-use-after-free, a flaky failure of the test
// "a pool joined while a group's coroutine awaits work on another
// io_context waits for that work").
TEST_CASE(
    "asio executor: a pool's strand held as outstanding work is released safely after the pool" *
    doctest::timeout(30)) {
  for (const bool through_any_io_executor : {false, true}) {
    CAPTURE(through_any_io_executor);
    destruction_witness::destroyed = false;
    std::optional<asio::strand<weft::tracked_pool_executor>> held_strand;
    std::optional<asio::any_io_executor> held_any;
    {
      weft::worker_pool pool{{.workers = 1}};
      asio::use_service<destruction_witness>(
          asio::query(pool.executor(), asio::execution::context));
      if (through_any_io_executor) {
        const asio::any_io_executor strand =
            asio::make_strand(asio::any_io_executor(pool.executor()));
        held_any.emplace(asio::prefer(strand, asio::execution::outstanding_work.tracked));
      } else {
        held_strand.emplace(asio::prefer(asio::make_strand(pool.executor()),
                                         asio::execution::outstanding_work.tracked));
      }
    }
    CHECK_FALSE(destruction_witness::destroyed.load());
    held_strand.reset();
    held_any.reset();
    CHECK(destruction_witness::destroyed.load());
  }
}

TEST_CASE("asio executor: co_spawn with use_future runs a coroutine with a timer on the pool" *
          doctest::timeout(30)) {
  {
    weft::worker_pool pool{{.workers = 2}};
    auto result = asio::co_spawn(pool.executor(), double_after_timer_checking_pool(pool, 21),
                                 asio::use_future);
    const auto [value, on_pool] = result.get();
    CHECK(value == 42);
    CHECK(on_pool);
    // Many at once.
    std::vector<std::future<std::pair<int, bool>>> results;
    for (int i = 0; i < 50; ++i) {
      results.push_back(asio::co_spawn(pool.executor(), double_after_timer_checking_pool(pool, i),
                                       asio::use_future));
    }
    for (int i = 0; i < 50; ++i) {
      const auto [v, p] = results[static_cast<std::size_t>(i)].get();
      CHECK(v == 2 * i);
      CHECK(p);
    }
  }
  CHECK(frame_marker::live.load() == 0);
}

TEST_CASE("asio executor: any_io_executor converts from pool.executor() and still runs on the pool" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  asio::any_io_executor any = pool.executor();
  REQUIRE(any.target<weft::pool_executor>() != nullptr);
  CHECK(*any.target<weft::pool_executor>() == pool.executor());
  CHECK(&asio::query(any, asio::execution::context) == &asio::query(pool.executor(), asio::execution::context));
  std::promise<bool> ran_on_pool;
  asio::post(any, [&] { ran_on_pool.set_value(pool.running_in_this_thread()); });
  CHECK(ran_on_pool.get_future().get());
  CHECK(asio::co_spawn(any, double_after_timer_checking_pool(pool, 5), asio::use_future).get() ==
        std::pair{10, true});
  // A timer made directly from the converted executor.
  asio::steady_timer timer{any, 0ms};
  std::promise<error_code> waited;
  timer.async_wait([&](error_code ec) { waited.set_value(ec); });
  CHECK_FALSE(waited.get_future().get());
}

TEST_CASE("asio executor: a pool destroyed after its coroutines finished frees them and its context" *
          doctest::timeout(30)) {
  // ASan's leak check covers the execution_context and the timer service in
  // it; the marker covers the coroutine frames.
  for (int round = 0; round < 5; ++round) {
    {
      weft::worker_pool pool{{.workers = 2}};
      std::vector<std::future<std::pair<int, bool>>> results;
      for (int i = 0; i < 10; ++i) {
        results.push_back(asio::co_spawn(pool.executor(), double_after_timer_checking_pool(pool, i),
                                         asio::use_future));
      }
      weft::task_group group{pool.executor()};
      std::atomic<int> done{0};
      for (int i = 0; i < 10; ++i) weft::co_spawn(group, count_after_timer(done));
      for (auto& r : results) r.get();
      group.wait();
      CHECK(done.load() == 10);
    }
    CHECK(frame_marker::live.load() == 0);
  }
}

TEST_CASE("asio executor: a pool destroyed while a coroutine waits on a timer destroys the coroutine" *
          doctest::timeout(30)) {
  // Like io_context's destructor: the pending wait is abandoned and its
  // handler, which owns the coroutine frame, destroyed with the context.
  {
    weft::worker_pool pool{{.workers = 1}};
    std::latch started{1};
    std::promise<error_code> ended;  // never set: the coroutine never resumes
    asio::co_spawn(pool.executor(), wait_a_day(started, ended), asio::detached);
    started.wait();
    CHECK(frame_marker::live.load() == 1);
  }
  CHECK(frame_marker::live.load() == 0);
}

// ---------------------------------------------------------------------------
// Coroutines in a group.

TEST_CASE("asio task_group: co_spawned coroutines are joined by wait and by async_wait" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::atomic<int> done{0};
  for (int i = 0; i < 20; ++i) weft::co_spawn(group, count_after_timer(done));
  std::atomic<int> thread_tasks{0};
  for (int i = 0; i < 20; ++i) group.go([&] { thread_tasks.fetch_add(1); });
  std::promise<std::exception_ptr> waited;
  weft::async_wait(group, asio::bind_executor(pool.executor(), [&](std::exception_ptr error) {
                     waited.set_value(error);
                   }));
  CHECK(waited.get_future().get() == nullptr);
  CHECK(done.load() == 20);
  CHECK(thread_tasks.load() == 20);
  CHECK_NOTHROW(group.wait());
}

TEST_CASE("asio task_group: a coroutine's exception reaches async_wait as exception_ptr, and wait rethrows it" *
          doctest::timeout(30)) {
  {
    weft::worker_pool pool{{.workers = 2}};
    weft::task_group group{pool.executor()};
    weft::co_spawn(group, fail_after_timer("coroutine failed"));
    std::promise<std::exception_ptr> waited;
    weft::async_wait(group, asio::bind_executor(pool.executor(), [&](std::exception_ptr error) {
                       waited.set_value(error);
                     }));
    CHECK(message_of(waited.get_future().get()) == "coroutine failed");
    CHECK(group.token().cancelled());
    CHECK_THROWS_WITH_AS(group.wait(), "coroutine failed", std::runtime_error);
    // ...every time.
    CHECK_THROWS_WITH_AS(group.wait(), "coroutine failed", std::runtime_error);
  }
  CHECK(frame_marker::live.load() == 0);
}

TEST_CASE("asio task_group: co_await async_wait(group, use_awaitable) rethrows a task's exception" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  group.go([] { throw std::invalid_argument("thread task failed"); });
  auto outcome = asio::co_spawn(
      pool.executor(),
      [&]() -> asio::awaitable<std::string> {
        try {
          co_await weft::async_wait(group, asio::use_awaitable);
        } catch (const std::invalid_argument& e) {
          co_return e.what();
        }
        co_return "no exception";
      },
      asio::use_future);
  CHECK(outcome.get() == "thread task failed");
  CHECK_THROWS_AS(group.wait(), std::invalid_argument);
}

TEST_CASE("asio task_group: async_wait(group, use_awaitable) completes only after pending tasks finish" *
          doctest::timeout(30)) {
  // Five workers: up to four runners (one per task, blocked on the gate)
  // and one for the waiting coroutine.
  weft::worker_pool pool{{.workers = 5}};
  weft::task_group group{pool.executor()};
  gate held;
  std::atomic<int> finished{0};
  for (int i = 0; i < 4; ++i) {
    group.go([&finished, f = held.closed] {
      f.wait();
      finished.fetch_add(1);
    });
  }
  std::latch waiting{1};
  auto seen = asio::co_spawn(
      pool.executor(),
      [&]() -> asio::awaitable<int> {
        waiting.count_down();
        co_await weft::async_wait(group, asio::use_awaitable);
        co_return finished.load();
      },
      asio::use_future);
  waiting.wait();
  CHECK(seen.wait_for(0s) != std::future_status::ready);  // a snapshot: the gate is still closed
  held.open();
  CHECK(seen.get() == 4);
  CHECK_NOTHROW(group.wait());
}

TEST_CASE("asio task_group: cancelling the group aborts a coroutine's day-long timer, and the group joins" *
          doctest::timeout(60)) {
  enum class how { group_cancel, parent_cancel, sibling_throws };
  for (const how way : {how::group_cancel, how::parent_cancel, how::sibling_throws}) {
    CAPTURE(static_cast<int>(way));
    {
      // One worker: the cancellation, posted to the coroutine's executor,
      // runs once the coroutine is suspended on its timer.
      weft::worker_pool pool{{.workers = 1}};
      weft::cancel_source parent;
      weft::task_group group{pool.executor(), parent.token()};
      std::latch started{1};
      std::promise<error_code> ended;
      weft::co_spawn(group, wait_a_day(started, ended));
      started.wait();
      switch (way) {
        case how::group_cancel: group.cancel(); break;
        case how::parent_cancel: parent.cancel(); break;
        case how::sibling_throws: group.go([] { throw std::runtime_error("sibling failed"); }); break;
      }
      CHECK(ended.get_future().get() == asio::error::operation_aborted);
      if (way == how::sibling_throws) {
        CHECK_THROWS_WITH_AS(group.wait(), "sibling failed", std::runtime_error);
      } else {
        CHECK_NOTHROW(group.wait());  // the coroutine returned normally; nothing was skipped
      }
    }
    CHECK(frame_marker::live.load() == 0);
  }
}

// The group posts each cancellation to its coroutine's strand. The thread
// that cancels must not wait for room in a full pool: on weft's deadline
// thread, that wait stopped every deadline in the process, the one that
// would have freed the worker included.
TEST_CASE("asio task_group: cancelling a group whose pool is full and held returns at once" *
          doctest::timeout(60)) {
  enum class how { parent_cancel, parent_deadline };
  for (const how way : {how::parent_cancel, how::parent_deadline}) {
    CAPTURE(static_cast<int>(way));
    {
      weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
      weft::cancel_source parent;
      weft::task_group group{pool.executor(), parent.token()};
      std::latch started{1};
      std::promise<error_code> ended;
      weft::co_spawn(group, wait_a_day(started, ended));
      started.wait();
      gate worker_gate;
      weft_test::hold_only_worker(pool, worker_gate.closed, 1);
      if (way == how::parent_cancel) {
        parent.cancel();
      } else {
        // The deadline thread cancels the parent (this thread, should the
        // deadline pass before the relay is registered).
        const weft::cancel_source deadline = weft::with_timeout(weft::cancel_token{}, 1ms);
        const auto relay = weft::on_cancel(deadline.token(), [&parent] { parent.cancel(); });
        parent.token().wait();
        // Fires only once the deadline thread is done with the first one's
        // callbacks, the group's post among them.
        weft::with_timeout(weft::cancel_token{}, 1ms).token().wait();
      }
      worker_gate.open();
      CHECK(ended.get_future().get() == asio::error::operation_aborted);
      CHECK_NOTHROW(group.wait());
    }
    CHECK(frame_marker::live.load() == 0);
  }
}

// A cancellation that comes once co_spawn has counted the coroutine in the
// group, but before the coroutine has started or armed its timer, must not
// be lost (asio PR#1756: register the cancel handler before starting the
// child): Asio's co_spawn ignores a signal emitted before its entry point
// runs the body, and a lost one leaves the coroutine on its day-long timer
// and the group's wait with it. At once from this thread, the cancel comes
// after co_spawn queued the start on the strand; from another thread after
// a random spin, it also comes inside co_spawn, its emission queued before
// the start (without the coroutine's own check of the token at its start,
// that round waited for good).
TEST_CASE("asio task_group: a cancellation in a coroutine's launch window is never lost" *
          doctest::timeout(120)) {
  constexpr int rounds = 200;
  std::mt19937 random{20261207};
  for (const std::size_t workers : {std::size_t{1}, std::size_t{4}}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    for (const bool from_other_thread : {false, true}) {
      CAPTURE(from_other_thread);
      for (int round = 0; round < rounds; ++round) {
        CAPTURE(round);
        std::latch started{1};  // counted down by the coroutine; nobody waits on it
        std::promise<error_code> ended;
        auto ended_future = ended.get_future();
        weft::task_group group{pool.executor()};
        // The canceller spins, ready, while co_spawn runs: its random spin
        // then sets where the cancel lands, not how long it took to start.
        std::latch canceller_ready{1};
        std::atomic<bool> go{false};
        std::thread canceller;
        if (from_other_thread) {
          canceller = std::thread([&group, &canceller_ready, &go, spins = random() % 4096] {
            canceller_ready.count_down();
            weft_test::spin_until([&go] { return go.load(); });
            for (auto left = spins; left != 0; --left) weft::detail::cpu_relax();
            group.cancel();
          });
          canceller_ready.wait();
          go = true;
        }
        weft::co_spawn(group, wait_a_day(started, ended));
        if (from_other_thread) {
          canceller.join();
        } else {
          group.cancel();
        }
        const bool joined = weft_test::eventually([&group] { return group.in_flight() == 0; });
        if (!joined) {
          // The cancellation was lost: the join destroys the waiting
          // coroutine, so the group can be destroyed and the test fail.
          pool.shutdown();
          pool.join();
        }
        REQUIRE(joined);
        try {
          group.wait();
          // The timer was armed when the cancellation reached it.
          REQUIRE(ended_future.wait_for(0s) == std::future_status::ready);
          CHECK(ended_future.get() == asio::error::operation_aborted);
        } catch (const boost::system::system_error& e) {
          // It came before the start: weft's wrapper threw at its co_await of the body.
          CHECK(e.code() == asio::error::operation_aborted);
        } catch (const std::system_error& e) {
          // It came before co_spawn counted the coroutine, which never started.
          CHECK(from_other_thread);
          CHECK(e.code() == weft::errc::cancelled);
        }
        CHECK(frame_marker::live.load() == 0);
      }
    }
  }
}

TEST_CASE("asio task_group: the three-argument co_spawn runs the coroutine on the executor it names" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread io_thread([&] { io.run(); });
  {
    weft::task_group group{pool.executor()};
    std::promise<bool> on_io;
    // Named: a coroutine lambda's captures live in the closure, which must
    // outlive the coroutine.
    auto body = [&]() -> asio::awaitable<void> {
      asio::steady_timer timer{co_await asio::this_coro::executor, 0ms};
      co_await timer.async_wait(asio::use_awaitable);
      on_io.set_value(io.get_executor().running_in_this_thread());
    };
    weft::co_spawn(group, io.get_executor(), body());
    CHECK(on_io.get_future().get());
    group.wait();

    // Cancellation reaches it on its own executor (one io thread: no race).
    std::latch started{1};
    std::promise<error_code> ended;
    weft::co_spawn(group, io.get_executor(), wait_a_day(started, ended));
    started.wait();
    group.cancel();
    CHECK(ended.get_future().get() == asio::error::operation_aborted);
    CHECK_NOTHROW(group.wait());
  }
  work.reset();
  io_thread.join();
  CHECK(frame_marker::live.load() == 0);
}

TEST_CASE("asio task_group: a group already cancelled starts no coroutine and wait reports it" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  group.cancel();
  std::atomic<bool> body_ran{false};
  auto body = [&]() -> asio::awaitable<void> {
    body_ran = true;
    co_return;
  };
  weft::co_spawn(group, body());
  try {
    group.wait();
    FAIL("wait() must report the coroutine it did not start");
  } catch (const std::system_error& e) {
    CHECK(e.code() == weft::errc::cancelled);
  }
  CHECK_FALSE(body_ran.load());
}

TEST_CASE("asio task_group: co_spawn onto a shut-down pool throws weft::rejected, as go() does" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1, .name = "closed"}};
  weft::task_group group{pool.executor()};
  pool.shutdown();
  std::atomic<int> done{0};
  CHECK_THROWS_WITH_AS(weft::co_spawn(group, count_after_timer(done)),
                       "weft::co_spawn: the pool \"closed\" is shut down", weft::rejected);
  CHECK_THROWS_AS(weft::co_spawn(group, pool.executor(), count_after_timer(done)), weft::rejected);
  CHECK_NOTHROW(group.wait());  // nothing was counted in the group
  CHECK(done.load() == 0);
  CHECK(frame_marker::live.load() == 0);
}

// A coroutine whose pool is joined while it waits can never resume: the
// pool's Asio services abandon its wait, which destroys it, and its task
// ends with weft::rejected. Before, nothing ended the task, and wait() (or
// the group's destructor) waited for good.
// After shutdown_now() too: there, join() used to return before it shut
// the services down.
TEST_CASE("asio task_group: a coroutine waiting as its pool is joined ends with weft::rejected" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  std::latch started{1};
  std::promise<error_code> ended;  // never set: the coroutine never resumes
  weft::co_spawn(group, wait_a_day(started, ended));
  started.wait();
  SUBCASE("shutdown") { pool.shutdown(); }
  SUBCASE("shutdown_now") { pool.shutdown_now(); }
  pool.join();
  CHECK(frame_marker::live.load() == 0);
  CHECK_THROWS_AS(group.wait(), weft::rejected);
}

namespace {

// Owns a group whose coroutine waits on a timer, and waits for the group
// without blocking. `child_ended_first` records whether the child's frame
// was gone when the group's destructor returned.
asio::awaitable<void> wait_for_group_of_one(weft::worker_pool& pool, std::latch& started,
                                            bool& child_ended_first) {
  struct after_group {
    bool& child_ended_first;
    ~after_group() { child_ended_first = frame_marker::live.load() == 1; }  // only this frame's
  };
  frame_marker marker;
  const after_group check{child_ended_first};
  weft::task_group group{pool.executor()};
  std::promise<error_code> never_set;
  weft::co_spawn(group, wait_a_day(started, never_set));
  co_await weft::async_wait(group, asio::use_awaitable);
}

}  // namespace

// The join destroys the parent's frame (its wait on the group is weft's
// Asio service, made after the timer's and so shut down before them), and
// the group's destructor there waited for a child whose frame the timer's
// service had yet to destroy, on the same thread: the join never returned.
TEST_CASE(
    "asio task_group: a pool joined while a coroutine waits on its own group's coroutines "
    "tears down" *
    doctest::timeout(30)) {
  bool child_ended_first = false;
  {
    weft::worker_pool pool{{.workers = 1}};
    // The timer services first: a context shuts its services down newest first.
    const asio::steady_timer made_first{pool.executor()};
    std::latch started{1};
    asio::co_spawn(pool.executor(), wait_for_group_of_one(pool, started, child_ended_first),
                   asio::detached);
    started.wait();
  }  // shutdown() + join()
  CHECK(frame_marker::live.load() == 0);
  CHECK(child_ended_first);
}

namespace {

// What a parent coroutine lends its group's coroutines: alive until the
// parent's frame goes, after the group's destructor has returned.
struct lent_state {
  std::atomic<bool> parent_alive{true};
  std::atomic<bool> seen_alive{false};
  std::atomic<bool> finished{false};
  weft::wait_group* group_pending = nullptr;  // the parent group's count
  std::atomic<bool> abandoned{false};         // the pool was destroyed
};

// On another io_context: once released, and once the parent's group waits
// for its coroutines, uses what the parent lent.
asio::awaitable<void> use_lent_state_once_released(weft::semaphore& release, lent_state& lent) {
  const auto permit = co_await weft::async_acquire(release, 1, asio::use_awaitable);
  weft_test::spin_until(
      [&] { return lent.group_pending->stats().waiters == 1 || lent.abandoned.load(); });
  if (lent.abandoned.load()) co_return;
  lent.seen_alive = lent.parent_alive.load();
  lent.finished = true;
}

// A group's coroutine on the pool that awaits a coroutine on `io`.
asio::awaitable<void> await_work_on(asio::io_context& io, weft::semaphore& release,
                                    lent_state& lent, weft::semaphore& suspended) {
  frame_marker marker;
  asio::post(co_await asio::this_coro::executor, [&suspended] { suspended.release(); });
  co_await asio::co_spawn(io, use_lent_state_once_released(release, lent), asio::use_awaitable);
}

// Owns a group whose coroutine awaits work on `io`, then waits on a timer.
// Its frame, as it is destroyed, releases that work just before the
// group's destructor runs.
asio::awaitable<void> lend_state_then_wait_a_day(weft::worker_pool& pool, asio::io_context& io,
                                                 weft::semaphore& release, lent_state& lent,
                                                 weft::semaphore& suspended) {
  frame_marker marker;
  struct lender {
    lent_state& lent;
    ~lender() { lent.parent_alive = false; }
  } const lends{lent};
  weft::task_group group{pool.executor()};
  lent.group_pending = &weft::detail::task_group_access::pending(group);
  struct releaser {
    weft::semaphore& release;
    ~releaser() { release.release(); }
  } const releases{release};
  weft::semaphore child_suspended{1};
  child_suspended.acquire();
  weft::co_spawn(group, await_work_on(io, release, lent, child_suspended));
  const auto permit = co_await weft::async_acquire(child_suspended, 1, asio::use_awaitable);
  asio::steady_timer timer{co_await asio::this_coro::executor, 24h};
  asio::post(co_await asio::this_coro::executor, [&suspended] { suspended.release(); });
  co_await timer.async_wait(asio::use_awaitable);
}

}  // namespace

// The join destroys the parent's frame while its group's coroutine awaits
// work on another io_context that still runs, and uses what the parent
// lent it: the group's destructor waits for that work, which ends the
// coroutine (its completion, dropped by the shut-down pool, destroys its
// frame), so the parent's state outlives every use. A teardown that let go
// of the coroutine instead, since it can never run again on its pool, had
// that work use the parent's state after the parent's frame was gone
// (here the work would wait for the group to wait until the test gives up
// on it).
TEST_CASE(
    "asio task_group: a pool joined while a group's coroutine awaits work on another io_context "
    "waits for that work" *
    doctest::timeout(30)) {
  asio::io_context io;
  auto io_work = asio::make_work_guard(io);
  std::thread io_thread([&io] { io.run(); });
  lent_state lent;
  weft::semaphore release{1};
  release.acquire();
  {
    weft::worker_pool pool{{.workers = 1}};
    weft::semaphore parent_suspended{1};
    parent_suspended.acquire();
    asio::co_spawn(pool.executor(),
                   lend_state_then_wait_a_day(pool, io, release, lent, parent_suspended),
                   asio::detached);
    parent_suspended.acquire();
  }  // shutdown() + join()
  lent.abandoned = true;
  CHECK(lent.finished.load());
  CHECK(lent.seen_alive.load());
  io_work.reset();
  io_thread.join();
  CHECK(frame_marker::live.load() == 0);
}

asio::awaitable<void> keep_own_executor(std::optional<asio::any_io_executor>& kept) {
  kept.emplace(co_await asio::this_coro::executor);
}

// Asio releases copies of a group coroutine's executor (a strand of the
// pool) in the coroutine's frames, which another context may destroy after
// the coroutine has ended its task and the pool is gone (its io_context
// destroyed while it awaited work there): every copy keeps the pool's
// services, so the strand's is still there when the copy goes.
TEST_CASE("asio task_group: a group coroutine's executor keeps the pool's services until it goes" *
          doctest::timeout(30)) {
  enum class named {
    none,
    pool_executor,
    any_io_executor,
    strand,
    strand_in_any_io_executor,
    strand_of_any_io_executor
  };
  for (const named executor :
       {named::none, named::pool_executor, named::any_io_executor, named::strand,
        named::strand_in_any_io_executor, named::strand_of_any_io_executor}) {
    CAPTURE(static_cast<int>(executor));
    destruction_witness::destroyed = false;
    std::optional<asio::any_io_executor> kept;
    {
      weft::worker_pool pool{{.workers = 1}};
      asio::use_service<destruction_witness>(
          asio::query(pool.executor(), asio::execution::context));
      weft::task_group group{pool.executor()};
      switch (executor) {
        case named::none:
          weft::co_spawn(group, keep_own_executor(kept));
          break;
        case named::pool_executor:
          weft::co_spawn(group, pool.executor(), keep_own_executor(kept));
          break;
        case named::any_io_executor:
          weft::co_spawn(group, asio::any_io_executor(pool.executor()), keep_own_executor(kept));
          break;
        // A strand of the pool holds its own state in the pool's strand
        // service: ASan reported it freed under the kept executor.
        case named::strand:
          weft::co_spawn(group, asio::make_strand(pool.executor()), keep_own_executor(kept));
          break;
        case named::strand_in_any_io_executor:
          weft::co_spawn(group, asio::any_io_executor(asio::make_strand(pool.executor())),
                         keep_own_executor(kept));
          break;
        case named::strand_of_any_io_executor:
          weft::co_spawn(group, asio::make_strand(asio::any_io_executor(pool.executor())),
                         keep_own_executor(kept));
          break;
      }
      group.wait();
      REQUIRE(kept.has_value());
    }
    CHECK_FALSE(destruction_witness::destroyed.load());
    kept.reset();
    CHECK(destruction_witness::destroyed.load());
  }
}

namespace {

// Runs without suspending until `opened` is cancelled, then returns or
// throws.
asio::awaitable<void> finish_when_opened(std::latch& started, weft::cancel_token opened,
                                         bool throws) {
  frame_marker marker;
  started.count_down();
  opened.wait();
  if (throws) throw std::runtime_error("its own error");
  co_return;
}

}  // namespace

// A coroutine that finishes as its pool shuts down reports its own
// outcome. Its end was left to the completion handler, which Asio's entry
// point reaches through a post to the strand; the shut-down pool dropped
// that step, and wait() waited for join() to report weft::rejected.
TEST_CASE(
    "asio task_group: a coroutine that finishes as its pool shuts down reports its own outcome" *
    doctest::timeout(30)) {
  for (const bool now : {false, true}) {
    for (const bool throws : {false, true}) {
      CAPTURE(now);
      CAPTURE(throws);
      weft::worker_pool pool{{.workers = 1}};
      weft::task_group group{pool.executor()};
      std::latch started{1};
      gate body_gate;
      weft::co_spawn(group, finish_when_opened(started, body_gate.closed, throws));
      started.wait();
      if (now) {
        pool.shutdown_now();
      } else {
        pool.shutdown();
      }
      body_gate.open();
      if (throws) {
        CHECK_THROWS_WITH_AS(group.wait(), "its own error", std::runtime_error);
      } else {
        CHECK_NOTHROW(group.wait());
      }
    }
  }
}

// shutdown_now() drops the group's only runner while its task waits in the
// group's queue: no runner will come, and async_wait(), which cannot run
// the task itself, waited for good. The task is abandoned and the group
// fails with weft::rejected.
TEST_CASE("asio task_group: async_wait ends in weft::rejected when the runner is dropped" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  gate worker_gate;
  weft_test::hold_only_worker(pool, worker_gate.closed, 1);
  weft::task_group group{pool.executor()};
  std::atomic<bool> ran{false};
  group.go([&] { ran = true; });  // its runner waits in the pool's queue
  std::promise<std::exception_ptr> waited;
  weft::async_wait(group, [&](std::exception_ptr error) { waited.set_value(error); });
  CHECK(pool.shutdown_now() == 2);  // the filler and the runner
  const std::exception_ptr error = waited.get_future().get();
  CHECK(message_of(error) ==
        "weft::task_group: its executor's pool \"worker_pool\" shut down before the group's tasks "
        "could run");
  CHECK_THROWS_AS(group.wait(), weft::rejected);
  worker_gate.open();
  pool.join();
  CHECK_FALSE(ran.load());
  CHECK(group.in_flight() == 0);
}

TEST_CASE("asio task_group: async_wait cancelled through its slot completes with an exception, tasks go on" *
          doctest::timeout(30)) {
  // Every type: async_compose passes on only terminal cancellation unless
  // told otherwise, and partial and total ones were ignored.
  for (const auto type : {asio::cancellation_type::terminal, asio::cancellation_type::partial,
                          asio::cancellation_type::total}) {
    CAPTURE(static_cast<int>(type));
    // Four workers: up to three runners (one per task, held by the gate) and
    // one for the emission and the completion handler.
    weft::worker_pool pool{{.workers = 4}};
    weft::task_group group{pool.executor()};
    gate held;
    std::atomic<int> finished{0};
    for (int i = 0; i < 3; ++i) {
      group.go([&finished, f = held.closed] {
        f.wait();
        finished.fetch_add(1);
      });
    }
    asio::cancellation_signal signal;
    std::promise<std::exception_ptr> waited;
    weft::async_wait(group, asio::bind_cancellation_slot(
                                signal.slot(),
                                asio::bind_executor(pool.executor(), [&](std::exception_ptr error) {
                                  waited.set_value(error);
                                })));
    // The wait is pending (the gate is closed); emit on the handler's
    // executor, as Asio asks.
    asio::post(pool.executor(), [&] { signal.emit(type); });
    const std::exception_ptr error = waited.get_future().get();
    REQUIRE(error != nullptr);
    try {
      std::rethrow_exception(error);
    } catch (const boost::system::system_error& e) {
      CHECK(e.code() == weft::errc::cancelled);
    } catch (...) {
      FAIL("expected a boost::system::system_error");
    }
    // The group itself was not cancelled: its tasks run to the end.
    CHECK_FALSE(group.token().cancelled());
    held.open();
    CHECK_NOTHROW(group.wait());
    CHECK(finished.load() == 3);
  }
}
