// SPDX-License-Identifier: BSL-1.0
// Tests for weft's fan-out calls (weft/fan.hpp): gather's tuple of
// heterogeneous results (void as std::monostate, move-only values, calls
// taking a cancel_token), its first-failure and deadline behaviour, and
// parallel_map / for_each: input order, the limit, ranges that are not
// random-access, empty ranges, the first failure, each element once.
//
// Deadlines are on weft::manual_clock (with_deadline), moved by a helper
// thread once the calls are known to wait: nothing sleeps. gather_for, which
// reads the steady clock, is only used with timeouts that are either already
// past or far away, so no result depends on timing.
#include <weft/cancel.hpp>
#include <weft/fan.hpp>
#include <weft/manual_clock.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <forward_list>
#include <future>
#include <latch>
#include <list>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <ranges>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include "pool_support.hpp"
#include "support.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::high_water;
using weft_test::spin_until;

std::error_code code_of(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::system_error& e) {
    return e.code();
  } catch (...) {
  }
  return std::make_error_code(std::errc::invalid_argument);  // "not a system_error"
}

template <class F>
std::exception_ptr thrown_by(F&& f) {
  try {
    f();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

// What parallel_map over `elements` under `token` throws; `calls` counts the
// calls it made.
std::exception_ptr map_error_under(weft::worker_pool& pool, const weft::cancel_token& token,
                                   std::vector<int> elements, std::atomic<int>& calls) {
  return thrown_by([&] {
    (void)weft::parallel_map(elements,
                             [&](int x) {
                               calls.fetch_add(1);
                               return x;
                             },
                             {.token = token, .executor = pool.executor()});
  });
}

}  // namespace

// ---------------------------------------------------------------------------
// gather

TEST_CASE("gather: heterogeneous results in argument order, void is monostate, move-only values move" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<bool> void_ran{false};
  auto results = weft::gather(
      pool.executor(), weft::cancel_token{}, [] { return 1; },
      [](const weft::cancel_token& token) { return std::string(token.cancelled() ? "cancelled" : "two"); },
      [&] { void_ran = true; }, [] { return std::make_unique<double>(3.5); },
      [](weft::cancel_token) {});
  static_assert(std::is_same_v<decltype(results), std::tuple<int, std::string, std::monostate,
                                                             std::unique_ptr<double>, std::monostate>>);
  auto& [number, text, nothing, pointer, nothing_either] = results;
  CHECK(number == 1);
  CHECK(text == "two");
  CHECK(void_ran.load());
  REQUIRE(pointer != nullptr);
  CHECK(*pointer == 3.5);
  (void)nothing;
  (void)nothing_either;

  // The default executor.
  auto [a, b] = weft::gather(weft::cancel_token{}, [] { return 'a'; }, [](weft::cancel_token) { return 2L; });
  CHECK(a == 'a');
  CHECK(b == 2L);
  weft::cancel_source request;
  auto [c] = weft::gather(request.token(), [](const weft::cancel_token& token) { return token.cancelled(); });
  CHECK_FALSE(c);

  // One call whose result is a pair, or a tuple, is one element of the tuple.
  auto pair_result = weft::gather(request.token(), [] { return std::pair{1, 2.5}; });
  static_assert(std::is_same_v<decltype(pair_result), std::tuple<std::pair<int, double>>>);
  CHECK(std::get<0>(pair_result) == std::pair{1, 2.5});
  auto tuple_result = weft::gather(request.token(), [] { return std::tuple{'x'}; });
  static_assert(std::is_same_v<decltype(tuple_result), std::tuple<std::tuple<char>>>);
  CHECK(std::get<0>(std::get<0>(tuple_result)) == 'x');
}

TEST_CASE("gather: the calls run concurrently (one waits for another's signal)" * doctest::timeout(30)) {
  for (const std::size_t workers : {1u, 2u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    std::promise<int> from_second;
    auto [first, second] = weft::gather(
        pool.executor(), weft::cancel_token{}, [&] { return from_second.get_future().get() + 1; },
        [&] {
          from_second.set_value(41);
          return 0;
        });
    CHECK(first == 42);
    CHECK(second == 0);
  }
}

TEST_CASE("gather: the first failure cancels the other calls and is rethrown" * doctest::timeout(30)) {
  // Three workers: enough runners for three calls at once.
  weft::worker_pool pool{{.workers = 3}};
  std::latch both_waiting{2};
  std::atomic<int> saw_failure_as_cause{0};
  auto waiter = [&](const weft::cancel_token& token) {
    both_waiting.count_down();
    token.wait();
    try {
      token.cause().rethrow();
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()) == "backend down") saw_failure_as_cause.fetch_add(1);
    }
    return 0;
  };
  const auto error = thrown_by([&] {
    (void)weft::gather(pool.executor(), weft::cancel_token{}, waiter, waiter, [&]() -> std::string {
      both_waiting.wait();
      throw std::runtime_error("backend down");
    });
  });
  REQUIRE(error != nullptr);
  CHECK_THROWS_WITH_AS(std::rethrow_exception(error), "backend down", std::runtime_error);
  CHECK(saw_failure_as_cause.load() == 2);
}

