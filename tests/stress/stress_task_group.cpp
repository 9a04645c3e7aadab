// SPDX-License-Identifier: BSL-1.0
// Randomised stress for task_group, result_group and the fan-out calls:
// random trees of tasks that spawn into their own group, fail, cancel, wait
// on nested groups and run under limits; groups destroyed at random points
// with tasks still running; result order under random finishing;
// parallel_map and gather called from many threads at once, nested inside
// their own calls, failing and cancelled by their parents. Every
// random choice comes from weft_test::seed(); replay with
//
//   ./weft_stress --seed N --test-case="*task_group*"
//
// (the interleaving is the scheduler's, so a replay repeats the choices,
// not necessarily the failure). --scale N runs N times more rounds. Every
// loop is bounded by a round count; nothing sleeps: gaps are random spins
// and yields.
#include <weft/cancel.hpp>
#include <weft/fan.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <latch>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

namespace {

using weft_test::rounds;
using weft_test::spin_for;

// An exception that counts its live copies.
class counted_error : public std::runtime_error {
 public:
  explicit counted_error(int id) : std::runtime_error("stress task failed"), id_(id) { ++live; }
  counted_error(const counted_error& other) : std::runtime_error(other), id_(other.id_) { ++live; }
  counted_error& operator=(const counted_error&) = delete;
  ~counted_error() override { --live; }
  int id() const noexcept { return id_; }
  static inline std::atomic<int> live{0};

 private:
  int id_;
};

// What one round of the tree scenario saw.
struct tree_state {
  std::atomic<int> next_id{0};
  std::atomic<int> started{0};   // go()/try_go() accepted
  std::atomic<int> ran{0};       // bodies entered
  std::atomic<int> running{0};   // bodies now running
  std::atomic<int> in_limit{0};  // bodies of the limited group now running
  std::atomic<int> most_in_limit{0};
  std::mutex thrown_mutex;
  std::set<int> thrown;
};

}  // namespace

