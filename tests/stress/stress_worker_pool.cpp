// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for weft::worker_pool. Every random choice
// comes from weft_test::seed(), which main.cpp prints; replay a failure with
//
//   ./weft_stress --seed N --test-case="worker_pool stress*"
//
// (the interleaving itself is up to the scheduler, so a replay repeats the
// choices, not necessarily the failure). --scale N runs N times more rounds.
//
// Nothing sleeps: gaps between bursts are random spin counts, long enough
// now and then for every worker to run dry and park, so posts meet workers
// that are busy, spinning, on their way to park, parked, or being woken (the
// sleep/notify race of PITFALLS: cppcoro#114, BS#93, tensorflow#932; and the
// blocking wrapper over the lock-free queue, mc#173, mc#285). Every loop is
// bounded by a count.
#include <weft/cancel.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <latch>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::chaos_sources;

using weft_test::under_sanitizer;

// `normal` rounds, half as many under sanitizers (weft_test::rounds keeps a
// quarter), times --scale (at most 1000).
int rounds_halved_under_sanitizers(int normal) {
  const int base = under_sanitizer ? std::max(1, normal / 2) : normal;
  return base * static_cast<int>(std::min<std::uint64_t>(weft_test::scale(), 1000));
}

// More producer threads than cores, always.
int producer_count(std::mt19937_64& rng) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return cores + 1 + static_cast<int>(rng() % static_cast<std::uint64_t>(cores + 2));
}

weft::overflow random_policy(std::mt19937_64& rng) {
  switch (rng() % 3) {
    case 0:
      return weft::overflow::block;
    case 1:
      return weft::overflow::reject;
    default:
      return weft::overflow::caller_runs;
  }
}

const char* policy_name(weft::overflow policy) {
  switch (policy) {
    case weft::overflow::block:
      return "block";
    case weft::overflow::reject:
      return "reject";
    case weft::overflow::caller_runs:
      return "caller_runs";
  }
  return "?";
}

// A compiler barrier an iteration, not weft_test::spin_for's pause: the gap
// lengths here are counted in these much shorter steps.
void spin_signal_fences(std::uint64_t iterations) {
  for (std::uint64_t i = 0; i < iterations; ++i)
    std::atomic_signal_fence(std::memory_order_seq_cst);
}

// A gap between bursts: usually short, sometimes long enough for the workers
// to run dry and park.
std::uint64_t random_gap(std::mt19937_64& rng) {
  switch (rng() % 8) {
    case 0:
      return 0;
    case 1:
      return 20'000 + rng() % 40'000;
    default:
      return rng() % 2'000;
  }
}

