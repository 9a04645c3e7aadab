// SPDX-License-Identifier: BSL-1.0
// The executors issue's must-have tests: worker_pool, task_group,
// result_group, fan-out calls, and the pool as an Asio executor.
#include <weft/asio.hpp>
#include <weft/fan.hpp>
#include <weft/manual_clock.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <doctest/doctest.h>

#include "support.hpp"

#include <atomic>
#include <future>
#include <latch>
#include <list>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;

// Holds a pool's workers inside tasks until released, so a queue fills
// deterministically.
struct future_gate {
  std::promise<void> opened;
  std::shared_future<void> open_future = opened.get_future().share();
  void wait() const { open_future.wait(); }
  void open() { opened.set_value(); }
};

// Occupies every worker of `pool` with a task blocked on `g`; returns once
// all of them are running.
void occupy_every_worker(weft::worker_pool& pool, const future_gate& g) {
  std::latch running{static_cast<std::ptrdiff_t>(pool.size())};
  for (std::size_t i = 0; i < pool.size(); ++i) {
    // A copy of the future: the test may destroy the gate while a worker
    // is still on its way out of the wait.
    pool.post([&running, opened = g.open_future] {
      running.count_down();
      opened.wait();
    });
  }
  running.wait();
}

}  // namespace

TEST_CASE("worker_pool: zero workers or zero capacity is a clear error") {
  CHECK_THROWS_AS(weft::worker_pool({.workers = 0}), std::invalid_argument);
  CHECK_THROWS_AS(weft::worker_pool({.workers = 1, .queue_capacity = 0}), std::invalid_argument);
}

TEST_CASE("worker_pool: every posted task runs exactly once, on a worker") {
  weft::worker_pool pool{{.workers = 3, .queue_capacity = 8}};
  constexpr int tasks = 2000;
  std::vector<std::atomic<int>> runs(tasks);
  std::atomic<int> off_pool{0};
  weft::wait_group done;
  done.add(tasks);
  for (int i = 0; i < tasks; ++i) {
    pool.post([&, i] {
      if (!pool.running_in_this_thread()) off_pool.fetch_add(1);
      runs[i].fetch_add(1);
      done.done();
    });
  }
  done.wait();
  for (auto& r : runs) CHECK(r.load() == 1);
  CHECK(off_pool.load() == 0);
  CHECK_FALSE(pool.running_in_this_thread());
}

TEST_CASE("worker_pool: submit returns values, void, and exceptions through the future") {
  weft::worker_pool pool{{.workers = 2}};
  CHECK(pool.submit([] { return 42; }).get() == 42);
  auto owned = std::make_unique<std::string>("move-only capture");
  CHECK(pool.submit([p = std::move(owned)] { return *p; }).get() == "move-only capture");
  std::atomic<bool> ran{false};
  pool.submit([&] { ran = true; }).get();
  CHECK(ran.load());
  auto failing = pool.submit([]() -> int { throw std::runtime_error("from submit"); });
  CHECK_THROWS_WITH_AS(failing.get(), "from submit", std::runtime_error);
  std::array<long, 16> big{};
  big[15] = 7;
  CHECK(pool.submit([big] { return big[15]; }).get() == 7);  // captures past the inline size
}

TEST_CASE("worker_pool: overflow::reject throws weft::rejected and try_post declines") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 2, .on_full = weft::overflow::reject}};
  future_gate g;
  occupy_every_worker(pool, g);
  pool.post([] {});
  pool.post([] {});
  CHECK_THROWS_AS(pool.post([] {}), weft::rejected);
  CHECK_FALSE(pool.try_post([] {}));
  CHECK(pool.stats().rejected == 2);
  CHECK(pool.stats().queued == 2);
  CHECK(pool.stats().busy == 1);
  CHECK(pool.stats().peak_queued == 2);
  g.open();
}

TEST_CASE("worker_pool: overflow::caller_runs runs the task on the posting thread") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::caller_runs}};
  future_gate g;
  occupy_every_worker(pool, g);
  pool.post([] {});
  std::thread::id ran_on;
  pool.post([&] { ran_on = std::this_thread::get_id(); });
  CHECK(ran_on == std::this_thread::get_id());
  g.open();
}

