// SPDX-License-Identifier: BSL-1.0
// Tests for weft::pipeline (weft/pipeline.hpp): nothing lost under random
// stage delays, order kept by ordered stages, filters and one-to-many
// stages, batching, backpressure bounding memory, errors and cancellation
// joining every stage, stats and the bottleneck.
//
// "Delays" are random amounts of spinning work and yields, never sleeps.
// A test that needs the pipeline to be stalled waits until the task registry
// lists the source as blocked on its output channel.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/pipeline.hpp>
#include <weft/registry.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;
using weft_test::spin_until;

namespace {

// A random stretch of work: spins and yields, so stages run at uneven
// speeds and interleave differently every time.
void random_delay(std::uint64_t seed) {
  thread_local std::mt19937_64 random{seed};
  const auto spins = random() % 2000;
  volatile std::uint64_t sink = 0;
  for (std::uint64_t i = 0; i < spins; ++i) sink = sink + i;
  if (random() % 8 == 0) std::this_thread::yield();
}

bool source_blocked_on(const std::string& blocked_on) {
  for (const auto& task : weft::registry::snapshot()) {
    if (task.state == weft::task_state::blocked && task.blocked_on == blocked_on) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("pipeline: every item reaches the sink once, with random delays in every stage") {
  const int items = weft_test::under_sanitizer ? 2000 : 20000;
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    std::vector<int> input(static_cast<std::size_t>(items));
    std::iota(input.begin(), input.end(), 0);
    std::vector<std::atomic<int>> seen(static_cast<std::size_t>(items));
    auto p = weft::pipeline(input)
                 .stage(
                     [&](int x) {
                       random_delay(static_cast<std::uint64_t>(x));
                       return x;
                     },
                     {.workers = 3, .buffer = 4})
                 .stage(
                     [&](int x) {
                       random_delay(static_cast<std::uint64_t>(x) * 7);
                       return std::to_string(x);
                     },
                     {.workers = 2, .buffer = 1})
                 .sink(
                     [&](std::string s) {
                       random_delay(s.size());
                       seen[static_cast<std::size_t>(std::stoi(s))].fetch_add(1);
                     },
                     {.workers = 2});
    p.run();
    int wrong = 0;
    for (auto& count : seen) wrong += count.load() != 1;
    CHECK(wrong == 0);
    const auto stats = p.stats();
    REQUIRE(stats.stages.size() == 4);
    for (const auto& stage : stats.stages) {
      CHECK(stage.items_in == static_cast<std::uint64_t>(items));
      CHECK(stage.items_out == static_cast<std::uint64_t>(items));
    }
  }
}

TEST_CASE("pipeline: an ordered stage keeps input order across its workers, filters and expand") {
  int next = 0;
  const int items = weft_test::under_sanitizer ? 3000 : 30000;
  std::vector<int> out;
  auto p = weft::pipeline([&]() -> std::optional<int> {
             if (next == items) return std::nullopt;
             return next++;
           })
               .stage(
                   [](int x) -> std::optional<int> {
                     random_delay(static_cast<std::uint64_t>(x));
                     if (x % 3 == 0) return std::nullopt;  // a filter
                     return x;
                   },
                   {.workers = 4, .ordered = true, .name = "keep"})
               .expand([](int x) { return std::vector<int>{x, -x}; }, {.workers = 3, .ordered = true})
               .sink([&](int x) { out.push_back(x); });  // one worker: no lock needed
  p.run();
  std::vector<int> expected;
  for (int x = 0; x < items; ++x) {
    if (x % 3 == 0) continue;
    expected.push_back(x);
    expected.push_back(-x);
  }
  CHECK(out == expected);
  CHECK(p.stats().stages[1].name == "keep");
  CHECK(p.stats().stages[1].items_out == static_cast<std::uint64_t>(items - (items + 2) / 3));
}

TEST_CASE("pipeline: batch groups items by size, and what is left at the end") {
  std::vector<int> input(10);
  std::iota(input.begin(), input.end(), 0);
  std::vector<std::vector<int>> batches;
  auto p = weft::pipeline(input).batch(4, 1h).sink([&](std::vector<int> batch) { batches.push_back(std::move(batch)); });
  p.run();
  REQUIRE(batches.size() == 3);
  CHECK(batches[0] == std::vector<int>{0, 1, 2, 3});
  CHECK(batches[1] == std::vector<int>{4, 5, 6, 7});
  CHECK(batches[2] == std::vector<int>{8, 9});
}

TEST_CASE("pipeline: batch sends a partial batch once its first item has waited max_wait") {
  weft::channel<int> source{16};
  std::vector<std::vector<int>> batches;
  std::atomic<std::size_t> batch_count{0};
  auto p = weft::pipeline(source, "batcher").batch(100, 1ms).sink([&](std::vector<int> batch) {
    batches.push_back(std::move(batch));
    batch_count = batches.size();
  });
  std::thread runner([&] { p.run(); });
  REQUIRE(source.send(1) == weft::wait_status::ok);
  // Neither full nor at the end of the input: only the deadline can send it.
  spin_until([&] { return batch_count.load() == 1; });
  REQUIRE(source.send(2) == weft::wait_status::ok);
  spin_until([&] { return batch_count.load() == 2; });
  source.close();
  runner.join();
  REQUIRE(batches.size() == 2);
  CHECK(batches[0] == std::vector<int>{1});
  CHECK(batches[1] == std::vector<int>{2});
}

TEST_CASE("pipeline: a slow sink makes every stage wait, buffered items stay bounded (backpressure)") {
  std::atomic<int> produced{0};
  weft::cancel_source gate;
  auto p = weft::pipeline(
               [&]() -> std::optional<int> {
                 const int n = produced.fetch_add(1);
                 if (n >= 100000) return std::nullopt;
                 return n;
               },
               "bounded")
               .stage([](int x) { return x; }, {.workers = 2, .buffer = 8, .name = "copy"})
               .sink([&](int) { gate.token().wait(); }, {.buffer = 4});
  std::thread runner([&] { p.run(); });
  spin_until([] { return source_blocked_on("channel \"bounded/copy\" send"); });
  // Held: 1 in the sink, 4 before it, 2 in the stage's workers, 8 before it,
  // and 1 in the source's hands (plus the call that found no room).
  CHECK(produced.load() <= 1 + 4 + 2 + 8 + 2);
  gate.cancel();
  runner.join();
  CHECK(p.stats().stages.back().items_out == 100000);
}

TEST_CASE("pipeline: the first exception stops and joins every stage, and run() rethrows it") {
  int next = 0;
  auto p = weft::pipeline([&]() -> std::optional<int> { return next++; })  // endless
               .stage(
                   [](int x) {
                     if (x == 500) throw std::runtime_error("bad record 500");
                     return x;
                   },
                   {.workers = 2})
               .sink([](int) {});
  // The source never ends: run() returning at all shows that the error
  // stopped every stage.
  CHECK_THROWS_WITH_AS(p.run(), "bad record 500", std::runtime_error);
  CHECK_THROWS_AS(p.run(), std::logic_error);  // a pipeline runs once
}

TEST_CASE("pipeline: a cancelled token stops it and run() throws the token's cause") {
  weft::cancel_source request;
  std::atomic<int> sunk{0};
  auto p = weft::pipeline([&]() -> std::optional<int> { return 1; })  // endless
               .stage([](int x) { return x; }, {.workers = 2})
               .sink([&](int) {
                 if (++sunk == 1000) request.cancel();
               });
  try {
    p.run(request.token());
    FAIL("run() returned although the pipeline was cancelled");
  } catch (const std::system_error& error) {
    CHECK(error.code() == weft::errc::cancelled);
  }
}

TEST_CASE("pipeline: bad options are refused at once") {
  std::vector<int> input{1, 2, 3};
  CHECK_THROWS_AS((void)weft::pipeline(input).stage([](int x) { return x; }, {.workers = 0}), std::invalid_argument);
  CHECK_THROWS_AS((void)weft::pipeline(input).batch(0, 1ms), std::invalid_argument);
  CHECK_THROWS_AS((void)weft::pipeline(input).sink([](int) {}, {.workers = 0}), std::invalid_argument);
  // Accepted and ignored, this let four sink workers take items out of order.
  CHECK_THROWS_AS((void)weft::pipeline(input).sink([](int) {}, {.workers = 4, .ordered = true}),
                  std::invalid_argument);
  CHECK_NOTHROW((void)weft::pipeline(input).sink([](int) {}, {.workers = 1, .ordered = true}));
  // Their sum wrapped to one worker for them all, and run() hung.
  const std::size_t half = std::numeric_limits<std::size_t>::max() / 2 + 1;
  auto too_many = weft::pipeline(input)
                      .stage([](int x) { return x; }, {.workers = half})
                      .stage([](int x) { return x; }, {.workers = half})
                      .sink([](int) {});
  CHECK_THROWS_AS(too_many.run(), std::invalid_argument);
}

// These crashed on a null state.
TEST_CASE("pipeline: a pipeline moved on, or a runnable one moved from, throws std::logic_error") {
  std::vector<int> input{1, 2, 3};
  auto source = weft::pipeline(input);
  auto next = std::move(source).stage([](int x) { return x; });
  CHECK_THROWS_AS((void)std::move(source).sink([](int) {}), std::logic_error);
  CHECK_THROWS_AS((void)std::move(source).batch(2, 1ms), std::logic_error);
  auto runnable = std::move(next).sink([](int) {});
  auto moved = std::move(runnable);
  CHECK_THROWS_AS(runnable.run(), std::logic_error);
  CHECK_THROWS_AS((void)runnable.stats(), std::logic_error);
  CHECK_THROWS_AS((void)runnable.bottleneck(), std::logic_error);
  moved.run();
}

// A channel of another clock (or of items only convertible to T) was read
// as a plain range, with a receive that no token stops: after a failure,
// run() waited for the channel to be closed.
TEST_CASE("pipeline: a source channel of any clock or item type stops with the pipeline") {
  weft::basic_channel<int, weft::manual_clock> timed{4};
  REQUIRE(timed.send(1) == weft::wait_status::ok);
  auto p = weft::pipeline(timed).sink([](int) { throw std::runtime_error("sink failed"); });
  CHECK_THROWS_WITH_AS(p.run(), "sink failed", std::runtime_error);

  weft::channel<int> narrow{4};
  REQUIRE(narrow.send(7) == weft::wait_status::ok);
  weft::cancel_source request;
  std::vector<long> got;
  auto widening = weft::pipeline<long>(narrow).sink([&](long value) {
    got.push_back(value);
    request.cancel();  // while the source waits on the open, empty channel
  });
  CHECK_THROWS_AS(widening.run(request.token()), std::system_error);
  CHECK(got == std::vector<long>{7});
}

// duration_cast<nanoseconds>(hours::max()) overflowed into the past, and
// every item went on alone.
TEST_CASE("pipeline: batch with a max_wait past the clock's range waits for size only") {
  std::vector<int> input(10);
  std::iota(input.begin(), input.end(), 0);
  std::vector<std::size_t> sizes;
  auto p =
      weft::pipeline(input).batch(5, std::chrono::hours::max()).sink([&](std::vector<int> batch) {
        sizes.push_back(batch.size());
      });
  p.run();
  CHECK(sizes == std::vector<std::size_t>{5, 5});
}

// The batch reserved room for `size` items up front: bad_alloc or
// length_error from run().
TEST_CASE("pipeline: batch with a huge size sends what it has at the end") {
  std::vector<std::vector<int>> batches;
  auto p = weft::pipeline(std::vector<int>{1, 2, 3})
               .batch(std::numeric_limits<std::size_t>::max(), std::chrono::hours::max())
               .sink([&](std::vector<int> batch) { batches.push_back(std::move(batch)); });
  p.run();
  REQUIRE(batches.size() == 1);
  CHECK(batches[0] == std::vector<int>{1, 2, 3});
}

// A stage that threw closed its output as if its input had ended, before
// the group cancelled the pipeline: batch() then sent its partial batch on
// to the sink (about 1 run in 3,000).
TEST_CASE("pipeline: after a failure upstream, a partial batch never reaches the sink") {
  for (int round = 0; round < 300; ++round) {
    int next = 0;
    std::atomic<int> batches{0};
    auto p = weft::pipeline([&]() -> std::optional<int> {
               if (next == 3) throw std::runtime_error("source failed");
               return next++;
             })
                 .batch(100, 1h)
                 .sink([&](std::vector<int>) { ++batches; });
    CHECK_THROWS_WITH_AS(p.run(), "source failed", std::runtime_error);
    REQUIRE(batches.load() == 0);
  }
}

namespace {
// 0, 1, ..., n - 1, each a temporary, as std::views::iota(0, n) gives them
// (which libc++ 14 lacks).
struct count_to {
  struct iterator {
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    int at = 0;
    int operator*() const { return at; }
    iterator& operator++() {
      ++at;
      return *this;
    }
    iterator operator++(int) { return iterator{at++}; }
    bool operator==(const iterator&) const = default;
  };
  int n;
  iterator begin() const { return iterator{0}; }
  iterator end() const { return iterator{n}; }
};
}  // namespace

TEST_CASE(
    "pipeline: expand over a range of temporaries, and move-only items from a range moved in") {
  std::vector<int> sums;
  auto counted = weft::pipeline(std::vector<int>{3, 2})
                     .expand([](int n) { return count_to{n}; })
                     .sink([&](int x) { sums.push_back(x); });
  counted.run();
  CHECK(sums == std::vector<int>{0, 1, 2, 0, 1});

  std::vector<std::unique_ptr<int>> owned;
  owned.push_back(std::make_unique<int>(5));
  owned.push_back(std::make_unique<int>(6));
  int total = 0;
  auto moved =
      weft::pipeline(std::move(owned)).sink([&](std::unique_ptr<int> item) { total += *item; });
  moved.run();
  CHECK(total == 11);
}

TEST_CASE("pipeline: stats count every stage, and bottleneck() names the slowest per worker") {
  // Few items, each heavy: busy time is sampled (one call in 16), and a
  // sampled light call that a preemption stretches must not outweigh the
  // heavy stage.
  std::vector<int> input(48);
  std::iota(input.begin(), input.end(), 0);
  const auto work = [](int x, int rounds) {
    volatile unsigned sink = static_cast<unsigned>(x);
    for (int i = 0; i < rounds; ++i) sink = sink + static_cast<unsigned>(i);
    return static_cast<int>(sink % 1000);
  };
  auto p = weft::pipeline(std::move(input), "profiled")
               .stage([&](int x) { return work(x, 10); }, {.name = "light"})
               .stage([&](int x) { return work(x, 500000); }, {.workers = 2, .name = "heavy"})
               .sink([](int) {}, {.name = "drop"});
  p.run();
  const auto stats = p.stats();
  CHECK(stats.stages[2].name == "heavy");
  CHECK(stats.stages[2].busy > stats.stages[1].busy);
  CHECK(stats.elapsed > 0ns);
  CHECK(p.bottleneck() == "heavy");
}

// A stage's counts come from two channels, read one after the other: read
// input first, items that passed through between the two reads were counted
// out and not in (a map stage showed 28 in and 40 out while it ran).
TEST_CASE(
    "pipeline: stats read while items flow never show a stage sending more than it received") {
  const int rounds = weft_test::under_sanitizer ? 3 : 10;
  std::uint64_t snapshots = 0;
  std::uint64_t skewed = 0;
  for (int round = 0; round < rounds; ++round) {
    std::vector<int> input(5'000);
    std::iota(input.begin(), input.end(), 0);
    auto p = weft::pipeline(std::move(input))
                 .stage([](int x) { return x + 1; }, {.workers = 2, .buffer = 64, .name = "map"})
                 .sink([](int) {}, {.workers = 2, .buffer = 64, .name = "drop"});
    std::atomic<bool> done{false};
    std::thread reader{[&] {
      while (!done.load()) {
        const auto s = p.stats();
        ++snapshots;
        for (const auto& stage : s.stages) skewed += stage.items_out > stage.items_in ? 1 : 0;
      }
    }};
    p.run();
    done.store(true);
    reader.join();
  }
  INFO(snapshots << " snapshots");
  CHECK(skewed == 0);
}