// Runs the chaos thread until stop() (or a generous iteration cap).
class chaos_thread {
 public:
  chaos_thread(chaos_sources& sources, std::uint64_t seed)
      : thread_([this, &sources, seed] {
          std::mt19937_64 rng{seed};
          for (int i = 0; i < 2'000'000 && !stop_.load(std::memory_order_relaxed); ++i) {
            sources.cancel_and_replace(rng());
            spin_signal_fences(rng() % 20'000);
          }
        }) {}
  chaos_thread(const chaos_thread&) = delete;
  chaos_thread& operator=(const chaos_thread&) = delete;
  ~chaos_thread() { stop(); }
  void stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Live task objects: proves every task the pool took was destroyed, run or not.
struct instances {
  std::atomic<std::int64_t> live{0};
};

class counted {
 public:
  explicit counted(instances& owner) noexcept : owner_(&owner) { owner_->live.fetch_add(1); }
  counted(const counted& other) noexcept : owner_(other.owner_) { owner_->live.fetch_add(1); }
  counted(counted&& other) noexcept : owner_(other.owner_) { owner_->live.fetch_add(1); }
  counted& operator=(const counted&) = delete;
  counted& operator=(counted&&) = delete;
  ~counted() { owner_->live.fetch_sub(1); }

 private:
  instances* owner_;
};

struct expected_failure : std::runtime_error {
  expected_failure() : std::runtime_error("expected in this stress test") {}
};

// What became of each attempt to hand the pool a task.
struct outcomes {
  std::atomic<std::uint64_t> attempts{0};
  std::atomic<std::uint64_t> accepted{0};   // queued or run by the caller
  std::atomic<std::uint64_t> rejected{0};   // weft::rejected thrown
  std::atomic<std::uint64_t> declined{0};   // try_post said no
  std::atomic<std::uint64_t> cancelled{0};  // post(f, token) gave up
};

enum class entry_point { post, try_post, post_token, submit };

// Hands `task` to `pool` through one of the four entry points and records
// the outcome. Returns true when the pool accepted it.
template <class Task>
bool attempt(weft::worker_pool& pool, entry_point how, Task&& task, const weft::cancel_token& token,
             outcomes& out, weft_test::future_sink& futures) {
  out.attempts.fetch_add(1, std::memory_order_relaxed);
  try {
    switch (how) {
      case entry_point::post:
        pool.post(std::forward<Task>(task));
        break;
      case entry_point::try_post:
        if (!pool.try_post(std::forward<Task>(task))) {
          out.declined.fetch_add(1, std::memory_order_relaxed);
          return false;
        }
        break;
      case entry_point::post_token: {
        const auto status = pool.post(std::forward<Task>(task), token);
        if (status != weft::wait_status::ok) {
          out.cancelled.fetch_add(1, std::memory_order_relaxed);
          return false;
        }
        break;
      }
      case entry_point::submit: {
        // Nobody reads the future: its task still runs, its exception stays in it.
        futures.keep(pool.submit(std::forward<Task>(task)));
        break;
      }
    }
  } catch (const weft::rejected&) {
    out.rejected.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  out.accepted.fetch_add(1, std::memory_order_relaxed);
  return true;
}

entry_point random_entry_point(std::uint64_t r) { return static_cast<entry_point>(r % 4); }

}  // namespace

TEST_CASE(
    "worker_pool stress: every task runs exactly once under bursty producers, random pools and "
    "policies (PITFALLS: worker sleep/notify race, cppcoro#114, BS#93, mc#173)" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x9e3779b97f4a7c15u};
  const int round_count = rounds_halved_under_sanitizers(40);
  const int per_producer = under_sanitizer ? 80 : 200;

  for (int round = 0; round < round_count; ++round) {
    const std::size_t workers = 1 + setup() % 4;
    const std::size_t capacity = 1 + setup() % 8;
    const weft::overflow policy = random_policy(setup);
    const int producers = producer_count(setup);
    const std::uint64_t round_seed = setup();
    CAPTURE(round);
    CAPTURE(workers);
    CAPTURE(capacity);
    const std::string policy_label = policy_name(policy);
    CAPTURE(policy_label);
    CAPTURE(producers);

    const std::size_t parents = static_cast<std::size_t>(producers) * static_cast<std::size_t>(per_producer);
    // Ids [0, parents) are posted by producers; parent i may post child
    // parents + i from inside its task.
    std::vector<std::atomic<std::uint8_t>> hits(2 * parents);
    std::vector<std::atomic<std::uint8_t>> accepted(2 * parents);
    std::atomic<std::uint64_t> throwing_ran{0};
    std::atomic<std::uint64_t> handler_calls{0};
    outcomes out;
    weft::wait_group done;
    chaos_sources chaos{4};
    weft_test::future_sink futures;  // before the pool: see future_sink
    {
      weft::worker_pool pool{{.workers = workers, .queue_capacity = capacity, .on_full = policy, .name = "stress"}};
      pool.set_error_handler([&](std::exception_ptr) { handler_calls.fetch_add(1, std::memory_order_relaxed); });
      chaos_thread canceller{chaos, round_seed ^ 0xc4a05u};

      const auto post_child = [&](std::size_t parent) {
        const std::size_t id = parents + parent;
        done.add(1);
        const entry_point how = random_entry_point(parent * 0x9e3779b97f4a7c15u >> 7);
        const bool ok = attempt(
            pool, how,
            [&, id] {
              hits[id].fetch_add(1, std::memory_order_relaxed);
              done.done();
            },
            chaos.token(id), out, futures);
        if (ok) {
          accepted[id].store(1, std::memory_order_relaxed);
        } else {
          done.done();
        }
      };

      std::vector<std::thread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
          std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(p)};
          int i = 0;
          while (i < per_producer) {
            const int burst = 1 + static_cast<int>(rng() % 12);
            for (int b = 0; b < burst && i < per_producer; ++b, ++i) {
              const std::size_t id = static_cast<std::size_t>(p) * static_cast<std::size_t>(per_producer) +
                                     static_cast<std::size_t>(i);
              const bool throws = rng() % 64 == 0;
              const bool nest = rng() % 16 == 0;
              const std::uint64_t work = rng() % 4 == 0 ? rng() % 500 : 0;
              done.add(1);
              const bool ok = attempt(
                  pool, random_entry_point(rng()),
                  [&, id, throws, nest, work] {
                    spin_signal_fences(work);
                    hits[id].fetch_add(1, std::memory_order_relaxed);
                    if (nest) post_child(id);  // before done(): the count never touches zero early
                    if (throws) throwing_ran.fetch_add(1, std::memory_order_relaxed);
                    done.done();
                    if (throws) throw expected_failure{};
                  },
                  chaos.token(rng()), out, futures);
              if (ok) {
                accepted[id].store(1, std::memory_order_relaxed);
              } else {
                done.done();
              }
            }
            spin_signal_fences(random_gap(rng));
          }
        });
      }
      for (auto& t : threads) t.join();

      // A lost wake-up leaves tasks queued with every worker parked: report
      // it as a failure instead of hanging (the destructor's shutdown wakes
      // the workers, so the round still ends).
      const auto waited = done.wait_for(60s);
      CHECK_MESSAGE(waited == weft::wait_status::ok, "tasks left unrun: lost wake-up? queued=" << pool.stats().queued);
      if (waited != weft::wait_status::ok) break;

      const std::uint64_t accepted_total = out.accepted.load();
      weft_test::spin_until([&] {
        const auto s = pool.stats();
        return s.completed >= accepted_total && s.busy == 0;
      });
      const auto s = pool.stats();
      CHECK(s.submitted == accepted_total);
      CHECK(s.completed == accepted_total);
      CHECK(s.failed == throwing_ran.load());
      CHECK(s.rejected == out.rejected.load() + out.declined.load());
      CHECK(s.dropped == 0);
      CHECK(s.queued == 0);
      // The queue, and what each worker holds from a claim of it.
      CHECK(s.peak_queued <= capacity * (1 + workers));
      CHECK(handler_calls.load() <= throwing_ran.load());  // submit()'s go to the future
      canceller.stop();
    }

    CHECK(out.attempts.load() == out.accepted.load() + out.rejected.load() + out.declined.load() + out.cancelled.load());
    std::uint64_t ran = 0;
    std::uint64_t wrong = 0;
    for (std::size_t id = 0; id < hits.size(); ++id) {
      const auto h = hits[id].load();
      ran += h;
      if (h != accepted[id].load()) ++wrong;
    }
    CHECK(wrong == 0);  // every accepted task ran exactly once; nothing else ran
    CHECK(ran == out.accepted.load());
    if (policy == weft::overflow::block || policy == weft::overflow::caller_runs) {
      CHECK(out.rejected.load() == 0);
    }
  }
}

