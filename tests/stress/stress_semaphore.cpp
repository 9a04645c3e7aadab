// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for weft::semaphore. Every random choice comes
// from weft_test::seed(), which main.cpp prints; replay a failure with
//
//   ./weft_stress --seed N --test-case="*semaphore*"
//
// (the interleaving itself is up to the scheduler, so a replay repeats the
// choices, not necessarily the failure). --scale N makes each scenario run N
// times longer.
//
// Timeouts here are real steady_clock deadlines of 50 us to 2 ms: timing out
// is the scenario, and no assertion depends on how long anything took.
#include <weft/cancel.hpp>
#include <weft/semaphore.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::chaos_sources;

using weft_test::iteration_cap;
using weft_test::run_budget;
using weft_test::thread_counts;
using weft_test::under_tsan;

struct tally {
  std::atomic<std::uint64_t> ok{0};
  std::atomic<std::uint64_t> timeouts{0};
  std::atomic<std::uint64_t> cancellations{0};
  std::atomic<std::uint64_t> busy{0};  // try_acquire said no
};

}  // namespace

TEST_CASE("semaphore conserves permits under random weights, cancellations and deadlines" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed};

  for (const int threads_count : thread_counts()) {
    const std::ptrdiff_t capacity = std::uniform_int_distribution<std::ptrdiff_t>{1, 12}(setup);
    CAPTURE(threads_count);
    CAPTURE(capacity);

    weft::semaphore sem{capacity};
    chaos_sources chaos{8};
    tally counts;
    std::atomic<std::ptrdiff_t> held{0};  // updated inside the critical section
    std::atomic<std::ptrdiff_t> most_held{0};
    std::atomic<std::uint64_t> over_capacity{0};
    std::atomic<std::uint64_t> bad_permits{0};
    std::atomic<bool> stop{false};
    const auto until = std::chrono::steady_clock::now() + run_budget();

    const auto worker = [&](std::uint64_t thread_seed) {
      std::mt19937_64 rng{thread_seed};
      const auto delay = [&] {
        return std::chrono::microseconds{std::uniform_int_distribution<int>{50, 2000}(rng)};
      };
      for (std::uint64_t iteration = 0; iteration < iteration_cap(200'000); ++iteration) {
        if ((iteration & 15) == 0 &&
            (stop.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() >= until)) {
          break;
        }
        // Mostly small weights; sometimes the whole capacity (the head-of-line case).
        const std::ptrdiff_t n =
            rng() % 8 == 0 ? capacity
                           : std::uniform_int_distribution<std::ptrdiff_t>{1, capacity}(rng);
        weft::permit permit;
        weft::wait_status status = weft::wait_status::ok;
        bool took = false;  // permits held through sem.release(), not a permit
        switch (rng() % 9) {
          case 0:
            sem.acquire(n);
            took = true;
            break;
          case 1:
            took = sem.try_acquire(n);
            if (!took) {
              counts.busy.fetch_add(1, std::memory_order_relaxed);
              continue;
            }
            break;
          case 2:
            status = sem.acquire(n, chaos.token(rng()));
            took = status == weft::wait_status::ok;
            break;
          case 3: {
            // The chaos token's child with a real deadline of its own.
            auto request = weft::with_timeout(chaos.token(rng()), delay());
            status = sem.acquire(n, request.token());
            took = status == weft::wait_status::ok;
            break;
          }
          case 4:
            status = sem.acquire_for(n, delay());
            took = status == weft::wait_status::ok;
            break;
          case 5:
            status = sem.acquire_until(n, std::chrono::steady_clock::now() + delay());
            took = status == weft::wait_status::ok;
            break;
          case 6: {
            auto child = chaos.token(rng()).child();
            permit = sem.acquire_permit(n, child.token());
            if (!permit)
              status = child.token().cause().is_deadline() ? weft::wait_status::timeout
                                                           : weft::wait_status::cancelled;
            break;
          }
          case 7:
            permit = sem.acquire_permit_for(n, delay());
            if (!permit) status = weft::wait_status::timeout;
            break;
          default:
            permit = sem.try_acquire_permit(n);
            if (!permit) {
              counts.busy.fetch_add(1, std::memory_order_relaxed);
              continue;
            }
            break;
        }
        switch (status) {
          case weft::wait_status::ok:
            counts.ok.fetch_add(1, std::memory_order_relaxed);
            break;
          case weft::wait_status::timeout:
            counts.timeouts.fetch_add(1, std::memory_order_relaxed);
            continue;
          case weft::wait_status::cancelled:
            counts.cancellations.fetch_add(1, std::memory_order_relaxed);
            continue;
          case weft::wait_status::closed:
            bad_permits.fetch_add(1, std::memory_order_relaxed);
            continue;
        }
        // This thread holds exactly n now: through `took`, or through the permit.
        if (took == static_cast<bool>(permit) || (permit && permit.count() != n)) {
          bad_permits.fetch_add(1, std::memory_order_relaxed);
        }

        const auto now_held = held.fetch_add(n, std::memory_order_acq_rel) + n;
        if (now_held > capacity) over_capacity.fetch_add(1, std::memory_order_relaxed);
        auto most = most_held.load(std::memory_order_relaxed);
        while (now_held > most &&
               !most_held.compare_exchange_weak(most, now_held, std::memory_order_relaxed)) {
        }
        if (rng() % 4 == 0) std::this_thread::yield();  // hold the permits a little longer
        held.fetch_sub(n, std::memory_order_acq_rel);

        if (took) {
          if (n > 1 && rng() % 2 == 0) {
            for (std::ptrdiff_t i = 0; i < n; ++i) sem.release(1);  // piecemeal: partial grants
          } else {
            sem.release(n);
          }
        } else if (rng() % 2 == 0) {
          permit.release();
        } else {
          const auto owed = permit.detach();
          sem.release(owed);
        }
      }
    };

    std::thread chaos_thread([&] {
      std::mt19937_64 rng{seed ^ 0xc4a05u};
      while (!stop.load(std::memory_order_relaxed)) {
        chaos.cancel_and_replace(rng(), rng() % 4 == 0);
        for (std::uint64_t spins = rng() % 32; spins > 0; --spins) std::this_thread::yield();
      }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < threads_count; ++t) {
      threads.emplace_back(worker, seed + static_cast<std::uint64_t>(threads_count) * 1000u +
                                       static_cast<std::uint64_t>(t));
    }
    for (auto& t : threads) t.join();
    stop.store(true);
    chaos_thread.join();

    const auto stats = sem.stats();
    CHECK(over_capacity.load() == 0);
    CHECK(most_held.load() <= capacity);
    CHECK(bad_permits.load() == 0);
    CHECK(held.load() == 0);
    CHECK(stats.available == capacity);
    CHECK(stats.waiters == 0);
    CHECK(stats.acquisitions == counts.ok.load());
    CHECK(stats.timeouts == counts.timeouts.load());
    CHECK(stats.cancellations == counts.cancellations.load());
    CHECK(stats.max_wait <= stats.total_wait);
    // Something happened in each run (not a check on timing: one success
    // is enough).
    CHECK(counts.ok.load() > 0);
    MESSAGE("threads " << threads_count << ", capacity " << capacity << ": " << counts.ok.load()
                       << " ok, " << counts.timeouts.load() << " timeouts, "
                       << counts.cancellations.load() << " cancellations, " << counts.busy.load()
                       << " busy tries");
  }
}

TEST_CASE(
    "semaphore never starves a waiter for the whole capacity under a stream of small requests" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x5a5a5a5au};

  for (const int threads_count : thread_counts()) {
    const std::ptrdiff_t capacity = std::uniform_int_distribution<std::ptrdiff_t>{2, 10}(setup);
    const int big_rounds = static_cast<int>((under_tsan ? 20 : 100) *
                                            std::min<std::uint64_t>(weft_test::scale(), 1000));
    CAPTURE(threads_count);
    CAPTURE(capacity);

    weft::semaphore sem{capacity};
    std::atomic<bool> big_done{false};
    std::atomic<int> big_granted{0};
    std::atomic<std::ptrdiff_t> held{0};
    std::atomic<std::uint64_t> over_capacity{0};
    // If the big waiter starved, the stream of small requests would go on
    // forever; after this generous limit it stops and the case fails.
    const auto give_up = std::chrono::steady_clock::now() + 60s;
    std::atomic<bool> gave_up{false};

    std::vector<std::thread> small;
    for (int t = 0; t < threads_count - 1; ++t) {
      small.emplace_back([&, t] {
        std::mt19937_64 rng{seed + static_cast<std::uint64_t>(t)};
        for (std::uint64_t i = 0;
             i < iteration_cap(200'000) * 100 && !big_done.load(std::memory_order_relaxed); ++i) {
          if ((i & 255) == 0 && std::chrono::steady_clock::now() > give_up) {
            gave_up.store(true);
            break;
          }
          const std::ptrdiff_t n =
              std::uniform_int_distribution<std::ptrdiff_t>{1, capacity - 1}(rng);
          bool got = true;
          if (rng() % 3 == 0) {
            got = sem.try_acquire(n);
          } else {
            sem.acquire(n);
          }
          if (!got) continue;
          if (held.fetch_add(n) + n > capacity) over_capacity.fetch_add(1);
          held.fetch_sub(n);
          sem.release(n);
        }
      });
    }
    std::thread big([&] {
      for (int round = 0; round < big_rounds; ++round) {
        auto all = sem.acquire_permit(capacity);
        if (held.fetch_add(capacity) + capacity > capacity) over_capacity.fetch_add(1);
        held.fetch_sub(capacity);
        big_granted.fetch_add(1);
      }
      big_done.store(true);
    });
    big.join();
    for (auto& t : small) t.join();

    CHECK_FALSE(gave_up.load());
    CHECK(big_granted.load() == big_rounds);
    CHECK(over_capacity.load() == 0);
    CHECK(sem.available() == capacity);
    CHECK(sem.stats().waiters == 0);
  }
}