TEST_CASE("worker_pool: overflow::block makes the producer wait for room (backpressure)") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  future_gate g;
  occupy_every_worker(pool, g);
  pool.post([] {});
  // The queue is full and stays full until the gate opens, so post() must
  // block, reject, or run the task here; it may only block.
  std::promise<std::thread::id> ran_on;
  std::thread::id producer_id;
  std::thread producer([&] {
    producer_id = std::this_thread::get_id();
    pool.post([&] { ran_on.set_value(std::this_thread::get_id()); });
  });
  g.open();
  producer.join();
  CHECK(ran_on.get_future().get() != producer_id);
  CHECK(pool.stats().rejected == 0);
}

TEST_CASE("worker_pool: post with a token gives up when the token is cancelled") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  future_gate g;
  occupy_every_worker(pool, g);
  pool.post([] {});
  weft::cancel_source already;
  already.cancel();
  std::atomic<bool> ran{false};
  CHECK(pool.post([&] { ran = true; }, already.token()) == weft::wait_status::cancelled);

  weft::cancel_source source;
  std::promise<weft::wait_status> result;
  std::thread producer([&] { result.set_value(pool.post([&] { ran = true; }, source.token())); });
  source.cancel();
  CHECK(result.get_future().get() == weft::wait_status::cancelled);
  producer.join();
  g.open();
  pool.shutdown();
  pool.join();
  CHECK_FALSE(ran.load());
}

TEST_CASE("worker_pool: a worker posting into its own full pool runs the task itself (no deadlock)") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  std::promise<std::thread::id> nested_on;
  std::promise<std::thread::id> worker_id;
  pool.post([&] {
    worker_id.set_value(std::this_thread::get_id());
    pool.post([] {});  // fills the queue: the only worker is this one
    pool.post([&] { nested_on.set_value(std::this_thread::get_id()); });
  });
  CHECK(nested_on.get_future().get() == worker_id.get_future().get());
}

TEST_CASE("worker_pool: a throwing task does not kill its worker, the handler gets the exception") {
  weft::worker_pool pool{{.workers = 1}};
  std::promise<std::string> seen;
  pool.set_error_handler([&](std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      seen.set_value(e.what());
    }
  });
  pool.post([] { throw std::runtime_error("task failed"); });
  CHECK(seen.get_future().get() == "task failed");
  CHECK(pool.submit([] { return 1; }).get() == 1);  // the worker lives
  CHECK(pool.stats().failed == 1);
}

TEST_CASE("worker_pool: the default error handler counts a failure and keeps the worker") {
  weft::worker_pool pool{{.workers = 1, .name = "default-handler-test"}};
  pool.post([] { throw 7; });
  CHECK(pool.submit([] { return 2; }).get() == 2);
  CHECK(pool.stats().failed == 1);
}

TEST_CASE("worker_pool: shutdown drains the queue, then posting throws weft::rejected") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 16}};
  future_gate g;
  occupy_every_worker(pool, g);
  std::atomic<int> ran{0};
  for (int i = 0; i < 10; ++i) pool.post([&] { ran++; });
  pool.shutdown();
  CHECK(pool.is_shutdown());
  CHECK_THROWS_AS(pool.post([] {}), weft::rejected);
  CHECK_THROWS_AS((void)pool.try_post([] {}), weft::rejected);
  g.open();
  pool.join();
  CHECK(ran.load() == 10);
  const auto s = pool.stats();
  CHECK(s.completed == 11);
  CHECK(s.submitted == 11);
  CHECK(s.rejected == 2);
}

TEST_CASE("worker_pool: shutdown_now drops what is queued, destroys it, and says how many") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 16}};
  future_gate g;
  occupy_every_worker(pool, g);
  auto destroyed = std::make_shared<std::atomic<int>>(0);
  struct counted {
    std::shared_ptr<std::atomic<int>> destroyed;
    counted(std::shared_ptr<std::atomic<int>> d) : destroyed(std::move(d)) {}
    counted(counted&&) noexcept = default;
    ~counted() {
      if (destroyed) destroyed->fetch_add(1);
    }
  };
  std::atomic<int> ran{0};
  for (int i = 0; i < 5; ++i) pool.post([c = counted{destroyed}, &ran] { ran++; });
  CHECK(pool.shutdown_now() == 5);
  CHECK(destroyed->load() == 5);
  g.open();
  pool.join();
  CHECK(ran.load() == 0);
  CHECK(pool.stats().dropped == 5);
}