TEST_CASE(
    "worker_pool stress: shutdown or shutdown_now racing producers: every attempt is run once, "
    "rejected, declined, cancelled or dropped, and every task object is destroyed" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x5bd1e995u};
  const int round_count = rounds_halved_under_sanitizers(40);
  const int per_producer = under_sanitizer ? 100 : 300;

  for (int round = 0; round < round_count; ++round) {
    const std::size_t workers = 1 + setup() % 4;
    const std::size_t capacity = 1 + setup() % 8;
    const weft::overflow policy = random_policy(setup);
    const int producers = producer_count(setup);
    const bool now = setup() % 2 == 0;
    const bool from_a_worker = setup() % 4 == 0;  // a task calls shutdown
    const std::uint64_t total = static_cast<std::uint64_t>(producers) * static_cast<std::uint64_t>(per_producer);
    const std::uint64_t trigger = setup() % (total / 2 + 1);
    const std::uint64_t round_seed = setup();
    CAPTURE(round);
    CAPTURE(workers);
    CAPTURE(capacity);
    const std::string policy_label = policy_name(policy);
    CAPTURE(policy_label);
    CAPTURE(producers);
    CAPTURE(now);
    CAPTURE(from_a_worker);
    CAPTURE(trigger);

    std::vector<std::atomic<std::uint8_t>> hits(total);
    std::vector<std::atomic<std::uint8_t>> accepted(total);
    instances inst;
    outcomes out;
    chaos_sources chaos{4};
    weft_test::future_sink futures;  // before the pool: see future_sink
    std::size_t dropped_by_call = 0;
    {
      weft::worker_pool pool{{.workers = workers, .queue_capacity = capacity, .on_full = policy, .name = "stress"}};
      chaos_thread canceller{chaos, round_seed ^ 0xc4a05u};
      std::atomic<int> producers_left{producers};
      std::promise<std::size_t> dropped_in_task;
      std::atomic<bool> shutdown_task_accepted{false};

      std::vector<std::thread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
          std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(p)};
          int refused_after_shutdown = 0;
          for (int i = 0; i < per_producer; ++i) {
            const std::size_t id =
                static_cast<std::size_t>(p) * static_cast<std::size_t>(per_producer) + static_cast<std::size_t>(i);
            const std::uint64_t work = rng() % 4 == 0 ? rng() % 300 : 0;
            const bool ok = attempt(
                pool, random_entry_point(rng()),
                [&hits, id, work, c = counted{inst}] {
                  spin_signal_fences(work);
                  hits[id].fetch_add(1, std::memory_order_relaxed);
                },
                chaos.token(rng()), out, futures);
            if (ok) accepted[id].store(1, std::memory_order_relaxed);
            if (!ok && pool.is_shutdown() && ++refused_after_shutdown >= 8) break;
            if (rng() % 16 == 0) spin_signal_fences(random_gap(rng));
          }
          producers_left.fetch_sub(1);
        });
      }

      // Hand-off, not time: shut down once `trigger` attempts were made (or
      // every producer finished).
      weft_test::spin_until([&] { return out.attempts.load() >= trigger || producers_left.load() == 0; });
      bool shut_from_worker = false;
      std::uint64_t shutdown_task_rejected = 0;
      if (from_a_worker) {
        // Not counted in `out`: its own accounting is checked below.
        try {
          pool.post([&pool, &dropped_in_task, now] {
            std::size_t dropped = 0;
            if (now) {
              dropped = pool.shutdown_now();
            } else {
              pool.shutdown();
            }
            dropped_in_task.set_value(dropped);
          });
          shutdown_task_accepted.store(true);
          shut_from_worker = true;
        } catch (const weft::rejected&) {
          // Full under overflow::reject: shut down from here instead.
          shutdown_task_rejected = 1;
        }
      }
      if (!shut_from_worker) {
        if (now) {
          dropped_by_call = pool.shutdown_now();
        } else {
          pool.shutdown();
        }
      }
      for (auto& t : threads) t.join();
      if (shut_from_worker) {
        // Only this task shuts the pool down, so nothing can drop it: it has
        // run once join() returns (on a worker, or here if it was run inline).
        pool.join();
        auto result = dropped_in_task.get_future();
        REQUIRE(result.wait_for(0s) == std::future_status::ready);
        dropped_by_call = result.get();
      } else {
        pool.join();
      }
      CHECK(pool.is_shutdown());

      const auto s = pool.stats();
      const std::uint64_t extra = shutdown_task_accepted.load() ? 1 : 0;  // the shutdown task
      std::uint64_t ran = 0;
      std::uint64_t ran_unaccepted = 0;
      std::uint64_t ran_twice = 0;
      for (std::size_t id = 0; id < total; ++id) {
        const auto h = hits[id].load();
        ran += h;
        if (h > 1) ++ran_twice;
        if (h != 0 && accepted[id].load() == 0) ++ran_unaccepted;
      }
      CHECK(ran_twice == 0);
      CHECK(ran_unaccepted == 0);
      CHECK(out.attempts.load() == out.accepted.load() + out.rejected.load() + out.declined.load() + out.cancelled.load());
      // Accepted tasks either ran or were dropped, never both, never neither.
      CHECK(out.accepted.load() == ran + s.dropped);
      CHECK(s.submitted == out.accepted.load() + extra);
      CHECK(s.completed == ran + extra);
      CHECK(s.completed == s.submitted - s.dropped);
      CHECK(s.rejected == out.rejected.load() + out.declined.load() + shutdown_task_rejected);
      CHECK(s.queued == 0);
      CHECK(s.busy == 0);
      if (now) {
        CHECK(s.dropped >= dropped_by_call);
      } else {
        CHECK(s.dropped == 0);
        CHECK(dropped_by_call == 0);
      }
      CHECK(inst.live.load() == 0);  // every task object, run, dropped or refused, was destroyed
      canceller.stop();
    }
    CHECK(inst.live.load() == 0);
  }
}