TEST_CASE("gather: a manual-clock deadline cancels the running calls with deadline_exceeded" *
          doctest::timeout(30)) {
  // Two workers: one runner and the calling thread, for two calls at once.
  weft::worker_pool pool{{.workers = 2}};
  auto deadline = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 5s);
  std::latch both_waiting{2};
  std::thread clock([&] {
    both_waiting.wait();
    weft::manual_clock::advance(5s);
  });
  std::atomic<bool> returner_saw_deadline{false};
  const auto error = thrown_by([&] {
    (void)weft::gather(
        pool.executor(), deadline.token(),
        // One call notices and returns...
        [&](const weft::cancel_token& token) {
          both_waiting.count_down();
          token.wait();
          returner_saw_deadline = token.cause().is_deadline();
          return 1;
        },
        // ...the other reports its cancellation as errors usually are.
        [&](const weft::cancel_token& token) -> int {
          both_waiting.count_down();
          token.wait();
          token.cause().rethrow();
        });
  });
  clock.join();
  CHECK(returner_saw_deadline.load());
  REQUIRE(error != nullptr);
  CHECK(code_of(error) == weft::errc::deadline_exceeded);
}

TEST_CASE("gather: under a token already cancelled or past its deadline, no call runs and gather says why" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<int> ran{0};
  auto call = [&] { return ran.fetch_add(1); };

  auto past = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now());
  CHECK(code_of(thrown_by([&] { (void)weft::gather(pool.executor(), past.token(), call, call); })) ==
        weft::errc::deadline_exceeded);

  weft::cancel_source cancelled;
  cancelled.cancel();
  CHECK(code_of(thrown_by([&] { (void)weft::gather(pool.executor(), cancelled.token(), call); })) ==
        weft::errc::cancelled);

  // gather_for reads the steady clock: a zero timeout is already past.
  CHECK(code_of(thrown_by([&] { (void)weft::gather_for(0ms, weft::cancel_token{}, call, call); })) ==
        weft::errc::deadline_exceeded);
  CHECK(ran.load() == 0);

  // A far deadline changes nothing.
  auto [x, y] = weft::gather_for(1h, weft::cancel_token{}, call, [] { return std::string("y"); });
  CHECK(x == 0);
  CHECK(y == "y");
}

TEST_CASE("gather: calls see the caller's token through theirs" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source request;
  std::latch waiting{1};
  std::thread canceller([&] {
    waiting.wait();
    request.cancel(std::make_error_code(std::errc::connection_reset));
  });
  auto [code] = weft::gather(pool.executor(), request.token(), [&](const weft::cancel_token& token) {
    waiting.count_down();
    token.wait();
    return token.cause().code();
  });
  canceller.join();
  CHECK(code == std::errc::connection_reset);
}

// ---------------------------------------------------------------------------
// parallel_map

TEST_CASE("parallel_map: results in input order although calls finish in reverse" * doctest::timeout(30)) {
  // Element i finishes only after element i + 1: four calls blocked at
  // once, on four runners.
  constexpr int count = 4;
  weft::worker_pool pool{{.workers = 4}};
  std::vector<std::promise<void>> finished(count);
  std::vector<std::shared_future<void>> finished_future;
  for (auto& p : finished) finished_future.push_back(p.get_future().share());
  std::mutex order_mutex;
  std::vector<int> finish_order;
  std::vector<int> input{0, 1, 2, 3};
  auto out = weft::parallel_map(
      input,
      [&](int i) {
        if (i + 1 < count) finished_future[static_cast<std::size_t>(i + 1)].wait();
        {
          std::lock_guard lock(order_mutex);
          finish_order.push_back(i);
        }
        finished[static_cast<std::size_t>(i)].set_value();
        return std::to_string(i);
      },
      {.limit = count, .executor = pool.executor()});
  CHECK(finish_order == std::vector<int>{3, 2, 1, 0});
  CHECK(out == std::vector<std::string>{"0", "1", "2", "3"});
}

