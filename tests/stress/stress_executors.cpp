// SPDX-License-Identifier: BSL-1.0
// Randomised stress for worker_pool and task_group: the worker sleep/notify
// race (PITFALLS: cppcoro#114, BS#93, tensorflow#932), shutdown racing
// producers, and nested groups. Replay the random choices with
//
//   ./weft_stress --seed N --test-case="*pool*"
//
// Every loop is bounded by a round count; nothing sleeps. Gaps between
// posts are random spins, so workers go idle and get woken at random
// moments.
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

namespace {

using weft_test::rounds;
using weft_test::spin_for;

}  // namespace

TEST_CASE("stress: worker_pool sleep/notify race: bursts with random gaps, every task runs once") {
  std::mt19937_64 rng{weft_test::seed()};
  for (int round = 0; round < rounds(40); ++round) {
    const auto workers = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
    const auto capacity = std::uniform_int_distribution<std::size_t>{1, 8}(rng);
    const auto policy = static_cast<weft::overflow>(std::uniform_int_distribution<int>{0, 2}(rng));
    weft::worker_pool pool{{.workers = workers, .queue_capacity = capacity, .on_full = policy}};
    const int producers = 3;
    const int per_producer = 300;
    std::atomic<int> ran{0};
    std::atomic<int> refused{0};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p, seed = rng()] {
        std::mt19937_64 local{seed + static_cast<std::uint64_t>(p)};
        for (int i = 0; i < per_producer; ++i) {
          try {
            pool.post([&] { ran.fetch_add(1, std::memory_order_relaxed); });
          } catch (const weft::rejected&) {
            refused.fetch_add(1, std::memory_order_relaxed);
          }
          if (local() % 8 == 0) spin_for(local() % 4000);
        }
      });
    }
    for (auto& t : threads) t.join();
    pool.shutdown();
    pool.join();
    CHECK(ran.load() + refused.load() == producers * per_producer);
    if (policy != weft::overflow::reject) CHECK(refused.load() == 0);
    const auto s = pool.stats();
    CHECK(s.completed == static_cast<std::uint64_t>(ran.load()));
    CHECK(s.rejected == static_cast<std::uint64_t>(refused.load()));
  }
}

TEST_CASE("stress: worker_pool shutdown and shutdown_now racing producers lose nothing") {
  std::mt19937_64 rng{weft_test::seed() + 1};
  for (int round = 0; round < rounds(40); ++round) {
    const auto workers = std::uniform_int_distribution<std::size_t>{1, 3}(rng);
    const bool now = rng() % 2 == 0;
    weft::worker_pool pool{{.workers = workers, .queue_capacity = 4}};
    std::atomic<int> ran{0};
    std::atomic<int> refused{0};
    std::atomic<int> attempts{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int p = 0; p < 3; ++p) {
      threads.emplace_back([&] {
        while (!stop.load(std::memory_order_relaxed)) {
          attempts.fetch_add(1, std::memory_order_relaxed);
          try {
            pool.post([&] { ran.fetch_add(1, std::memory_order_relaxed); });
          } catch (const weft::rejected&) {
            refused.fetch_add(1, std::memory_order_relaxed);
            return;
          }
        }
      });
    }
    spin_for(rng() % 20000);
    std::size_t dropped = 0;
    if (now) {
      dropped = pool.shutdown_now();
    } else {
      pool.shutdown();
    }
    stop = true;
    for (auto& t : threads) t.join();
    pool.join();
    // A post that slipped in after shutdown_now() emptied the queue is
    // dropped by join(), so stats() may count more than the return value.
    const auto total_dropped = pool.stats().dropped;
    CHECK(total_dropped >= dropped);
    CHECK(static_cast<std::size_t>(ran.load()) + total_dropped + static_cast<std::size_t>(refused.load()) ==
          static_cast<std::size_t>(attempts.load()));
  }
}

// shutdown_now() drained the queue up to a post that had claimed its slot
// and was still moving its task in: that task, and any behind it, was
// neither run nor dropped, and stats did not add up after join().
TEST_CASE(
    "stress: worker_pool shutdown_now waits for a post still publishing its task, and drops it") {
  std::mt19937_64 rng{weft_test::seed() + 7};
  for (int round = 0; round < rounds(25); ++round) {
    weft::worker_pool pool{{.workers = 1}};
    std::atomic<bool> publishing{false};
    std::atomic<bool> publish{false};
    weft_test::stalling_move payload;
    payload.arm(3, publishing, publish);  // the third move is the one into the queue's slot
    std::atomic<int> ran{0};
    std::thread producer(
        [&] { pool.post([held = std::move(payload), &ran] { ran.fetch_add(1); }); });
    weft_test::spin_until([&] { return publishing.load(); });
    REQUIRE(pool.stats().queued == 1);  // claimed, not published
    std::size_t dropped = 0;
    std::thread stopper([&] {
      dropped = pool.shutdown_now();
      pool.join();
    });
    weft_test::spin_until([&] { return pool.is_shutdown(); });
    spin_for(rng() % 20000);
    publish = true;
    producer.join();
    stopper.join();
    const auto s = pool.stats();
    CHECK(s.submitted == 1);
    // Dropped, or run by a worker that was claiming from the queue as
    // shutdown_now() began; never neither.
    CHECK(s.completed + s.dropped == 1);
    CHECK(s.completed == static_cast<std::uint64_t>(ran.load()));
    CHECK(s.queued == 0);
    CHECK(dropped == s.dropped);
  }
}

TEST_CASE("stress: task_group nested spawning and limits under random interleavings") {
  std::mt19937_64 rng{weft_test::seed() + 2};
  weft::worker_pool pool{{.workers = 3, .queue_capacity = 16}};
  for (int round = 0; round < rounds(60); ++round) {
    weft::task_group group{pool.executor()};
    const auto limit = static_cast<std::ptrdiff_t>(rng() % 4);
    if (limit != 0) group.set_limit(limit + 1);
    std::atomic<int> ran{0};
    const int top = 20 + static_cast<int>(rng() % 60);
    for (int i = 0; i < top; ++i) {
      group.go([&, gap = static_cast<std::uint32_t>(rng() % 2000)] {
        spin_for(gap);
        ran.fetch_add(1, std::memory_order_relaxed);
      });
    }
    weft::task_group nested_owner{pool.executor()};
    nested_owner.go([&] {
      weft::task_group inner{pool.executor()};
      for (int i = 0; i < 10; ++i) inner.go([&] { ran.fetch_add(1, std::memory_order_relaxed); });
      inner.wait();
    });
    nested_owner.wait();
    group.wait();
    CHECK(ran.load() == top + 10);
  }
}