// join() returns while producers still post: every post that returned
// (accepted) ran before join() returned, and every later one is refused.
// A producer woken with room just before shutdown(), or one between its
// check that the pool was open and its push, used to queue its task after
// join() had run what was queued: it ran only in the pool's destructor.
TEST_CASE(
    "worker_pool stress: posts racing shutdown() and join() ran before join() returned, or were "
    "refused" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x6a09e667u};
  const auto until = std::chrono::steady_clock::now() + weft_test::run_budget();
  std::uint64_t round = 0;
  for (; round < weft_test::iteration_cap(400) &&
         (round == 0 || std::chrono::steady_clock::now() < until);
       ++round) {
    const std::size_t workers = 1 + setup() % 2;
    const weft::overflow policy = setup() % 2 == 0 ? weft::overflow::block : weft::overflow::reject;
    const int producers = producer_count(setup);
    const std::uint64_t round_seed = setup();
    CAPTURE(round);
    weft::worker_pool pool{
        {.workers = workers, .queue_capacity = 1 + setup() % 2, .on_full = policy}};
    std::atomic<std::uint64_t> ran{0};
    std::atomic<std::uint64_t> accepted{0};
    std::atomic<int> started{0};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(p)};
        started.fetch_add(1);
        for (;;) {
          try {
            const auto task = [&ran] { ran.fetch_add(1, std::memory_order_relaxed); };
            bool ok = true;
            switch (rng() % 3) {
              case 0:
                pool.post(task);
                break;
              case 1:
                ok = pool.try_post(task);
                break;
              default:
                ok = pool.post(task, weft::cancel_token{}) == weft::wait_status::ok;
                break;
            }
            if (ok) accepted.fetch_add(1, std::memory_order_relaxed);
          } catch (const weft::rejected&) {
            if (pool.is_shutdown()) return;  // else full under overflow::reject
          }
        }
      });
    }
    weft_test::spin_until([&] { return started.load() == producers; });
    for (auto n = setup() % 256; n != 0; --n) std::this_thread::yield();
    pool.shutdown();
    pool.join();
    const std::uint64_t ran_by_join = ran.load();
    const std::uint64_t queued_at_join = pool.stats().queued;
    for (auto& t : threads) t.join();
    CHECK(queued_at_join == 0);
    CHECK(accepted.load() == ran_by_join);
  }
  CHECK(round > 0);
}