TEST_CASE("parallel_map: many elements keep their order, with and without a token parameter" *
          doctest::timeout(30)) {
  for (const std::size_t workers : {1u, 2u, 3u, 8u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    std::vector<int> input(1000);
    std::iota(input.begin(), input.end(), 0);
    auto squares = weft::parallel_map(input, [](int x) { return x * x; }, {.executor = pool.executor()});
    auto tokened = weft::parallel_map(
        input, [](const int& x, const weft::cancel_token& token) { return token.cancelled() ? -1 : x + 1; },
        {.executor = pool.executor()});
    REQUIRE(squares.size() == input.size());
    REQUIRE(tokened.size() == input.size());
    bool in_order = true;
    for (std::size_t i = 0; i < input.size(); ++i) {
      in_order = in_order && squares[i] == input[i] * input[i] && tokened[i] == input[i] + 1;
    }
    CHECK(in_order);
  }
}

TEST_CASE("parallel_map: bool results and results with no default constructor, over many elements" *
          doctest::timeout(30)) {
  // Results are assigned in place when they default-construct and
  // move-assign without throwing; bools and the rest take the other path (a
  // std::vector<bool> written from several threads would race, which TSan
  // reports).
  struct no_default {
    explicit no_default(int v) : value(v) {}
    int value;
  };
  weft::worker_pool pool{{.workers = 3}};
  std::vector<int> input(20'000);
  std::iota(input.begin(), input.end(), 0);
  const auto thirds = weft::parallel_map(input, [](int x) { return x % 3 == 0; }, {.executor = pool.executor()});
  const auto wrapped = weft::parallel_map(input, [](int x) { return no_default{x}; }, {.executor = pool.executor()});
  static_assert(std::is_same_v<decltype(thirds), const std::vector<bool>>);
  REQUIRE(thirds.size() == input.size());
  REQUIRE(wrapped.size() == input.size());
  bool right = true;
  for (std::size_t i = 0; i < input.size(); ++i) {
    right = right && thirds[i] == (input[i] % 3 == 0) && wrapped[i].value == input[i];
  }
  CHECK(right);
}

TEST_CASE("parallel_map: .limit is never exceeded, and is reached" * doctest::timeout(60)) {
  for (const std::size_t limit : {1u, 2u, 3u}) {
    CAPTURE(limit);
    // More workers than the limit, so the limit is what holds calls back.
    weft::worker_pool pool{{.workers = limit + 3}};
    high_water tracker;
    std::latch first_ones{static_cast<std::ptrdiff_t>(limit)};
    std::atomic<int> arrived{0};
    std::vector<int> input(200);
    std::iota(input.begin(), input.end(), 0);
    auto out = weft::parallel_map(
        input,
        [&](int x) {
          tracker.enter();
          // The first `limit` calls meet, so the limit is really reached...
          if (arrived.fetch_add(1) < static_cast<int>(limit)) first_ones.arrive_and_wait();
          // ...and every call stays a while in flight (yielding) so that
          // one over the limit would be seen.
          for (int y = 0; y < 10; ++y) std::this_thread::yield();
          tracker.leave();
          return x;
        },
        {.limit = limit, .executor = pool.executor()});
    CHECK(out == input);
    CHECK(tracker.most.load() == static_cast<int>(limit));
  }
}

TEST_CASE("parallel_map: the default limit is about the pool's size" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  high_water tracker;
  std::vector<int> input(300, 1);
  auto out = weft::parallel_map(
      input,
      [&](int x) {
        tracker.enter();
        for (int y = 0; y < 10; ++y) std::this_thread::yield();
        tracker.leave();
        return x;
      },
      {.executor = pool.executor()});
  CHECK(out.size() == 300);
  // One per worker, plus the calling thread if weft::hardware_threads() is
  // more than the pool's workers (fan.hpp).
  const int limit = weft::hardware_threads() > 2 ? 3 : 2;
  CHECK(tracker.most.load() <= limit);
  CHECK(tracker.most.load() >= 1);
}

TEST_CASE("parallel_map: ranges that are not random-access or not sized, views, and empty ranges" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  const weft::fan_options on_pool{.executor = pool.executor()};

  std::list<std::string> words{"a", "bb", "ccc", "dddd", "eeeee"};
  CHECK(weft::parallel_map(words, [](const std::string& w) { return w.size(); }, on_pool) ==
        std::vector<std::size_t>{1, 2, 3, 4, 5});

  std::forward_list<int> singly{5, 6, 7};
  CHECK(weft::parallel_map(singly, [](int x) { return -x; }, on_pool) == std::vector<int>{-5, -6, -7});

#if defined(__cpp_lib_ranges)  // libc++ 14 has no std::views
  std::vector<int> numbers(50);
  std::iota(numbers.begin(), numbers.end(), 0);
  auto evens = numbers | std::views::filter([](int x) { return x % 2 == 0; });
  auto halves = weft::parallel_map(evens, [](int x) { return x / 2; }, on_pool);
  REQUIRE(halves.size() == 25);
  for (int i = 0; i < 25; ++i) CHECK(halves[static_cast<std::size_t>(i)] == i);

  CHECK(weft::parallel_map(std::views::iota(0, 10), [](int x) { return x * 3; }, on_pool) ==
        std::vector<int>{0, 3, 6, 9, 12, 15, 18, 21, 24, 27});
#endif

  std::atomic<int> calls{0};
  auto count_call = [&](int x) {
    calls.fetch_add(1);
    return x;
  };
  CHECK(weft::parallel_map(std::vector<int>{}, count_call, on_pool).empty());
  CHECK(weft::parallel_map(std::list<int>{}, count_call, on_pool).empty());
  weft::for_each(std::list<int>{}, count_call, on_pool);
  CHECK(calls.load() == 0);
}

TEST_CASE("parallel_map: the first failure stops the rest and is rethrown" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 3}};
  std::vector<int> input(100);
  std::iota(input.begin(), input.end(), 0);

  // With one call in flight, a failure on the first element stops all.
  std::atomic<int> calls{0};
  CHECK_THROWS_WITH_AS(weft::parallel_map(
                           input,
                           [&](int) -> int {
                             calls.fetch_add(1);
                             throw std::runtime_error("element failed");
                           },
                           {.limit = 1, .executor = pool.executor()}),
                       "element failed", std::runtime_error);
  CHECK(calls.load() == 1);

  // With three, the others see the group cancelled and take no new element.
  calls = 0;
  std::atomic<int> saw_cancel{0};
  CHECK_THROWS_WITH_AS(weft::parallel_map(
                           input,
                           [&](int x, const weft::cancel_token& token) -> int {
                             calls.fetch_add(1);
                             if (x == 0) {
                               // Fails once another call is running: that
                               // one must see the token cancelled.
                               spin_until([&] { return calls.load() >= 2; });
                               throw std::runtime_error("element 0 failed");
                             }
                             // The others wait for the failure, then stop.
                             token.wait();
                             saw_cancel.fetch_add(1);
                             return x;
                           },
                           {.limit = 3, .executor = pool.executor()}),
                       "element 0 failed", std::runtime_error);
  CHECK(calls.load() >= 2);
  CHECK(calls.load() <= 3);
  CHECK(saw_cancel.load() == calls.load() - 1);
}