TEST_CASE("worker_pool: shutdown wakes producers blocked on a full queue with weft::rejected") {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  future_gate g;
  occupy_every_worker(pool, g);
  pool.post([] {});
  std::promise<bool> rejected;
  std::thread producer([&] {
    try {
      pool.post([] {});
      rejected.set_value(false);
    } catch (const weft::rejected&) {
      rejected.set_value(true);
    }
  });
  pool.shutdown();
  CHECK(rejected.get_future().get());
  producer.join();
  g.open();
}

TEST_CASE("worker_pool: destroying a pool while its workers are idle or busy neither hangs nor leaks") {
  { weft::worker_pool idle{{.workers = 4}}; }
  std::atomic<int> ran{0};
  {
    weft::worker_pool busy{{.workers = 2, .queue_capacity = 64}};
    for (int i = 0; i < 64; ++i) busy.post([&] { ran++; });
  }
  CHECK(ran.load() == 64);
}

TEST_CASE("worker_pool: join from one of its own workers is a logic_error") {
  weft::worker_pool pool{{.workers = 1}};
  auto result = pool.submit([&] {
    try {
      pool.join();
    } catch (const std::logic_error&) {
      return true;
    }
    return false;
  });
  CHECK(result.get());
}

TEST_CASE("worker_pool: executors post to their pool and compare by pool") {
  weft::worker_pool a{{.workers = 1}};
  weft::worker_pool b{{.workers = 1}};
  CHECK(a.executor() == a.executor());
  CHECK_FALSE(a.executor() == b.executor());
  std::promise<bool> on_a;
  a.executor().post([&] { on_a.set_value(a.executor().running_in_this_thread() && !b.running_in_this_thread()); });
  CHECK(on_a.get_future().get());
  CHECK(weft::default_pool().size() == weft::hardware_threads());
  CHECK(weft::default_executor().context().submit([] { return 5; }).get() == 5);
}

TEST_CASE("task_group: wait joins all tasks and rethrows the first exception, in any position") {
  weft::worker_pool pool{{.workers = 2}};
  for (int failing : {0, 9, -1}) {
    weft::task_group group{pool.executor()};
    std::atomic<int> ran{0};
    for (int i = 0; i < 10; ++i) {
      group.go([&, i] {
        ran++;
        if (i == failing || failing == -1) throw std::runtime_error("task " + std::to_string(i));
      });
    }
    CHECK_THROWS_AS(group.wait(), std::runtime_error);
    CHECK(ran.load() >= 1);
  }
}

TEST_CASE("task_group: the first failure cancels the group's token so siblings stop") {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::latch sibling_waiting{1};
  std::atomic<bool> sibling_saw_cancel{false};
  group.go([&](weft::cancel_token token) {
    sibling_waiting.count_down();
    token.wait();
    sibling_saw_cancel = true;
  });
  sibling_waiting.wait();
  group.go([] { throw std::runtime_error("first failure"); });
  CHECK_THROWS_WITH_AS(group.wait(), "first failure", std::runtime_error);
  CHECK(sibling_saw_cancel.load());
  CHECK(group.token().cancelled());
}

TEST_CASE("task_group: a parent's cancellation reaches running tasks, and skipped tasks are reported") {
  weft::worker_pool pool{{.workers = 1}};
  weft::cancel_source parent;
  weft::task_group group{pool.executor(), parent.token()};
  std::latch running{1};
  group.go([&](weft::cancel_token token) {
    running.count_down();
    token.wait();
  });
  running.wait();
  parent.cancel();
  std::atomic<bool> skipped_ran{false};
  group.go([&] { skipped_ran = true; });
  try {
    group.wait();
    FAIL("wait() must report the skipped task");
  } catch (const std::system_error& e) {
    CHECK(e.code() == weft::errc::cancelled);
  }
  CHECK_FALSE(skipped_ran.load());
}