TEST_CASE("stress: task_group random trees with failures, cancellations, nested waits and limits" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed};
  for (int round = 0; round < rounds(200); ++round) {
    CAPTURE(round);
    const auto workers = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
    const bool limited = rng() % 3 == 0;
    const auto limit = std::uniform_int_distribution<std::ptrdiff_t>{1, 4}(rng);
    const bool failures = rng() % 2 == 0;
    const bool cancel_from_outside = rng() % 3 == 0;
    const int max_depth = std::uniform_int_distribution<int>{1, 4}(rng);
    CAPTURE(workers);
    CAPTURE(limited);
    CAPTURE(failures);
    CAPTURE(cancel_from_outside);
    {
      weft::worker_pool pool{{.workers = workers}};
      weft::task_group group{pool.executor()};
      if (limited) group.set_limit(limit);
      tree_state state;

      // A node: maybe fails, maybe spawns children into the group (try_go
      // under a limit, since go() from inside a full limited group waits
      // for a sibling), maybe waits on a nested group of its own.
      std::function<void(int, std::uint64_t)> node = [&](int depth, std::uint64_t node_seed) {
        std::mt19937_64 local{node_seed};
        state.running.fetch_add(1);
        state.ran.fetch_add(1);
        if (limited) {
          const int now = state.in_limit.fetch_add(1) + 1;
          for (int seen = state.most_in_limit.load();
               now > seen && !state.most_in_limit.compare_exchange_weak(seen, now);) {
          }
        }
        spin_for(local() % 200);
        if (depth < max_depth) {
          const int children = static_cast<int>(local() % 4);
          for (int c = 0; c < children; ++c) {
            auto child = [&node, depth, s = local()] { node(depth + 1, s); };
            if (limited) {
              if (group.try_go(child)) state.started.fetch_add(1);
            } else {
              group.go(child);
              state.started.fetch_add(1);
            }
          }
          if (local() % 4 == 0) {
            weft::task_group nested{pool.executor(), group.token()};
            std::atomic<int> nested_ran{0};
            const int count = static_cast<int>(local() % 5);
            for (int i = 0; i < count; ++i) nested.go([&] { nested_ran.fetch_add(1); });
            try {
              nested.wait();
              CHECK(nested_ran.load() == count);
            } catch (...) {
              // The outer group was cancelled (its cause may be a sibling's
              // exception): nested tasks may have been skipped.
              CHECK(nested.token().cancelled());
              CHECK(nested_ran.load() <= count);
            }
          }
        }
        const bool throws = failures && local() % 8 == 0;
        if (limited) state.in_limit.fetch_sub(1);
        state.running.fetch_sub(1);
        if (throws) {
          const int id = state.next_id.fetch_add(1);
          {
            std::lock_guard lock(state.thrown_mutex);
            state.thrown.insert(id);
          }
          throw counted_error(id);
        }
      };

      std::thread canceller;
      std::latch canceller_ready{1};
      if (cancel_from_outside) {
        canceller = std::thread([&, spins = static_cast<std::uint32_t>(rng() % 5000)] {
          canceller_ready.count_down();
          spin_for(spins);
          group.cancel();
        });
        canceller_ready.wait();
      }
      const int roots = static_cast<int>(std::uniform_int_distribution<int>{1, 6}(rng));
      for (int r = 0; r < roots; ++r) {
        group.go([&node, s = rng()] { node(0, s); });
        state.started.fetch_add(1);
      }

      int kept = -1;
      bool cancelled_error = false;
      bool other_error = false;
      try {
        group.wait();
      } catch (const counted_error& e) {
        kept = e.id();
      } catch (const std::system_error& e) {
        cancelled_error = e.code() == weft::errc::cancelled;
        other_error = !cancelled_error;
      } catch (...) {
        other_error = true;
      }
      if (canceller.joinable()) canceller.join();

      CHECK_FALSE(other_error);
      CHECK(state.running.load() == 0);  // nothing runs after wait()
      CHECK(group.in_flight() == 0);
      CHECK(state.ran.load() <= state.started.load());
      if (limited) CHECK(state.most_in_limit.load() <= limit);
      {
        std::lock_guard lock(state.thrown_mutex);
        if (kept >= 0) {
          CHECK(state.thrown.count(kept) == 1);
        } else {
          CHECK(state.thrown.empty());  // a failure is never swallowed
        }
      }
      if (kept < 0 && !cancel_from_outside) {
        CHECK_FALSE(cancelled_error);
        CHECK(state.ran.load() == state.started.load());
      }
      if (cancelled_error) CHECK(group.token().cancelled());
    }
    CHECK(counted_error::live.load() == 0);
  }
}

TEST_CASE("stress: task_group destroyed at a random point never leaves a task running" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x5eedu};
  for (int round = 0; round < rounds(400); ++round) {
    CAPTURE(round);
    const auto workers = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
    weft::worker_pool pool{{.workers = workers}};
    std::atomic<int> running{0};
    std::atomic<int> entered{0};
    std::atomic<int> left{0};
    const int tasks = std::uniform_int_distribution<int>{1, 12}(rng);
    const bool unwind = rng() % 2 == 0;
    try {
      weft::task_group group{pool.executor()};
      for (int i = 0; i < tasks; ++i) {
        const auto kind = rng() % 3;
        group.go([&, kind, spins = static_cast<std::uint32_t>(rng() % 300)](const weft::cancel_token& token) {
          running.fetch_add(1);
          entered.fetch_add(1);
          if (kind == 0) {
            token.wait();  // only the destructor's cancellation ends this
          } else if (kind == 1) {
            spin_for(spins);
          } else {
            for (std::uint32_t s = 0; s < spins && !token.cancelled(); ++s) weft::detail::cpu_relax();
          }
          running.fetch_sub(1);
          left.fetch_add(1);
        });
      }
      spin_for(rng() % 2000);
      if (unwind) throw std::runtime_error("unwinding");
    } catch (const std::runtime_error&) {
    }
    CHECK(running.load() == 0);
    CHECK(entered.load() == left.load());
    CHECK(entered.load() <= tasks);
  }
}