TEST_CASE("parallel_map: a failure on the calling thread's own share cancels the pool's calls and is rethrown" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<int> input(100);
  const auto caller = std::this_thread::get_id();
  std::atomic<int> on_pool{0};
  std::atomic<int> saw_cancel{0};
  // A call on the pool blocks until the group is cancelled, so its task
  // holds one run of elements at most and the caller's share gets some.
  // The caller's call fails once a call on the pool is running.
  CHECK_THROWS_WITH_AS(weft::parallel_map(input,
                                          [&](int x, const weft::cancel_token& token) -> int {
                                            if (std::this_thread::get_id() == caller) {
                                              spin_until([&] { return on_pool.load() >= 1; });
                                              throw std::runtime_error("caller's call failed");
                                            }
                                            on_pool.fetch_add(1);
                                            token.wait();
                                            saw_cancel.fetch_add(1);
                                            return x;
                                          },
                                          {.limit = 2, .executor = pool.executor()}),
                       "caller's call failed", std::runtime_error);
  CHECK(on_pool.load() >= 1);
  CHECK(saw_cancel.load() == on_pool.load());
}

TEST_CASE(
    "parallel_map and for_each: a parent token cancelled mid-run stops the calls not "
    "started, and its cause is thrown" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<int> input(1000);
  std::iota(input.begin(), input.end(), 0);
  for (const bool map : {true, false}) {
    CAPTURE(map);
    weft::cancel_source request;
    std::atomic<int> calls{0};
    std::atomic<bool> cancel_returned{false};
    std::atomic<int> started_after{0};
    // The tenth call cancels the caller's token. Calls that other tasks
    // make before the cancel returns are not late; a call that starts after
    // it is, and only one per other task may (it saw the token uncancelled
    // just before).
    const auto call = [&](int, const weft::cancel_token& token) {
      if (cancel_returned.load()) started_after.fetch_add(1);
      if (calls.fetch_add(1) + 1 == 10) {
        request.cancel(std::make_error_code(std::errc::timed_out));
        cancel_returned = true;
        CHECK(token.cancelled());
      }
      return 0;
    };
    const auto error = thrown_by([&] {
      const weft::fan_options options{.token = request.token(), .executor = pool.executor()};
      if (map) {
        (void)weft::parallel_map(input, call, options);
      } else {
        weft::for_each(input, call, options);
      }
    });
    REQUIRE(error != nullptr);
    CHECK(code_of(error) == std::errc::timed_out);
    CHECK(calls.load() >= 10);
    CHECK(calls.load() < 1000);
    CHECK(started_after.load() <= static_cast<int>(pool.size()));
  }
}

TEST_CASE(
    "parallel_map, for_each, gather and fan_out refuse a null function pointer before any call" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  const weft::fan_options on_pool{.executor = pool.executor()};
  int (*no_map)(int) = nullptr;
  void (*no_visit)(int) = nullptr;
  int (*no_call)() = nullptr;
  std::atomic<int> calls{0};
  const auto counted = [&] { return calls.fetch_add(1); };
  CHECK_THROWS_WITH_AS(weft::parallel_map(std::vector<int>{1, 2, 3}, no_map, on_pool),
                       "weft::parallel_map: the function pointer is null", std::invalid_argument);
  CHECK_THROWS_WITH_AS(weft::for_each(std::vector<int>{1, 2, 3}, no_visit, on_pool),
                       "weft::for_each: the function pointer is null", std::invalid_argument);
  CHECK_THROWS_WITH_AS(weft::gather(pool.executor(), weft::cancel_token{}, counted, no_call),
                       "weft::gather: the function pointer is null", std::invalid_argument);
  CHECK(calls.load() == 0);

  weft::channel<int> in{1};
  weft::task_group group{pool.executor()};
  CHECK_THROWS_WITH_AS(weft::fan_out(group, in, 2, no_visit),
                       "weft::fan_out: the function pointer is null", std::invalid_argument);
  CHECK(group.in_flight() == 0);
  group.wait();
}

TEST_CASE(
    "parallel_map: plain results that cannot be assigned (a const member) are returned in order" *
    doctest::timeout(30)) {
  struct fixed {
    const int value = 0;
  };
  static_assert(std::is_trivially_copyable_v<fixed> && !std::is_move_assignable_v<fixed>);
  weft::worker_pool pool{{.workers = 2}};
  std::vector<int> input(200);
  std::iota(input.begin(), input.end(), 0);
  const auto out =
      weft::parallel_map(input, [](int x) { return fixed{2 * x}; }, {.executor = pool.executor()});
  REQUIRE(out.size() == input.size());
  for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i].value == 2 * static_cast<int>(i));
}