TEST_CASE("task_group: set_limit is never exceeded and try_go declines when full") {
  weft::worker_pool pool{{.workers = 4}};
  weft::task_group group{pool.executor()};
  CHECK_THROWS_AS(group.set_limit(0), std::invalid_argument);
  group.set_limit(2);
  std::atomic<int> in_flight{0};
  std::atomic<int> high_water{0};
  future_gate g;
  std::latch both_running{2};
  for (int i = 0; i < 2; ++i) {
    group.go([&] {
      const int now = ++in_flight;
      for (int seen = high_water.load(); now > seen && !high_water.compare_exchange_weak(seen, now);) {
      }
      both_running.count_down();
      g.wait();
      --in_flight;
    });
  }
  both_running.wait();
  CHECK_FALSE(group.try_go([] {}));
  CHECK_THROWS_AS(group.set_limit(3), std::logic_error);
  g.open();
  for (int i = 0; i < 200; ++i) {
    group.go([&] {
      const int now = ++in_flight;
      for (int seen = high_water.load(); now > seen && !high_water.compare_exchange_weak(seen, now);) {
      }
      --in_flight;
    });
  }
  group.wait();
  CHECK(high_water.load() == 2);
}

TEST_CASE("task_group: tasks spawning tasks into their own group, and wait racing those go calls") {
  weft::worker_pool pool{{.workers = 2}};
  for (int round = 0; round < 50; ++round) {
    weft::task_group group{pool.executor()};
    std::atomic<int> leaves{0};
    group.go([&] {
      for (int i = 0; i < 8; ++i) {
        group.go([&] {
          group.go([&] { leaves++; });
        });
      }
    });
    group.wait();
    CHECK(leaves.load() == 8);
  }
}

TEST_CASE("task_group: waiting from inside the only worker runs the group's own tasks (no deadlock)") {
  weft::worker_pool pool{{.workers = 1}};
  auto outcome = pool.submit([&] {
    weft::task_group inner{pool.executor()};
    std::atomic<int> ran{0};
    for (int i = 0; i < 10; ++i) inner.go([&] { ran++; });
    inner.wait();
    return ran.load();
  });
  CHECK(outcome.get() == 10);
}

TEST_CASE("task_group: destroyed during unwinding, it cancels its token and joins") {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<bool> task_finished{false};
  std::latch started{1};
  try {
    weft::task_group group{pool.executor()};
    group.go([&](weft::cancel_token token) {
      started.count_down();
      token.wait();
      task_finished = true;
    });
    started.wait();
    throw std::runtime_error("unwinding");
  } catch (const std::runtime_error&) {
    CHECK(task_finished.load());  // joined before the scope was left
  }
}