TEST_CASE("stress: result_group and parallel_map keep spawn order under random finishing" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x0bdeu};
  for (int round = 0; round < rounds(200); ++round) {
    CAPTURE(round);
    const auto workers = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
    // The pool is destroyed before the exceptions are counted: a group's
    // runner still queued there may hold the group's state a little longer.
    std::optional<weft::worker_pool> pool_holder{std::in_place, weft::worker_pool_options{.workers = workers}};
    weft::worker_pool& pool = *pool_holder;
    const int count = std::uniform_int_distribution<int>{0, 300}(rng);

    weft::result_group<std::string> group{pool.executor()};
    if (rng() % 3 == 0) group.set_limit(std::uniform_int_distribution<std::ptrdiff_t>{1, 4}(rng));
    int accepted = 0;
    std::vector<int> expected;
    for (int i = 0; i < count; ++i) {
      auto task = [i, spins = static_cast<std::uint32_t>(rng() % 400)] {
        spin_for(spins);
        return std::to_string(i);
      };
      if (rng() % 4 == 0) {
        if (!group.try_go(task)) continue;
      } else {
        group.go(task);
      }
      ++accepted;
      expected.push_back(i);
    }
    auto results = group.wait();
    REQUIRE(results.size() == static_cast<std::size_t>(accepted));
    bool in_order = true;
    for (std::size_t i = 0; i < results.size(); ++i) in_order = in_order && results[i] == std::to_string(expected[i]);
    CHECK(in_order);

    std::vector<int> input(static_cast<std::size_t>(count));
    std::iota(input.begin(), input.end(), 0);
    const auto limit = std::uniform_int_distribution<std::size_t>{0, 5}(rng);
    const int fail_at = rng() % 3 == 0 && count > 0 ? std::uniform_int_distribution<int>{0, count - 1}(rng) : -1;
    std::atomic<int> calls{0};
    try {
      auto mapped = weft::parallel_map(
          input,
          [&, spins = static_cast<std::uint32_t>(rng() % 200)](int x) {
            calls.fetch_add(1);
            spin_for(spins * static_cast<std::uint32_t>(x % 3));
            if (x == fail_at) throw counted_error(x);
            return -x;
          },
          {.limit = limit, .executor = pool.executor()});
      CHECK(fail_at < 0);
      REQUIRE(mapped.size() == input.size());
      bool mapped_in_order = true;
      for (std::size_t i = 0; i < mapped.size(); ++i) mapped_in_order = mapped_in_order && mapped[i] == -input[i];
      CHECK(mapped_in_order);
      CHECK(calls.load() == count);
    } catch (const counted_error& e) {
      CHECK(e.id() == fail_at);
      CHECK(calls.load() <= count);
    }
    pool_holder.reset();
    CHECK(counted_error::live.load() == 0);
  }
}