TEST_CASE(
    "parallel_map: fan-outs made by every worker of their own pool, all busy, finish (1 and 2 "
    "workers)" *
    doctest::timeout(60)) {
  for (const std::size_t workers : {std::size_t{1}, std::size_t{2}}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    std::vector<int> input(300);
    std::iota(input.begin(), input.end(), 1);
    const long expected = 300L * 301 / 2;
    // More outer tasks than workers: the helpers of each fan-out find the
    // workers busy with outer tasks, and its caller runs what they do not.
    constexpr int outer = 6;
    std::vector<std::future<long>> sums;
    for (int k = 0; k < outer; ++k) {
      sums.push_back(pool.submit([&] {
        const auto same =
            weft::parallel_map(input, [](int x) { return x; }, {.executor = pool.executor()});
        return std::accumulate(same.begin(), same.end(), 0L);
      }));
    }
    for (auto& sum : sums) CHECK(sum.get() == expected);
  }
}

TEST_CASE("parallel_map, for_each and gather on a shut-down pool throw weft::rejected, however few the calls" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  pool.shutdown();
  std::atomic<int> calls{0};
  const auto count = [&](int x) {
    calls.fetch_add(1);
    return x;
  };
  for (const std::size_t limit : {0u, 1u, 3u}) {
    CAPTURE(limit);
    CHECK_THROWS_AS(weft::parallel_map(std::vector<int>{1}, count, {.limit = limit, .executor = pool.executor()}),
                    weft::rejected);
    CHECK_THROWS_AS(weft::for_each(std::vector<int>{1, 2}, count, {.limit = limit, .executor = pool.executor()}),
                    weft::rejected);
  }
  CHECK_THROWS_AS(weft::gather(pool.executor(), weft::cancel_token{}, [&] { return count(1); }), weft::rejected);
  CHECK_THROWS_AS(weft::for_each(std::vector<int>{}, count, {.executor = pool.executor()}),
                  weft::rejected);
  CHECK(calls.load() == 0);
}

