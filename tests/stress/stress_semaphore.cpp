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
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"
#include "watchdog.hpp"

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

// ---------------------------------------------------------------------------
// The release slot (semaphore.hpp, "The release slot"): one free permit
// parked where acquire(1) takes it with a compare-and-swap that leaves the
// taker's tag, and the taker's next release(1) puts it back with a plain
// store. The first thread to queue while another thread's tag is there
// turns the slot off for good, after a membarrier. The cases below aim at
// the moments where a permit could go missing or a waiter could sleep
// through a release: a waiter queueing, and so turning the slot off, while
// the slot's holder stores its permit back; the slot's permit taken and
// released by threads that end, whose thread records (and so tags) pass to
// the next threads; and permits taken through the slot on one thread but
// released on another.
//
// A lost wake-up shows as a thread waiting forever. doctest's timeout only
// reports a case once it ends, so a watchdog prints what every thread was
// doing and aborts a run that makes no progress for a long while.

namespace {

// Spins, without yielding, for about `ns` nanoseconds: a random short delay
// that moves one side of a race against the other.
void spin_ns(std::int64_t ns) {
  if (ns <= 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds{ns};
  while (std::chrono::steady_clock::now() < until) {
  }
}

// One round of the lost wake-up hunt, drawn identically by both threads of
// a pair from generators seeded alike.
struct slot_round {
  // How the holder times its release against the waiter.
  enum class timing : int {
    after_queued,   // once waiters() shows the waiter queued
    aimed,          // a delay after the waiter starts, aimed at the moment
                    // it queues (slot_pair::aim_ns)
    random,         // a delay anywhere from 0 to twice the aimed one
    before_waiter,  // without waiting for the waiter to start
  };
  // How the waiter waits.
  enum class wait_kind : int { blocking, token, acquire_for, acquire_until, permit };

  std::ptrdiff_t capacity = 1;
  std::ptrdiff_t weight = 1;  // the waiter's request
  int holder = 0;             // which thread of the pair holds first
  int warmups = 0;            // acquire(1)/release(1) pairs the holder makes first
  int take_kind = 0;          // how the holder takes its first permits
  // The holder takes all its permits in one acquire(capacity), which moves
  // the slot's permit into the count and leaves the slot empty: its first
  // release(1) then fills the slot with a compare-and-swap, racing the
  // waiter's settling. Otherwise it takes the slot's permit first.
  bool all_at_once = false;
  // acquire(1)/release(1) pairs the holder makes after it has released
  // everything: it takes and refills the slot while the waiter settles it,
  // and queues behind the waiter once the slot is off.
  int cycles = 0;
  // Two short-lived threads take and release the holder's permits (see
  // the holder's part of the case).
  bool inherit = false;
  timing when = timing::aimed;
  wait_kind how = wait_kind::blocking;
  bool slot_permit_last = false;  // the holder releases the slot's permit after the others
  bool holder_piecemeal = false;  // the holder's other permits go back one at a time
  bool waiter_piecemeal = false;  // and the waiter's

  static slot_round draw(std::mt19937_64& rng) {
    slot_round r;
    r.capacity = std::uniform_int_distribution<std::ptrdiff_t>{1, 3}(rng);
    r.weight =
        rng() % 2 == 0 ? 1 : std::uniform_int_distribution<std::ptrdiff_t>{1, r.capacity}(rng);
    r.holder = static_cast<int>(rng() % 2);
    r.warmups = rng() % 2 == 0 ? 0 : static_cast<int>(rng() % 4);
    r.take_kind = static_cast<int>(rng() % 4);
    r.all_at_once = r.capacity > 1 && rng() % 3 == 0;
    r.cycles = rng() % 4 == 0 ? 1 + static_cast<int>(rng() % 32) : 0;
    r.inherit = rng() % 4 == 0;
    const auto when = rng() % 8;
    r.when = when < 2   ? timing::after_queued
             : when < 6 ? timing::aimed
             : when < 7 ? timing::random
                        : timing::before_waiter;
    r.how = static_cast<wait_kind>(rng() % 5);
    r.slot_permit_last = rng() % 2 == 0;
    r.holder_piecemeal = rng() % 2 == 0;
    r.waiter_piecemeal = rng() % 2 == 0;
    return r;
  }

  // Packed into one word, for the watchdog to print.
  std::uint64_t packed() const {
    return static_cast<std::uint64_t>(capacity) | static_cast<std::uint64_t>(weight) << 8 |
           static_cast<std::uint64_t>(holder) << 16 | static_cast<std::uint64_t>(warmups) << 20 |
           static_cast<std::uint64_t>(take_kind) << 24 | static_cast<std::uint64_t>(when) << 28 |
           static_cast<std::uint64_t>(how) << 32 | std::uint64_t{slot_permit_last} << 36 |
           std::uint64_t{holder_piecemeal} << 37 | std::uint64_t{waiter_piecemeal} << 38 |
           std::uint64_t{all_at_once} << 39 | static_cast<std::uint64_t>(cycles) << 40 |
           std::uint64_t{inherit} << 48;
  }
  static void print(std::uint64_t p) {
    std::fprintf(
        stderr,
        "capacity %d, waiter's weight %d, holder thread %d, warmups %d, take kind %d, "
        "timing %d (0 after queued, 1 aimed, 2 random, 3 before the waiter), wait kind %d "
        "(0 blocking, 1 token, 2 acquire_for, 3 acquire_until, 4 permit), slot permit last "
        "%d, holder piecemeal %d, waiter piecemeal %d, all at once %d, cycles %d, inherit %d",
        static_cast<int>(p & 0xff), static_cast<int>(p >> 8 & 0xff),
        static_cast<int>(p >> 16 & 0xf), static_cast<int>(p >> 20 & 0xf),
        static_cast<int>(p >> 24 & 0xf), static_cast<int>(p >> 28 & 0xf),
        static_cast<int>(p >> 32 & 0xf), static_cast<int>(p >> 36 & 1),
        static_cast<int>(p >> 37 & 1), static_cast<int>(p >> 38 & 1), static_cast<int>(p >> 39 & 1),
        static_cast<int>(p >> 40 & 0xff), static_cast<int>(p >> 48 & 1));
  }
};

// Two threads and, each round, a fresh semaphore (the slot turns off at most
// once in a semaphore's life). Rounds are numbered from 1; each flag holds
// the number of the round it was last raised in, so nothing is reset.
struct slot_pair {
  std::atomic<std::uint64_t> go{0};        // thread 0 made the round's semaphore
  std::atomic<std::uint64_t> held{0};      // the holder holds every permit
  std::atomic<std::uint64_t> started{0};   // the waiter is about to acquire
  std::atomic<std::uint64_t> finished{0};  // threads done with their rounds, two a round
  std::atomic<bool> stop{false};
  std::unique_ptr<weft::semaphore> sem;  // written by thread 0 between rounds
  std::atomic<std::uint64_t> plan{0};    // slot_round::packed(), for the watchdog
  std::atomic<std::uint64_t> round{0};
  std::atomic<int> waiter_status{0};  // the waiter's wait_status this round
  // The holder's delay, after the waiter starts, in the aimed rounds: the
  // race sought is the holder storing the slot's permit back while the
  // waiter queues (it sets the waiters mark, settles the slot, turns it off
  // and joins the queue). After each aimed round thread 0 moves the aim
  // later if the waiter did not queue (the release came first), earlier if
  // waiters() already showed it queued when the holder released, and
  // leaves it where it is on a hit: a release while the waiter queued.
  std::atomic<std::int64_t> aim_ns{20'000};
  std::atomic<bool> released_late{false};  // waiters() > 0 just before the holder released
  // Written by thread 0 only.
  std::uint64_t rounds = 0;
  std::uint64_t queued_rounds = 0;
  std::uint64_t aimed_rounds = 0;
  std::uint64_t hits = 0;
  std::uint64_t failures = 0;
  std::string first_failure;
};

}  // namespace

TEST_CASE(
    "semaphore release slot: a waiter turning the slot off never misses its holder's release" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);

  for (const int threads_count : thread_counts()) {
    const int pairs_count = std::max(1, threads_count / 2);
    CAPTURE(pairs_count);
    std::vector<slot_pair> pairs(static_cast<std::size_t>(pairs_count));
    const auto until = std::chrono::steady_clock::now() + run_budget();
    const auto long_wait = under_tsan ? 120s : 60s;  // a lost wake-up, were it ever reached

    weft_test::watchdog dog(
        "stress_semaphore", "release slot: lost wake-up hunt", 2 * pairs.size(), [&] {
          for (std::size_t p = 0; p < pairs.size(); ++p) {
            const auto& pair = pairs[p];
            std::fprintf(stderr,
                         "  pair %zu (threads %zu and %zu): round %llu, held %llu, started %llu, "
                         "finished %llu\n    ",
                         p, 2 * p, 2 * p + 1, static_cast<unsigned long long>(pair.round.load()),
                         static_cast<unsigned long long>(pair.held.load()),
                         static_cast<unsigned long long>(pair.started.load()),
                         static_cast<unsigned long long>(pair.finished.load()));
            slot_round::print(pair.plan.load());
            std::fprintf(stderr, "\n");
          }
        });

    const auto play = [&](std::size_t p, int me) {
      slot_pair& pair = pairs[p];
      const std::size_t who = 2 * p + static_cast<std::size_t>(me);
      const std::uint64_t pair_seed =
          seed + 0x51075107u + static_cast<std::uint64_t>(threads_count) * 1000u + p;
      std::mt19937_64 plans{pair_seed};  // the same sequence on both threads
      std::mt19937_64 rng{pair_seed ^ (0x9e3779b97f4a7c15u * static_cast<std::uint64_t>(me + 1))};
      weft::cancel_source never;  // a token that is never cancelled

      for (std::uint64_t r = 1;; ++r) {
        const slot_round plan = slot_round::draw(plans);
        if (me == 0) {
          // At least one round, however late this thread started.
          if (r > 1 && (r > iteration_cap(200'000) || std::chrono::steady_clock::now() >= until)) {
            pair.stop.store(true, std::memory_order_release);
            return;
          }
          pair.plan.store(plan.packed(), std::memory_order_relaxed);
          pair.round.store(r, std::memory_order_relaxed);
          pair.sem = std::make_unique<weft::semaphore>(plan.capacity);
          pair.go.store(r, std::memory_order_release);
        } else {
          dog.note(who, "waiting for the next round");
          weft_test::spin_until([&] {
            return pair.go.load(std::memory_order_acquire) >= r ||
                   pair.stop.load(std::memory_order_acquire);
          });
          if (pair.go.load(std::memory_order_acquire) < r) return;
        }
        weft::semaphore& sem = *pair.sem;

        if (plan.holder == me) {
          dog.note(who, "holder: acquiring");
          // The slot's permit (the first acquire(1) of a fresh semaphore
          // takes it, whichever way it asks), then the rest; or all at once.
          const std::ptrdiff_t first = plan.all_at_once ? plan.capacity : 1;
          bool took_first = true;
          bool took_rest = true;
          const auto take = [&] {
            for (int i = 0; i < plan.warmups; ++i) {
              sem.acquire(1);
              sem.release(1);
            }
            switch (plan.take_kind) {
              case 0:
                sem.acquire(first);
                break;
              case 1:
                took_first = sem.try_acquire(first);
                break;
              case 2:
                took_first = sem.acquire(first, never.token()) == weft::wait_status::ok;
                break;
              default:
                took_first = sem.acquire_for(first, 0s) == weft::wait_status::ok;
                break;
            }
            took_rest = first == plan.capacity || sem.try_acquire(plan.capacity - 1);
          };
          const auto release = [&] {
            if (plan.all_at_once) {
              if (took_first && plan.holder_piecemeal) {
                for (std::ptrdiff_t i = 0; i < plan.capacity; ++i) sem.release(1);
              } else if (took_first) {
                sem.release(plan.capacity);
              }
              return;
            }
            const auto release_rest = [&] {
              if (plan.capacity == 1 || !took_rest) return;
              if (plan.holder_piecemeal) {
                for (std::ptrdiff_t i = 1; i < plan.capacity; ++i) sem.release(1);
              } else {
                sem.release(plan.capacity - 1);
              }
            };
            if (plan.slot_permit_last) release_rest();
            if (took_first) sem.release(1);
            if (!plan.slot_permit_last) release_rest();
          };

          // Either this thread takes and releases, or two short-lived
          // threads do: the taker ends holding the permits, its tag in the
          // slot, and its thread record goes to the next thread that asks
          // for one, most likely the releaser, which asks at once (through
          // a slot of its own). The releaser's release(1) then stores into
          // the slot as the tag's owner.
          std::atomic<int> releaser_phase{0};  // 1: ready, 2: release now
          std::thread releaser;
          if (plan.inherit) {
            std::thread(take).join();
            releaser = std::thread([&] {
              weft::semaphore own{1};
              own.acquire(1);
              own.release(1);
              releaser_phase.store(1, std::memory_order_release);
              weft_test::spin_until(
                  [&] { return releaser_phase.load(std::memory_order_acquire) == 2; });
              release();
            });
            weft_test::spin_until(
                [&] { return releaser_phase.load(std::memory_order_acquire) == 1; });
          } else {
            take();
          }
          if (!took_first || !took_rest) {
            // Cannot happen: the holder is alone on a fresh semaphore. Fail
            // the round (the waiter may then get its permits at once).
            pair.waiter_status.store(-1, std::memory_order_relaxed);
          }
          pair.held.store(r, std::memory_order_release);

          if (plan.when != slot_round::timing::before_waiter) {
            dog.note(who, "holder: waiting for the waiter to start");
            weft_test::spin_until(
                [&] { return pair.started.load(std::memory_order_acquire) >= r; });
          }
          const auto aim = pair.aim_ns.load(std::memory_order_relaxed);
          switch (plan.when) {
            case slot_round::timing::after_queued:
              dog.note(who, "holder: waiting for the waiter to queue");
              weft_test::spin_until([&] { return sem.waiters() > 0; });
              break;
            case slot_round::timing::aimed:
              spin_ns(
                  std::uniform_int_distribution<std::int64_t>{aim - aim / 4, aim + aim / 4}(rng));
              break;
            case slot_round::timing::random:
              spin_ns(std::uniform_int_distribution<std::int64_t>{0, 2 * aim}(rng));
              break;
            case slot_round::timing::before_waiter:
              spin_ns(std::uniform_int_distribution<std::int64_t>{0, 2'000}(rng));
              break;
          }
          pair.released_late.store(sem.waiters() > 0, std::memory_order_relaxed);

          dog.note(who, "holder: releasing");
          if (plan.inherit) {
            releaser_phase.store(2, std::memory_order_release);
            releaser.join();
          } else {
            release();
          }
          // It holds nothing now, so waiting here behind the waiter is no
          // deadlock: the waiter's permits are all free.
          for (int i = 0; i < plan.cycles; ++i) {
            sem.acquire(1);
            sem.release(1);
          }
        } else {
          dog.note(who, "waiter: waiting for the holder");
          weft_test::spin_until([&] { return pair.held.load(std::memory_order_acquire) >= r; });
          pair.started.store(r, std::memory_order_release);
          const auto n = plan.weight;
          weft::permit permit;
          weft::wait_status status = weft::wait_status::ok;
          switch (plan.how) {
            case slot_round::wait_kind::blocking:
              dog.note(who, "waiter: in acquire(n)");
              sem.acquire(n);
              break;
            case slot_round::wait_kind::token:
              dog.note(who, "waiter: in acquire(n, token)");
              status = sem.acquire(n, never.token());
              break;
            case slot_round::wait_kind::acquire_for:
              dog.note(who, "waiter: in acquire_for(n, long)");
              status = sem.acquire_for(n, long_wait);
              break;
            case slot_round::wait_kind::acquire_until:
              dog.note(who, "waiter: in acquire_until(n, long)");
              status = sem.acquire_until(n, std::chrono::steady_clock::now() + long_wait);
              break;
            case slot_round::wait_kind::permit:
              dog.note(who, "waiter: in acquire_permit(n)");
              permit = sem.acquire_permit(n);
              break;
          }
          if (pair.waiter_status.load(std::memory_order_relaxed) == 0) {
            pair.waiter_status.store(static_cast<int>(status), std::memory_order_relaxed);
          }
          dog.note(who, "waiter: releasing");
          if (permit) {
            permit.release();
          } else if (status == weft::wait_status::ok) {
            if (plan.waiter_piecemeal) {
              for (std::ptrdiff_t i = 0; i < n; ++i) sem.release(1);
            } else {
              sem.release(n);
            }
          }
        }
        pair.finished.fetch_add(1, std::memory_order_acq_rel);

        if (me == 0) {
          dog.note(who, "checking the round");
          weft_test::spin_until(
              [&] { return pair.finished.load(std::memory_order_acquire) >= 2 * r; });
          const auto stats = sem.stats();
          const auto expected = static_cast<std::uint64_t>(plan.warmups) +
                                (plan.all_at_once || plan.capacity == 1 ? 1 : 2) +
                                static_cast<std::uint64_t>(plan.cycles) + 1;
          const int status = pair.waiter_status.exchange(0, std::memory_order_relaxed);
          ++pair.rounds;
          const bool queued = stats.total_wait > 0ns;
          if (queued) ++pair.queued_rounds;
          // (The holder's cycles may queue too: those rounds do not steer
          // the aim.)
          if (plan.when == slot_round::timing::aimed && plan.cycles == 0) {
            ++pair.aimed_rounds;
            const auto aim = pair.aim_ns.load(std::memory_order_relaxed);
            if (!queued) {
              pair.aim_ns.store(std::min<std::int64_t>(aim + aim / 8 + 100, 2'000'000),
                                std::memory_order_relaxed);
            } else if (pair.released_late.load(std::memory_order_relaxed)) {
              pair.aim_ns.store(aim - aim / 8, std::memory_order_relaxed);
            } else {
              ++pair.hits;
            }
          }
          if (status != 0 || stats.available != plan.capacity || stats.waiters != 0 ||
              stats.acquisitions != expected || stats.timeouts != 0 || stats.cancellations != 0) {
            if (pair.failures++ == 0) {
              pair.first_failure =
                  "round " + std::to_string(r) + ": waiter's status " + std::to_string(status) +
                  " (0 ok, -1 the holder could not take its permits), available " +
                  std::to_string(stats.available) + " of " + std::to_string(plan.capacity) +
                  ", waiters " + std::to_string(stats.waiters) + ", acquisitions " +
                  std::to_string(stats.acquisitions) + " (expected " + std::to_string(expected) +
                  "), timeouts " + std::to_string(stats.timeouts) + ", weight " +
                  std::to_string(plan.weight) + ", timing " +
                  std::to_string(static_cast<int>(plan.when)) + ", wait kind " +
                  std::to_string(static_cast<int>(plan.how)) + ", all at once " +
                  std::to_string(plan.all_at_once) + ", cycles " + std::to_string(plan.cycles) +
                  ", inherit " + std::to_string(plan.inherit);
            }
          }
          pair.sem.reset();
        }
      }
    };

    std::vector<std::thread> threads;
    for (std::size_t p = 0; p < pairs.size(); ++p) {
      threads.emplace_back(play, p, 0);
      threads.emplace_back(play, p, 1);
    }
    for (auto& t : threads) t.join();

    std::uint64_t rounds = 0;
    std::uint64_t queued = 0;
    std::uint64_t aimed = 0;
    std::uint64_t hits = 0;
    for (const auto& pair : pairs) {
      CHECK_MESSAGE(pair.failures == 0,
                    pair.failures << " bad rounds; the first: " << pair.first_failure);
      CHECK(pair.rounds > 0);
      rounds += pair.rounds;
      queued += pair.queued_rounds;
      aimed += pair.aimed_rounds;
      hits += pair.hits;
    }
    // Not a check (it depends on the scheduler): how often an aimed release
    // came while the waiter was queueing.
    MESSAGE("pairs " << pairs_count << ": " << rounds << " rounds, a thread queued in " << queued
                     << "; " << hits << " of " << aimed
                     << " aimed releases came while it was queueing");
  }
}

TEST_CASE(
    "semaphore release slot: permits taken on one thread and released on another are conserved" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x5107c0u};

  for (const int threads_count : thread_counts()) {
    CAPTURE(threads_count);
    const auto until = std::chrono::steady_clock::now() + run_budget();
    std::uint64_t epochs = 0;
    std::uint64_t total_ok = 0;
    std::uint64_t total_migrated = 0;
    std::uint64_t total_timeouts = 0;

    // Epochs, each with a fresh semaphore and fresh threads: a semaphore's
    // slot turns off the first time a thread queues while another's tag is
    // in it, so many short lives see the slot at work, and turning off, many
    // times.
    for (std::uint64_t epoch = 0; epoch < iteration_cap(1'000); ++epoch) {
      const auto now = std::chrono::steady_clock::now();
      if (now >= until) break;
      const auto epoch_until = std::min(until, now + run_budget() / 32);
      // Mostly a small capacity, which every thread contends for; one epoch
      // in three a calm one, with permits for every thread and small
      // weights, where threads seldom queue and the slot stays on longer.
      const bool calm = setup() % 3 == 0;
      const std::ptrdiff_t capacity =
          calm ? 2 * threads_count + std::uniform_int_distribution<std::ptrdiff_t>{0, 8}(setup)
               : std::uniform_int_distribution<std::ptrdiff_t>{1, 8}(setup);
      const std::ptrdiff_t max_weight = calm ? 2 : capacity;
      CAPTURE(epoch);
      CAPTURE(capacity);

      weft::semaphore sem{capacity};
      // Permits acquired on one thread, waiting for any thread to release
      // them: {count, the thread that acquired them}.
      std::mutex handed_mutex;
      std::vector<std::pair<std::ptrdiff_t, int>> handed;
      std::atomic<std::ptrdiff_t> held{0};  // acquired and not yet released, handed ones included
      std::atomic<std::ptrdiff_t> most_held{0};
      std::atomic<std::uint64_t> over_capacity{0};
      std::atomic<std::uint64_t> acquired{0};  // successful acquires, of any weight
      std::atomic<std::uint64_t> timeouts{0};
      std::atomic<std::uint64_t> migrated{0};  // handed permits released by another thread
      std::atomic<std::uint64_t> bad_status{0};
      std::atomic<int> workers_done{0};
      weft::cancel_source never;

      weft_test::watchdog dog(
          "stress_semaphore", "release slot: permit migration",
          static_cast<std::size_t>(threads_count), [&] {
            std::fprintf(stderr,
                         "  epoch %llu, capacity %td: available %td, waiters %zu, held %td\n",
                         static_cast<unsigned long long>(epoch), capacity, sem.available(),
                         sem.waiters(), held.load());
          });

      const auto note_acquired = [&](std::ptrdiff_t n) {
        acquired.fetch_add(1, std::memory_order_relaxed);
        const auto now_held = held.fetch_add(n, std::memory_order_acq_rel) + n;
        if (now_held > capacity) over_capacity.fetch_add(1, std::memory_order_relaxed);
        auto most = most_held.load(std::memory_order_relaxed);
        while (now_held > most &&
               !most_held.compare_exchange_weak(most, now_held, std::memory_order_relaxed)) {
        }
      };
      const auto give_back = [&](std::mt19937_64& rng, std::ptrdiff_t n) {
        held.fetch_sub(n, std::memory_order_acq_rel);
        if (n > 1 && rng() % 2 == 0) {
          for (std::ptrdiff_t i = 0; i < n; ++i) sem.release(1);
        } else {
          sem.release(n);
        }
      };
      const auto hand_over = [&](std::ptrdiff_t n, int me) {
        std::lock_guard lock(handed_mutex);
        handed.emplace_back(n, me);
      };
      // Releases one handed batch, if there is one.
      const auto release_handed = [&](std::mt19937_64& rng, int me) {
        std::pair<std::ptrdiff_t, int> batch{0, me};
        {
          std::lock_guard lock(handed_mutex);
          if (handed.empty()) return false;
          const auto pick = static_cast<std::size_t>(rng() % handed.size());
          batch = handed[pick];
          handed[pick] = handed.back();
          handed.pop_back();
        }
        if (batch.second != me) migrated.fetch_add(1, std::memory_order_relaxed);
        give_back(rng, batch.first);
        return true;
      };

      // Thread 0 never waits without a deadline and releases handed permits
      // until every other thread is done, so a thread blocked in acquire
      // behind handed permits always gets them in the end. The others hold
      // nothing while they wait.
      const auto worker = [&](int me) {
        std::mt19937_64 rng{seed + 0x5107u + epoch * 1'000u +
                            static_cast<std::uint64_t>(threads_count) * 1'000'000u +
                            static_cast<std::uint64_t>(me)};
        const auto who = static_cast<std::size_t>(me);
        const bool drainer = me == 0;
        const auto delay = [&] {
          return std::chrono::microseconds{std::uniform_int_distribution<int>{5, 200}(rng)};
        };
        // Waits for n permits in one of the ways that cannot fail (or, on
        // thread 0, with a deadline). Returns whether it holds them.
        const auto wait_acquire = [&](std::ptrdiff_t n) {
          // Handed permits do not sit idle while this thread waits.
          if (rng() % 4 != 0) release_handed(rng, me);
          weft::wait_status status = weft::wait_status::ok;
          if (drainer) {
            dog.note(who, "acquire_for(n, short)");
            status = sem.acquire_for(n, delay());
          } else {
            switch (rng() % 4) {
              case 0:
                dog.note(who, "acquire(n)");
                sem.acquire(n);
                break;
              case 1:
                dog.note(who, "acquire(n, token)");
                status = sem.acquire(n, never.token());
                break;
              case 2:
                dog.note(who, "acquire_for(n, short)");
                status = sem.acquire_for(n, delay());
                break;
              default: {
                dog.note(who, "acquire_permit(n) then detach");
                auto permit = sem.acquire_permit(n);
                if (permit.detach() != n) bad_status.fetch_add(1, std::memory_order_relaxed);
                break;
              }
            }
          }
          if (status == weft::wait_status::timeout) {
            timeouts.fetch_add(1, std::memory_order_relaxed);
            return false;
          }
          if (status != weft::wait_status::ok) {
            bad_status.fetch_add(1, std::memory_order_relaxed);
            return false;
          }
          note_acquired(n);
          return true;
        };

        for (std::uint64_t iteration = 0; iteration < iteration_cap(100'000); ++iteration) {
          // A few operations at least, however late this thread started.
          if (iteration > 0 && (iteration & 7) == 0 &&
              std::chrono::steady_clock::now() >= epoch_until) {
            break;
          }
          if (rng() % 512 == 0) {
            // Two short-lived threads, one after the other: the first takes
            // a permit, perhaps through the slot, hands it over and ends,
            // perhaps with its tag left in the slot; its thread record (and
            // so its tag) goes to the next thread that starts, most likely
            // the second, which takes a permit and releases it itself: into
            // the slot, if the tag there is the one it inherited. This
            // thread waits for each, holding nothing.
            dog.note(who, "running short-lived threads");
            for (const bool hand : {true, false}) {
              std::thread([&] {
                if (!hand) {
                  // A slot of its own gives this thread a thread record
                  // now, rather than at its first acquire through `sem`'s.
                  weft::semaphore own{1};
                  own.acquire(1);
                  own.release(1);
                }
                if (!wait_acquire(1)) return;
                if (hand) {
                  hand_over(1, me);
                } else {
                  give_back(rng, 1);
                }
              }).join();
            }
            continue;
          }
          const std::ptrdiff_t n =
              std::uniform_int_distribution<std::ptrdiff_t>{1, max_weight}(rng);
          switch (rng() % 10) {
            case 0:
            case 1:
            case 2:
              // One permit, released here: the slot's own pair.
              if (wait_acquire(1)) give_back(rng, 1);
              break;
            case 3:
            case 4:
              // One permit, for another thread to release.
              if (wait_acquire(1)) hand_over(1, me);
              break;
            case 5:
            case 6:
              dog.note(who, "releasing a handed permit");
              release_handed(rng, me);
              break;
            case 7:
              // Weighted: drains the slot into the count when the count alone is short.
              if (wait_acquire(n)) {
                if (rng() % 2 == 0) {
                  give_back(rng, n);
                } else {
                  hand_over(n, me);
                }
              }
              break;
            case 8: {
              dog.note(who, "try_acquire(n)");
              const auto m = rng() % 2 == 0 ? 1 : n;
              if (sem.try_acquire(m)) {
                note_acquired(m);
                if (rng() % 2 == 0) {
                  give_back(rng, m);
                } else {
                  hand_over(m, me);
                }
              }
              break;
            }
            default: {
              if (rng() % 4 != 0) release_handed(rng, me);
              dog.note(who, "acquire_for(n, short)");
              const auto m = rng() % 2 == 0 ? 1 : n;
              const auto status = sem.acquire_for(m, delay());
              if (status == weft::wait_status::ok) {
                note_acquired(m);
                give_back(rng, m);
              } else if (status == weft::wait_status::timeout) {
                timeouts.fetch_add(1, std::memory_order_relaxed);
              } else {
                bad_status.fetch_add(1, std::memory_order_relaxed);
              }
              break;
            }
          }
          if (drainer && rng() % 2 == 0) release_handed(rng, me);
        }
        if (drainer) {
          dog.note(who, "draining until the others are done");
          while (workers_done.load(std::memory_order_acquire) < threads_count - 1) {
            if (!release_handed(rng, me)) std::this_thread::yield();
          }
        } else {
          workers_done.fetch_add(1, std::memory_order_acq_rel);
        }
        dog.note(who, "done");
      };

      std::vector<std::thread> threads;
      for (int t = 0; t < threads_count; ++t) threads.emplace_back(worker, t);
      for (auto& t : threads) t.join();

      // What is still handed over goes back now.
      std::mt19937_64 rng{seed ^ epoch};
      while (release_handed(rng, -1)) {
      }

      const auto stats = sem.stats();
      CHECK(bad_status.load() == 0);
      CHECK(over_capacity.load() == 0);
      CHECK(most_held.load() <= capacity);
      CHECK(held.load() == 0);
      CHECK(stats.available == capacity);
      CHECK(sem.available() == capacity);
      CHECK(stats.waiters == 0);
      CHECK(sem.waiters() == 0);
      CHECK(stats.acquisitions == acquired.load());
      CHECK(stats.timeouts == timeouts.load());
      CHECK(stats.cancellations == 0);
      // Every permit came back, so the whole capacity can be taken at once.
      CHECK(sem.try_acquire(capacity));
      sem.release(capacity);

      ++epochs;
      total_ok += acquired.load();
      total_migrated += migrated.load();
      total_timeouts += timeouts.load();
    }
    CHECK(epochs > 0);
    CHECK(total_ok > 0);
    MESSAGE("threads " << threads_count << ": " << epochs << " epochs, " << total_ok
                       << " acquisitions, " << total_migrated
                       << " batches released by another thread, " << total_timeouts << " timeouts");
  }
}