TEST_CASE("result_group: results come back in spawn order, move-only types too") {
  weft::worker_pool pool{{.workers = 2}};
  weft::result_group<std::unique_ptr<int>> group{pool.executor()};
  for (int i = 0; i < 50; ++i) group.go([i] { return std::make_unique<int>(i); });
  auto results = group.wait();
  REQUIRE(results.size() == 50);
  for (int i = 0; i < 50; ++i) CHECK(*results[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("gather: heterogeneous results, a token parameter, and void as monostate") {
  auto [number, text, nothing] =
      weft::gather(weft::cancel_token{}, [] { return 1; }, [](weft::cancel_token) { return std::string("two"); }, [] {});
  CHECK(number == 1);
  CHECK(text == "two");
  CHECK(std::is_same_v<decltype(nothing), std::monostate>);
}

TEST_CASE("gather: the first failure cancels the others and is rethrown") {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<bool> sibling_cancelled{false};
  // The failure waits for the sibling to start: a call not started when the
  // token is cancelled is skipped, and this test is about one that runs.
  std::latch sibling_started{1};
  CHECK_THROWS_WITH_AS(weft::gather(pool.executor(), weft::cancel_token{},
                                    [&](weft::cancel_token token) {
                                      sibling_started.count_down();
                                      token.wait();
                                      sibling_cancelled = true;
                                      return 0;
                                    },
                                    [&]() -> int {
                                      sibling_started.wait();
                                      throw std::runtime_error("backend down");
                                    }),
                       "backend down", std::runtime_error);
  CHECK(sibling_cancelled.load());
}

TEST_CASE("gather: a deadline cancels running calls, and skips calls not yet started") {
  weft::worker_pool pool{{.workers = 2}};
  const auto deadline =
      weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + std::chrono::milliseconds(50));
  std::latch waiting{1};
  std::thread clock([&] {
    waiting.wait();
    weft::manual_clock::advance(std::chrono::milliseconds(50));
  });
  auto [saw_deadline] = weft::gather(pool.executor(), deadline.token(), [&](weft::cancel_token token) {
    waiting.count_down();
    token.wait();
    return token.cause().is_deadline();
  });
  clock.join();
  CHECK(saw_deadline);
  try {
    weft::gather(pool.executor(), deadline.token(), [] { return 1; });
    FAIL("gather must report the calls it skipped");
  } catch (const std::system_error& e) {
    CHECK(e.code() == weft::errc::deadline_exceeded);
  }
}

TEST_CASE("parallel_map and for_each: input order, the limit, any range, the first failure") {
  weft::worker_pool pool{{.workers = 3}};
  std::vector<int> numbers(100);
  for (int i = 0; i < 100; ++i) numbers[static_cast<std::size_t>(i)] = i;
  std::atomic<int> in_flight{0};
  std::atomic<int> high_water{0};
  auto squares = weft::parallel_map(
      numbers,
      [&](int x) {
        const int now = ++in_flight;
        for (int seen = high_water.load(); now > seen && !high_water.compare_exchange_weak(seen, now);) {
        }
        --in_flight;
        return x * x;
      },
      {.limit = 2, .executor = pool.executor()});
  REQUIRE(squares.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(squares[static_cast<std::size_t>(i)] == i * i);
  CHECK(high_water.load() <= 2);

  std::list<int> linked{1, 2, 3};
  weft::for_each(linked, [](int& x) { x *= 10; }, {.executor = pool.executor()});
  CHECK(linked == std::list<int>{10, 20, 30});
  CHECK(weft::parallel_map(std::vector<int>{}, [](int x) { return x; }).empty());

  std::atomic<int> calls{0};
  CHECK_THROWS_AS(weft::for_each(
                      numbers,
                      [&](int) {
                        calls++;
                        throw std::runtime_error("stop");
                      },
                      {.limit = 1, .executor = pool.executor()}),
                  std::runtime_error);
  CHECK(calls.load() == 1);
}

namespace {

asio::awaitable<int> double_after_timer(int x) {
  asio::steady_timer timer{co_await asio::this_coro::executor, std::chrono::milliseconds(0)};
  co_await timer.async_wait(asio::use_awaitable);
  co_return 2 * x;
}

asio::awaitable<void> wait_forever(std::latch& started) {
  asio::steady_timer timer{co_await asio::this_coro::executor, std::chrono::hours(24)};
  started.count_down();
  co_await timer.async_wait(asio::use_awaitable);
}

asio::awaitable<void> fail_in_coroutine() {
  co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  throw std::runtime_error("coroutine failed");
}

}  // namespace

TEST_CASE("asio: post and co_spawn run on the pool, any_io_executor converts") {
  weft::worker_pool pool{{.workers = 2}};
  std::promise<bool> on_pool;
  asio::post(pool.executor(), [&] { on_pool.set_value(pool.running_in_this_thread()); });
  CHECK(on_pool.get_future().get());
  asio::any_io_executor any = pool.executor();
  CHECK(asio::co_spawn(any, double_after_timer(21), asio::use_future).get() == 42);
}

TEST_CASE("asio: coroutines in a group: failures reach async_wait, cancellation reaches timers") {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::latch started{1};
  weft::co_spawn(group, wait_forever(started));
  started.wait();
  weft::co_spawn(group, fail_in_coroutine());
  auto waited = asio::co_spawn(
      pool.executor(),
      [&]() -> asio::awaitable<std::string> {
        try {
          co_await weft::async_wait(group, asio::use_awaitable);
        } catch (const std::exception& e) {
          co_return e.what();
        }
        co_return "no exception";
      },
      asio::use_future);
  CHECK(waited.get() == "coroutine failed");  // the day-long timer was cancelled
  CHECK_THROWS_WITH_AS(group.wait(), "coroutine failed", std::runtime_error);
}