// The pool refuses the caller's go() once it is shut down. The refusal used
// to leave run_indexed by unwinding, which destroyed the state of the calls
// still running before the group joined them, and dropped the exception of
// a call that had failed before (printed as lost).
TEST_CASE(
    "parallel_map: a pool shut down while the call starts its tasks joins the started calls, and "
    "an earlier exception of theirs wins" *
    doctest::timeout(60)) {
  for (int round = 0; round < 20; ++round) {
    CAPTURE(round);
    weft::worker_pool pool{{.workers = 2, .queue_capacity = 64}};
    std::vector<int> input(10'000);
    std::iota(input.begin(), input.end(), 0);
    std::atomic<int> running{0};
    std::atomic<bool> second_started{false};
    // Element 0 fails once element 1 has started (a task skips the elements
    // it claims after the failure); element 1, once its token says so, shuts
    // the pool down while the caller is still starting tasks. Each claim
    // takes one element, so no claim holds both.
    const auto call = [&](int i, const weft::cancel_token& token) {
      running.fetch_add(1);
      if (i == 0) {
        while (!second_started.load()) std::this_thread::yield();
        running.fetch_sub(1);
        throw std::runtime_error("element 0");
      }
      if (i == 1) {
        second_started.store(true);
        while (!token.cancelled()) std::this_thread::yield();
        pool.shutdown();
      }
      running.fetch_sub(1);
      return i;
    };
    try {
      (void)weft::parallel_map(input, call, {.limit = input.size(), .executor = pool.executor()});
      FAIL("element 0 threw, so parallel_map must throw");
    } catch (const std::runtime_error& e) {
      CHECK(std::string{e.what()} == "element 0");
    }
    CHECK(running.load() == 0);
  }
}

TEST_CASE("parallel_map: a token cancelled before the call runs nothing and throws its cause" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source request;
  request.cancel(std::make_error_code(std::errc::timed_out));
  std::atomic<int> calls{0};
  const auto error = map_error_under(pool, request.token(), {1, 2, 3}, calls);
  REQUIRE(error != nullptr);
  CHECK(code_of(error) == std::errc::timed_out);
  CHECK(calls.load() == 0);
}

// A one-worker pool whose worker a task holds until release(), so that
// what is posted meanwhile waits in the queue.
struct held_pool {
  weft::cancel_source gate;
  std::latch holding{1};
  weft::worker_pool pool{{.workers = 1}};  // last: destroyed (joined) first

  held_pool() {
    pool.post([this, token = gate.token()] {
      holding.count_down();
      token.wait();
    });
    holding.wait();
  }
  void release() { gate.cancel(); }
};

TEST_CASE(
    "parallel_map: a busy pool leaves every call to the calling thread, and the late helper does "
    "nothing" *
    doctest::timeout(30)) {
  held_pool held;
  // The helper is queued behind the task that holds the only worker; the
  // call must not wait for it.
  const auto caller = std::this_thread::get_id();
  std::atomic<int> elsewhere{0};
  std::vector<int> input(100);
  std::iota(input.begin(), input.end(), 0);
  const auto out = weft::parallel_map(input,
                                      [&](int x) {
                                        if (std::this_thread::get_id() != caller)
                                          elsewhere.fetch_add(1);
                                        return 2 * x;
                                      },
                                      {.limit = 2, .executor = held.pool.executor()});
  CHECK(elsewhere.load() == 0);
  for (std::size_t i = 0; i < input.size(); ++i) CHECK(out[i] == 2 * input[i]);
  // The helper now runs after its call returned: it must neither call f
  // nor touch the returned call's frame (ASan would see that).
  held.release();
  spin_until([&] { return held.pool.stats().completed == 2; });
  CHECK(elsewhere.load() == 0);
}

// A call's shared state is its thread's to reuse. One that a late helper
// still held was left to that helper to free, on its worker, and the next
// call allocated another: a cross-thread free per call when the pool was
// slow to start helpers (it takes the malloc arena's lock).
TEST_CASE(
    "fan_core: a core a late helper still holds stays its thread's, reused once the helper "
    "lets go" *
    doctest::timeout(30)) {
  using weft::detail::fan_core;
  std::thread([] {
    fan_core& first = *fan_core::make(4, 2, 2, {});
    first.add_ref();  // a helper posted, not run yet
    first.close_and_wait();
    first.release_by_caller();
    fan_core& second = *fan_core::make(4, 2, 2, {});
    CHECK(&second != &first);  // the helper still holds the first
    second.close_and_wait();
    second.release_by_caller();

    // The helper runs at last, is turned away and lets go: that must not
    // free the first (ASan reports the checks below as a use after free).
    CHECK_FALSE(first.enter());
    first.unref();
    // Both are this thread's spares now: two calls at once (nested) get both.
    fan_core& third = *fan_core::make(4, 2, 2, {});
    fan_core& fourth = *fan_core::make(4, 2, 2, {});
    CHECK(((&third == &first && &fourth == &second) || (&third == &second && &fourth == &first)));

    // A helper that entered lets go as it leaves: its caller, finding the
    // gate empty, may reuse the core for its next call at once.
    third.add_ref();
    REQUIRE(third.enter());
    third.leave();
    third.close_and_wait();
    third.release_by_caller();
    fan_core& fifth = *fan_core::make(4, 2, 2, {});
    CHECK(&fifth == &third);
    // What is left is freed with the thread's spares (LSan checks).
    fifth.close_and_wait();
    fifth.release_by_caller();
    fourth.close_and_wait();
    fourth.release_by_caller();
  }).join();
}

TEST_CASE("parallel_map: a helper dropped unrun by shutdown_now lets go of what it held" *
          doctest::timeout(30)) {
  held_pool held;
  const auto out = weft::parallel_map(std::vector<int>{1, 2, 3}, [](int x) { return x + 1; },
                                      {.limit = 2, .executor = held.pool.executor()});
  CHECK(out == std::vector<int>{2, 3, 4});
  // Dropping the queued helper must free the state it shares (LSan checks).
  CHECK(held.pool.shutdown_now() == 1);
  held.release();
}

// A helper the full queue has no room for is not needed; counted as
// rejected, it made a pool's stats report refusals nobody saw.
TEST_CASE(
    "parallel_map on a pool whose queue is full runs on the caller and the pool counts no refusal" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  weft::cancel_source gate;
  weft_test::hold_only_worker(pool, gate.token(), 1);
  REQUIRE_FALSE(pool.try_post([] {}));  // full: a caller's own try_post is a refusal
  REQUIRE(pool.stats().rejected == 1);

  const auto out = weft::parallel_map(std::vector<int>{1, 2, 3, 4}, [](int x) { return x * 10; },
                                      {.limit = 4, .executor = pool.executor()});
  CHECK(out == std::vector<int>{10, 20, 30, 40});
  weft::for_each(std::vector<int>{1, 2}, [](int) {}, {.limit = 2, .executor = pool.executor()});
  CHECK(pool.stats().rejected == 1);
  gate.cancel();
}

TEST_CASE("parallel_map: every element runs exactly once while tasks steal unevenly sized work" *
          doctest::timeout(120)) {
  std::mt19937 random{20261205};
  for (const std::size_t workers : {1u, 2u, 3u, 5u}) {
    weft::worker_pool pool{{.workers = workers}};
    for (int round = 0; round < 200; ++round) {
      const std::size_t count = std::uniform_int_distribution<std::size_t>{1, 300}(random);
      const std::size_t limit = std::uniform_int_distribution<std::size_t>{0, workers + 2}(random);
      // Some elements yield a few times: a task that holds them falls
      // behind, and the others steal what it has not claimed.
      std::vector<int> slow(count);
      for (auto& s : slow)
        s = std::uniform_int_distribution<int>{0, 7}(random) == 0
                ? 1 + static_cast<int>(random() % 20)
                : 0;
      std::vector<std::atomic<int>> runs(count);
      std::vector<std::size_t> input(count);
      std::iota(input.begin(), input.end(), std::size_t{0});
      CAPTURE(workers);
      CAPTURE(round);
      CAPTURE(count);
      CAPTURE(limit);
      const auto out = weft::parallel_map(input,
                                          [&](std::size_t i) {
                                            runs[i].fetch_add(1);
                                            for (int y = 0; y < slow[i]; ++y)
                                              std::this_thread::yield();
                                            return i * 3;
                                          },
                                          {.limit = limit, .executor = pool.executor()});
      REQUIRE(out.size() == count);
      for (std::size_t i = 0; i < count; ++i) {
        REQUIRE(runs[i].load() == 1);
        REQUIRE(out[i] == i * 3);
      }
    }
  }
}

TEST_CASE("parallel_map: a token a call kept is never cancelled by a later call's failure" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<weft::cancel_token> kept;
  std::mutex kept_mutex;
  (void)weft::parallel_map(std::vector<int>{1, 2, 3, 4},
                           [&](int x, const weft::cancel_token& token) {
                             std::lock_guard lock(kept_mutex);
                             kept.push_back(token);
                             return x;
                           },
                           {.executor = pool.executor()});
  // Later calls on this thread reuse what the first one shared with its
  // helpers; a failure there cancels their own token only.
  for (int round = 0; round < 3; ++round) {
    CHECK_THROWS_AS(weft::parallel_map(std::vector<int>{1, 2, 3, 4},
                                       [](int x) {
                                         if (x == 3) throw std::runtime_error("three");
                                         return x;
                                       },
                                       {.executor = pool.executor()}),
                    std::runtime_error);
  }
  REQUIRE(kept.size() == 4);
  for (const auto& token : kept) CHECK_FALSE(token.cancelled());
}

TEST_CASE(
    "parallel_map: a later call under a parent token follows that parent, not an earlier one" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source first_parent;
  (void)weft::parallel_map(std::vector<int>{1, 2}, [](int x) { return x; },
                           {.token = first_parent.token(), .executor = pool.executor()});
  weft::cancel_source second_parent;
  second_parent.cancel();
  std::atomic<int> calls{0};
  const auto error = map_error_under(pool, second_parent.token(), {1, 2}, calls);
  REQUIRE(error != nullptr);
  CHECK(code_of(error) == weft::errc::cancelled);
  CHECK(calls.load() == 0);
  // And the first parent's cancellation reaches nothing that runs now.
  first_parent.cancel();
  CHECK(weft::parallel_map(std::vector<int>{5, 6}, [](int x) { return x; },
                           {.executor = pool.executor()}) == std::vector<int>{5, 6});
}

// ---------------------------------------------------------------------------
// for_each

// A call on a helper, on another worker than the group's task that fanned
// out, that waited on that group deadlocked: the helper's thread knew
// nothing of the group.
TEST_CASE(
    "for_each: a call that waits on the group of the task that fanned out throws logic_error" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group outer{pool.executor()};
  std::atomic<int> threw{0};
  std::latch started{1};
  outer.go([&] {
    started.count_down();
    std::latch both{2};  // the two calls run at once, one of them on the helper
    const std::array<int, 2> two{0, 1};
    const auto wait_on_outer = [&](int) {
      both.arrive_and_wait();
      try {
        outer.wait();
      } catch (const std::logic_error&) {
        threw.fetch_add(1);
      }
    };
    weft::for_each(two, wait_on_outer, {.limit = 2, .executor = pool.executor()});
  });
  started.wait();  // on a worker, not run by the wait below
  outer.wait();
  CHECK(threw.load() == 2);
}

TEST_CASE("for_each: visits each element exactly once, by reference" * doctest::timeout(30)) {
  for (const std::size_t workers : {1u, 2u, 3u, 8u}) {
    for (const std::size_t limit : {0u, 1u, 2u, 5u}) {
      CAPTURE(workers);
      CAPTURE(limit);
      weft::worker_pool pool{{.workers = workers}};
      std::vector<std::atomic<int>> visits(500);
      std::vector<std::size_t> indices(visits.size());
      std::iota(indices.begin(), indices.end(), std::size_t{0});
      weft::for_each(indices, [&](std::size_t i) { visits[i].fetch_add(1); },
                     {.limit = limit, .executor = pool.executor()});
      bool each_once = true;
      for (const auto& v : visits) each_once = each_once && v.load() == 1;
      CHECK(each_once);

      std::list<int> linked{1, 2, 3, 4};
      weft::for_each(linked, [](int& x) { x *= 10; }, {.limit = limit, .executor = pool.executor()});
      CHECK(linked == std::list<int>{10, 20, 30, 40});
    }
  }
}

TEST_CASE("for_each: the first failure stops the rest, with limit 1, after exactly one call" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<int> input(100, 0);
  std::atomic<int> calls{0};
  CHECK_THROWS_AS(weft::for_each(
                      input,
                      [&](int) {
                        calls.fetch_add(1);
                        throw std::logic_error("stop");
                      },
                      {.limit = 1, .executor = pool.executor()}),
                  std::logic_error);
  CHECK(calls.load() == 1);

  // A failure half-way, limit 1: the elements before it ran, none after.
  calls = 0;
  std::vector<int> seen;
  std::iota(input.begin(), input.end(), 0);
  CHECK_THROWS_AS(weft::for_each(
                      input,
                      [&](int x) {
                        calls.fetch_add(1);
                        seen.push_back(x);  // one call at a time
                        if (x == 49) throw std::logic_error("half-way");
                      },
                      {.limit = 1, .executor = pool.executor()}),
                  std::logic_error);
  CHECK(calls.load() == 50);
  REQUIRE(seen.size() == 50);
  CHECK(seen.back() == 49);
}

TEST_CASE(
    "for_each: no element starts after a call cancels the caller's token, in its claim or after" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<int> input(100);
  std::iota(input.begin(), input.end(), 0);
  // Limit 1: the calling thread runs every element, in order, the first
  // claim taking half of them ([0, 50)). A cancel at 0 is stopped by the
  // check between two elements of one claim; at 49 and 98, which end their
  // claims, by the check before the next claim; at 99 nothing is left to
  // skip, so nothing is thrown.
  for (const int last : {0, 49, 98, 99}) {
    CAPTURE(last);
    weft::cancel_source request;
    std::vector<int> seen;
    const auto error = thrown_by([&] {
      weft::for_each(input,
                     [&](int x) {
                       seen.push_back(x);
                       if (x == last) request.cancel(std::make_error_code(std::errc::timed_out));
                     },
                     {.limit = 1, .token = request.token(), .executor = pool.executor()});
    });
    if (last == 99) {
      CHECK(error == nullptr);  // every element ran, so nothing was skipped to report
    } else {
      REQUIRE(error != nullptr);
      CHECK(code_of(error) == std::errc::timed_out);
    }
    REQUIRE(seen.size() == static_cast<std::size_t>(last) + 1);
    CHECK(seen.back() == last);
  }
}

TEST_CASE("merge forwards every input into one channel and closes it when all inputs are drained") {
  weft::worker_pool pool{{.workers = 4}};
  weft::channel<int> a{4};
  weft::channel<int> b{0};
  weft::channel<int> c{1};
  weft::channel<int> all{8};
  weft::task_group group{pool.executor()};
  weft::merge(group, all, a, b, c);
  std::thread producer([&] {
    for (int i = 0; i < 300; ++i) REQUIRE((i % 3 == 0 ? a : i % 3 == 1 ? b : c).send(int{i}) == weft::wait_status::ok);
    a.close();
    b.close();
    c.close();
  });
  std::vector<int> got;
  std::vector<int> last_from(3, -1);
  bool ordered = true;
  for (int& value : all) {
    got.push_back(value);
    auto& last = last_from[static_cast<std::size_t>(value % 3)];
    ordered = ordered && value > last;  // each input's values keep their order
    last = value;
  }
  producer.join();
  group.wait();
  CHECK(ordered);
  std::sort(got.begin(), got.end());
  REQUIRE(got.size() == 300);
  for (int i = 0; i < 300; ++i) CHECK(got[static_cast<std::size_t>(i)] == i);
}

// A forwarder that a cancelled group skipped, or that go() refused, never
// counted its input off, and `out` stayed open for good.
TEST_CASE("merge closes its output when its forwarders are skipped or refused" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::cancel_source worker_gate;
  weft_test::hold_only_worker(pool, worker_gate.token());
  weft::channel<int> a{1};
  weft::channel<int> b{1};
  weft::channel<int> all{1};
  weft::task_group group{pool.executor()};
  weft::merge(group, all, a, b);  // queued behind the busy worker
  group.cancel();
  worker_gate.cancel();
  CHECK_THROWS_AS(group.wait(), std::system_error);  // the forwarders were skipped
  CHECK(all.closed());

  // And when go() refuses a forwarder: the pool is shut down.
  weft::channel<int> refused{1};
  pool.shutdown();
  CHECK_THROWS_AS(weft::merge(group, refused, a, b), weft::rejected);
  CHECK(refused.closed());
}

TEST_CASE("fan_out runs n workers over one channel, the first exception stops them and reaches wait()") {
  weft::worker_pool pool{{.workers = 3}};
  weft::channel<int> jobs{16};
  std::atomic<int> sum{0};
  {
    weft::task_group group{pool.executor()};
    weft::fan_out(group, jobs, 3, [&](int value) { sum += value; });
    for (int i = 1; i <= 100; ++i) REQUIRE(jobs.send(int{i}) == weft::wait_status::ok);
    jobs.close();
    group.wait();
  }
  CHECK(sum == 5050);

  weft::channel<int> failing{4};
  weft::task_group group{pool.executor()};
  weft::fan_out(group, failing, 2, [](int value, const weft::cancel_token&) {
    if (value == 3) throw std::runtime_error("bad record 3");
  });
  for (int i = 0; i < 4; ++i) (void)failing.send(int{i}, group.token());
  CHECK_THROWS_WITH_AS(group.wait(), "bad record 3", std::runtime_error);
  CHECK_THROWS_AS(weft::fan_out(group, failing, 0, [](int) {}), std::invalid_argument);
}

namespace {

// Fans out from its destructor, which runs at its thread's exit after the
// thread's spare shared state was freed (it was made first, so it is
// destroyed last).
struct fans_out_at_exit {
  weft::worker_pool* pool;
  std::promise<std::vector<int>>* result;
  ~fans_out_at_exit() {
    const std::vector<int> input{1, 2, 3, 4};
    result->set_value(
        weft::parallel_map(input, [](int x) { return x * 10; }, {.executor = pool->executor()}));
  }
};

}  // namespace

// The spare was freed at exit and then taken again by the next fan-out (a
// use after free, which ASan reports).
TEST_CASE("parallel_map: a fan-out from a thread_local's destructor at thread exit works" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::promise<std::vector<int>> at_exit;
  auto result = at_exit.get_future();
  std::thread([&] {
    thread_local fans_out_at_exit fans{&pool, &at_exit};
    const std::vector<int> input{1, 2};
    CHECK(weft::parallel_map(input, [](int x) { return x; }, {.executor = pool.executor()}) ==
          input);
  }).join();
  CHECK(result.get() == std::vector<int>{10, 20, 30, 40});
}

// A proxy result (std::vector<bool>::reference) was assigned to a default
// one, writing through its null pointer.
TEST_CASE("parallel_map: results that are proxies are returned, not assigned through" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::vector<bool> flags(100);
  for (std::size_t i = 0; i < flags.size(); i += 3) flags[i] = true;
  const auto proxies =
      weft::parallel_map(flags, [](auto flag) { return flag; }, {.executor = pool.executor()});
  REQUIRE(proxies.size() == flags.size());
  for (std::size_t i = 0; i < flags.size(); ++i) CHECK(bool(proxies[i]) == (i % 3 == 0));
}