// A few tasks block for good while more are queued, and the workers left
// must still run everything else. A worker that takes a task without
// handing on the search for the next one (a searcher that had given up, one
// on its way to park, a thread that held a searching mark with no worker to
// give it to), or one that holds tasks of a run it claimed behind its
// blocked task, would leave the rest behind that task while other workers
// stay parked. Blocked tasks wait for a flag that is set only
// after every other task has run (a hang is this test's failure).
TEST_CASE("worker_pool stress: tasks that block for good never strand the queued tasks behind them" *
          doctest::timeout(240)) {
  std::mt19937_64 rng{weft_test::seed() + 11};
  const int total_rounds = rounds_halved_under_sanitizers(400);
  for (int round = 0; round < total_rounds; ++round) {
    constexpr int workers = 4;
    constexpr int tasks = 20;
    const int blockers = 1 + static_cast<int>(rng() % (workers - 1));  // leaves at least one worker
    std::vector<int> order(tasks);
    for (int i = 0; i < tasks; ++i) order[static_cast<std::size_t>(i)] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<bool> blocks(tasks, false);
    for (int b = 0; b < blockers; ++b) blocks[static_cast<std::size_t>(order[static_cast<std::size_t>(b)])] = true;

    // Half the rounds queue every task while the workers wait at a gate, so
    // that they then take the queue in runs and hold tasks behind blockers.
    const bool deep = rng() % 2 == 0;
    std::atomic<bool> released{false};
    std::atomic<bool> gate_open{false};
    std::atomic<int> at_gate{0};
    std::atomic<int> ran{0};
    {
      weft::worker_pool pool{{.workers = workers, .queue_capacity = 64}};
      if (deep) {
        for (int w = 0; w < workers; ++w) {
          pool.post([&] {
            at_gate.fetch_add(1);
            weft_test::spin_until([&] { return gate_open.load(std::memory_order_acquire); });
          });
        }
        weft_test::spin_until([&] { return at_gate.load() == workers; });
      }
      for (int i = 0; i < tasks; ++i) {
        if (blocks[static_cast<std::size_t>(i)]) {
          // Yields while it waits, as a semaphore waiter does before it parks.
          pool.post([&] { weft_test::spin_until([&] { return released.load(std::memory_order_acquire); }); });
        } else {
          pool.post([&] { ran.fetch_add(1, std::memory_order_relaxed); });
        }
        if (!deep) {
          for (auto gap = rng() % 64; gap != 0; --gap) std::atomic_signal_fence(std::memory_order_seq_cst);
        }
      }
      gate_open.store(true, std::memory_order_release);
      weft_test::spin_until([&] { return ran.load(std::memory_order_relaxed) == tasks - blockers; });
      released.store(true, std::memory_order_release);
    }
    REQUIRE(ran.load() == tasks - blockers);
  }
}