TEST_CASE(
    "stress: parallel_map and gather from many threads on one pool, nested, failing and cancelled" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  for (const std::size_t workers : {1u, 2u, 3u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers, .queue_capacity = 16}};
    weft_test::chaos_sources parents{4};
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> calls_after_return{0};
    std::atomic<std::uint64_t> runs_twice{0};
    std::atomic<std::uint64_t> wrong_results{0};
    std::atomic<std::uint64_t> unexpected_errors{0};
    std::atomic<std::uint64_t> fan_outs{0};
    // Calls that land while their fan-out's `returned` is set are counted:
    // a late helper must never run one.
    const auto fan_out = [&](std::mt19937_64& rng, const weft::cancel_token& parent,
                             bool may_nest) {
      const auto count = std::uniform_int_distribution<std::size_t>{0, 64}(rng);
      const auto limit = std::uniform_int_distribution<std::size_t>{0, workers + 2}(rng);
      const int fail_at = rng() % 4 == 0 && count > 0 ? static_cast<int>(rng() % count) : -1;
      const int nest_at =
          may_nest && rng() % 4 == 0 && count > 0 ? static_cast<int>(rng() % count) : -1;
      std::vector<std::atomic<int>> runs(count);
      std::atomic<bool> returned{false};
      std::vector<int> input(count);
      std::iota(input.begin(), input.end(), 0);
      const auto spins = static_cast<std::uint32_t>(rng() % 300);
      const auto call = [&](int x, const weft::cancel_token& token) {
        if (returned.load()) calls_after_return.fetch_add(1);
        runs[static_cast<std::size_t>(x)].fetch_add(1);
        spin_for(spins * static_cast<std::uint32_t>(x % 4));
        if (x == nest_at) {
          // From a pool worker or the calling thread: its helpers queue
          // behind busy workers, and it must not wait for them.
          (void)weft::parallel_map(std::vector<int>{1, 2, 3, 4}, [](int y) { return y; },
                                   {.token = token, .executor = pool.executor()});
        }
        if (x == fail_at) throw counted_error(x);
        return 3 * x;
      };
      try {
        if (count >= 2 && rng() % 5 == 0) {
          // Elements 0 and 1 as two of three heterogeneous calls.
          const auto [first, second, name] = weft::gather(
              pool.executor(), parent, [&](const weft::cancel_token& t) { return call(0, t); },
              [&](const weft::cancel_token& t) { return call(1, t); },
              [] { return std::string{"third"}; });
          returned.store(true);
          if (first != 0 || second != 3 || name != "third" || fail_at == 0 || fail_at == 1)
            wrong_results.fetch_add(1);
        } else {
          const auto out = weft::parallel_map(
              input, call, {.limit = limit, .token = parent, .executor = pool.executor()});
          returned.store(true);
          bool right = out.size() == count && fail_at < 0;
          for (std::size_t i = 0; right && i < count; ++i)
            right = out[i] == 3 * input[i] && runs[i].load() == 1;
          if (!right) wrong_results.fetch_add(1);
        }
      } catch (const counted_error& e) {
        if (e.id() != fail_at) unexpected_errors.fetch_add(1);
      } catch (const std::system_error& e) {
        // The parent was cancelled, or a nested call saw its token cancelled.
        if (e.code() != weft::errc::cancelled && e.code() != std::errc::operation_canceled) {
          unexpected_errors.fetch_add(1);
        }
      }
      returned.store(true);
      for (const auto& r : runs) {
        if (r.load() > 1) runs_twice.fetch_add(1);
      }
      fan_outs.fetch_add(1);
    };

    std::vector<std::thread> callers;
    const int caller_count = weft_test::thread_counts().front();
    for (int t = 0; t < caller_count; ++t) {
      callers.emplace_back([&, t] {
        std::mt19937_64 rng{seed ^ (0xfa40u + static_cast<std::uint64_t>(t))};
        for (std::uint64_t i = 0; i < weft_test::iteration_cap(2'000) && !stop.load(); ++i) {
          fan_out(rng, rng() % 3 == 0 ? parents.token(rng()) : weft::cancel_token{}, true);
        }
      });
    }
    std::thread chaos([&] {
      std::mt19937_64 rng{seed ^ 0xc4a05u};
      const auto until = std::chrono::steady_clock::now() + weft_test::run_budget();
      while (std::chrono::steady_clock::now() < until) {
        parents.cancel_and_replace(rng(), rng() % 2 == 0);
        for (int y = 0; y < 50; ++y) std::this_thread::yield();
      }
      stop.store(true);
    });
    chaos.join();
    for (auto& caller : callers) caller.join();
    CHECK(fan_outs.load() > 0);
    CHECK(calls_after_return.load() == 0);
    CHECK(runs_twice.load() == 0);
    CHECK(wrong_results.load() == 0);
    CHECK(unexpected_errors.load() == 0);
  }
  CHECK(counted_error::live.load() == 0);
}
