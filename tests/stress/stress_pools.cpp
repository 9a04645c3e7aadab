// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for weft::resource_pool and weft::object_pool.
// Every random choice comes from weft_test::seed(), which main.cpp prints;
// replay a failure with
//
//   ./weft_stress --seed N --test-case="*pool*"
//
// (the interleaving itself is up to the scheduler, so a replay repeats the
// choices, not necessarily the failure). --scale N makes each scenario run N
// times longer.
//
// The resources and objects check themselves: each carries a flag that its
// user sets when it gets it (finding it already set means two users hold it
// at once), a "dirty" mark that only the pool's reset clears, and counts of
// how many were made and destroyed, so a leak, a double close or a resource
// handed out twice shows as a wrong count.
//
// Timeouts and the pace of the chaos threads are real steady_clock deadlines
// of 50 us to 2 ms: they make the interleavings, and no assertion depends on
// how long anything took.
#include <weft/cancel.hpp>
#include <weft/object_pool.hpp>
#include <weft/resource_pool.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::chaos_sources;

using weft_test::iteration_cap;
using weft_test::mix;
using weft_test::run_budget;
using weft_test::thread_counts;

using steady = std::chrono::steady_clock;

// A random choice made inside a callback the pool runs (open, validate,
// reset), where no thread's generator is at hand: the n-th draw of a
// sequence that depends only on the seed.
class draws {
 public:
  explicit draws(std::uint64_t seed) : seed_(seed) {}
  // True once in `odds` draws on average; never when odds is 0.
  bool one_in(std::uint64_t odds) {
    const auto n = next_.fetch_add(1, std::memory_order_relaxed);
    return odds != 0 && mix(seed_ ^ mix(n)) % odds == 0;
  }

 private:
  const std::uint64_t seed_;
  std::atomic<std::uint64_t> next_{0};
};

// Yields until a deadline of 50 us to 2 ms passes (or `stop`): the pace of a
// chaos thread, without sleeping.
template <class Rng>
void pause_briefly(Rng& rng, const std::atomic<bool>& stop) {
  const auto until =
      steady::now() + std::chrono::microseconds{std::uniform_int_distribution<int>{50, 2000}(rng)};
  while (!stop.load(std::memory_order_relaxed) && steady::now() < until) std::this_thread::yield();
}

void raise_to(std::atomic<std::uint64_t>& most, std::uint64_t value) {
  auto seen = most.load(std::memory_order_relaxed);
  while (value > seen && !most.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

// ---------------------------------------------------------------------------
// resource_pool

// What a resource knows about itself. It lives on the heap, so its address
// stays put while the pool moves the resource around.
struct resource_state {
  explicit resource_state(std::uint64_t serial) : id(serial) {}
  const std::uint64_t id;
  std::atomic<bool> leased{false};  // set by the lease's user while it holds it
  std::atomic<bool> closed{false};
  bool dirty = false;  // set by the user, cleared by reset: plain, so TSan checks the hand-offs
};

struct connection {
  std::unique_ptr<resource_state> state;
};

using connection_pool = weft::resource_pool<connection>;

// The far side of the fake connections: counts opens and closes, fails
// opens, validations and resets at random, and counts anything the pool
// must never do.
class fake_server {
 public:
  struct odds {
    std::uint64_t open_failure = 0;  // one in this many opens throws (0: never)
    std::uint64_t validation_failure = 0;
    std::uint64_t reset_refusal = 0;
  };

  fake_server(std::uint64_t seed, odds chances) : draws_(seed), odds_(chances) {}

  // Turns the random failures off (for the checks at the end of a run).
  void stop_failing() { failing_.store(false); }

  connection open() {
    if (failing_.load() && draws_.one_in(odds_.open_failure)) {
      open_failures.fetch_add(1);
      throw std::runtime_error("fake_server: connection refused");
    }
    auto state = std::make_unique<resource_state>(opened.fetch_add(1));
    raise_to(most_live, opened.load() - closed.load());
    return connection{std::move(state)};
  }

  void close(connection& c) {
    if (c.state->closed.exchange(true)) double_closes.fetch_add(1);
    if (c.state->leased.load()) closed_while_leased.fetch_add(1);
    closed.fetch_add(1);
  }

  bool validate(connection& c) {
    // The pool validates an idle resource before it hands it out: nobody may
    // hold it, and it must still be open.
    if (c.state->leased.load() || c.state->closed.load()) bad_validations.fetch_add(1);
    if (failing_.load() && draws_.one_in(odds_.validation_failure)) {
      validation_refusals.fetch_add(1);
      return false;
    }
    return true;
  }

  bool reset(connection& c) {
    // Runs on return: the user has let go, and the pool has not closed it.
    if (c.state->leased.load() || c.state->closed.load()) bad_resets.fetch_add(1);
    c.state->dirty = false;
    if (failing_.load() && draws_.one_in(odds_.reset_refusal)) {
      reset_refusals.fetch_add(1);
      return false;
    }
    return true;
  }

  std::uint64_t live() const { return opened.load() - closed.load(); }

  std::atomic<std::uint64_t> opened{0};
  std::atomic<std::uint64_t> closed{0};
  std::atomic<std::uint64_t> most_live{0};
  std::atomic<std::uint64_t> open_failures{0};
  std::atomic<std::uint64_t> validation_refusals{0};
  std::atomic<std::uint64_t> reset_refusals{0};
  std::atomic<std::uint64_t> double_closes{0};
  std::atomic<std::uint64_t> closed_while_leased{0};
  std::atomic<std::uint64_t> bad_validations{0};
  std::atomic<std::uint64_t> bad_resets{0};

 private:
  draws draws_;
  const odds odds_;
  std::atomic<bool> failing_{true};
};

connection_pool make_connection_pool(fake_server& server,
                                     const weft::resource_pool_options& options) {
  return connection_pool{options, [&server] { return server.open(); },
                         [&server](connection& c) { server.close(c); },
                         [&server](connection& c) { return server.validate(c); },
                         [&server](connection& c) { return server.reset(c); }};
}

// The leases out, and the bound the header promises for them. With max_open
// b set (and not changed since), at most b leases are out, except that
// leases granted before the change may still be out: a lowered limit takes
// their slots as they come back. So at every moment
//
//   leases out <= max(b, leases out that were granted before b was set).
//
// (In the pool's terms: out = b + debt - free slots, and the debt a lowering
// leaves is at most the older leases out above b, falling as any lease comes
// back.) A worker reads the epoch before it starts to acquire; a lease begun
// in the current epoch was certainly granted after b was set, and any other
// counts as older, which only loosens the bound. Leases are entered after
// the acquire returns and left before they go back, so the counts here never
// exceed the pool's. The ledger hears of a lowered limit after the pool has
// it, and of a raised one before, so its bound is never the tighter one.
class lease_ledger {
 public:
  explicit lease_ledger(std::size_t max_open) : limit_(max_open) {}

  std::uint64_t epoch() {
    std::lock_guard lock(mutex_);
    return epoch_;
  }

  // A lease whose acquire began in `begun` was granted; false if that puts
  // the leases out above the bound.
  bool enter(std::uint64_t begun) {
    std::lock_guard lock(mutex_);
    ++out_;
    if (begun == epoch_) ++fresh_;
    most_out_ = std::max(most_out_, out_);
    return out_ <= std::max<std::uint64_t>(limit_, out_ - fresh_);
  }

  void leave(std::uint64_t begun) {
    std::lock_guard lock(mutex_);
    --out_;
    if (begun == epoch_) --fresh_;
  }

  // After set_max_open(max_open) has returned: every lease out is older now.
  void limit_changed(std::size_t max_open) {
    std::lock_guard lock(mutex_);
    ++epoch_;
    limit_ = max_open;
    fresh_ = 0;
  }

  std::uint64_t most_out() {
    std::lock_guard lock(mutex_);
    return most_out_;
  }

 private:
  std::mutex mutex_;
  std::uint64_t epoch_ = 0;
  std::size_t limit_;
  std::uint64_t out_ = 0;
  std::uint64_t fresh_ = 0;  // leases out begun in this epoch
  std::uint64_t most_out_ = 0;
};

struct lease_tally {
  std::atomic<std::uint64_t> ok{0};
  std::atomic<std::uint64_t> timeouts{0};
  std::atomic<std::uint64_t> cancellations{0};
  std::atomic<std::uint64_t> busy{0};  // try_acquire said no
  std::atomic<std::uint64_t> open_exceptions{0};
  std::atomic<std::uint64_t> discards{0};
  // Contract violations:
  std::atomic<std::uint64_t> double_leases{0};  // a resource leased to two users at once
  std::atomic<std::uint64_t> closed_leases{0};  // a closed resource handed out
  std::atomic<std::uint64_t> dirty_leases{0};   // handed out without reset since its last use
  std::atomic<std::uint64_t> over_limit{0};     // more leases out than max_open allows
  std::atomic<std::uint64_t> bad_statuses{0};   // a lease status the form cannot give
};

// The user's side of one lease: checks what the pool handed over and marks
// the resource as in use.
void take_lease(const connection_pool::lease& lease, lease_tally& tally) {
  auto& state = *lease->state;
  if (state.leased.exchange(true)) tally.double_leases.fetch_add(1);
  if (state.closed.load()) tally.closed_leases.fetch_add(1);
  if (state.dirty) tally.dirty_leases.fetch_add(1);
  state.dirty = true;
  if (lease.status() != weft::wait_status::ok) tally.bad_statuses.fetch_add(1);
}

// Gives a lease back in one of the ways the API offers.
template <class Rng>
void return_lease(connection_pool::lease& lease, std::uint64_t begun, lease_ledger& ledger,
                  lease_tally& tally, Rng& rng) {
  lease->state->leased.store(false);
  ledger.leave(begun);
  switch (rng() % 5) {
    case 0:
      lease.release();
      break;
    case 1:
      tally.discards.fetch_add(1);
      lease.discard();
      break;
    case 2: {
      auto moved = std::move(lease);  // returned by the moved-to lease's destructor
      break;
    }
    case 3:
      lease = connection_pool::lease{};  // assigned over
      break;
    default: {
      auto doomed = std::move(lease);
      doomed.release();
      doomed.release();  // a second release does nothing
      break;
    }
  }
}

// Checks a snapshot read while the pool is busy: the counts of one moment
// agree, none is out of range, and the counters only grow.
struct resource_stats_checker {
  std::size_t most_max_open = 4;
  std::size_t most_waiting = 0;
  weft::resource_pool_stats last{};
  std::uint64_t snapshots = 0;
  std::uint64_t inconsistent = 0;
  std::uint64_t out_of_range = 0;
  std::uint64_t went_back = 0;

  void check(const weft::resource_pool_stats& s) {
    ++snapshots;
    // Read under the pool's lock: open is exactly in use + idle.
    if (s.open != s.in_use + s.idle) ++inconsistent;
    if (s.max_open < 1 || s.max_open > most_max_open || s.open > most_max_open ||
        s.in_use > most_max_open || s.idle > most_max_open || s.waiting > most_waiting ||
        s.wait_duration < 0ns) {
      ++out_of_range;
    }
    if (s.wait_count < last.wait_count || s.wait_duration < last.wait_duration ||
        s.max_idle_closed < last.max_idle_closed ||
        s.max_idle_time_closed < last.max_idle_time_closed ||
        s.max_lifetime_closed < last.max_lifetime_closed || s.open_failures < last.open_failures ||
        s.validation_failures < last.validation_failures) {
      ++went_back;
    }
    last = s;
  }
};

}  // namespace

TEST_CASE(
    "resource_pool never leases a resource twice, keeps to max_open and loses nothing under random "
    "acquires, cancellations, deadlines, failures and limit changes" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x7e5011ceu};

  for (const int threads_count : thread_counts()) {
    const auto initial_max_open = std::uniform_int_distribution<std::size_t>{1, 4}(setup);
    weft::resource_pool_options options{
        .max_open = initial_max_open,
        .max_idle = std::uniform_int_distribution<std::size_t>{0, 4}(setup),
        .name = "stress"};
    // A third of the runs expire resources by lifetime, a third by idle
    // time, a third never.
    switch (setup() % 3) {
      case 0:
        options.max_lifetime =
            std::chrono::microseconds{std::uniform_int_distribution<int>{200, 2000}(setup)};
        break;
      case 1:
        options.max_idle_time =
            std::chrono::microseconds{std::uniform_int_distribution<int>{100, 1000}(setup)};
        break;
      default:
        break;
    }
    // Odds of one in 16, 32 or 48 (or never) that an open fails; one in 8 or
    // 16 (or never) that a validation or a reset says no.
    std::uniform_int_distribution<std::uint64_t> some{0, 3};
    std::uniform_int_distribution<std::uint64_t> few{0, 2};
    const fake_server::odds chances{.open_failure = 16 * some(setup),
                                    .validation_failure = 8 * few(setup),
                                    .reset_refusal = 8 * few(setup)};
    CAPTURE(threads_count);
    CAPTURE(options.max_open);
    CAPTURE(options.max_idle);
    CAPTURE(options.max_lifetime.count());
    CAPTURE(options.max_idle_time.count());
    CAPTURE(chances.open_failure);
    CAPTURE(chances.validation_failure);
    CAPTURE(chances.reset_refusal);

    fake_server server{seed + static_cast<std::uint64_t>(threads_count), chances};
    lease_tally tally;
    resource_stats_checker stats_checker;
    stats_checker.most_waiting = static_cast<std::size_t>(threads_count);
    std::uint64_t limit_changes = 0;
    std::size_t final_max_open = 0;
    std::size_t free_at_end = 0;
    weft::resource_pool_stats quiet{};
    {
      auto pool = make_connection_pool(server, options);
      lease_ledger ledger{initial_max_open};
      chaos_sources chaos{8};
      std::atomic<bool> stop{false};
      const auto until = steady::now() + run_budget();

      const auto worker = [&](std::uint64_t thread_seed) {
        std::mt19937_64 rng{thread_seed};
        const auto delay = [&] {
          return std::chrono::microseconds{std::uniform_int_distribution<int>{50, 2000}(rng)};
        };
        for (std::uint64_t iteration = 0; iteration < iteration_cap(200'000); ++iteration) {
          if ((iteration & 15) == 0 && steady::now() >= until) break;
          const auto begun = ledger.epoch();
          connection_pool::lease lease;
          // Which failures this form of acquire may report.
          bool may_time_out = false;
          bool may_be_cancelled = false;
          bool pre_cancelled = false;
          bool tried = false;  // try_acquire: a timeout means busy
          try {
            switch (rng() % 8) {
              case 0:
                lease = pool.acquire();
                break;
              case 1:
              case 2:
                lease = pool.try_acquire();
                may_time_out = tried = true;
                break;
              case 3:
                lease = pool.acquire(chaos.token(rng()));
                may_be_cancelled = true;
                break;
              case 4: {
                // The chaos token's child with a real deadline of its own.
                auto request = weft::with_timeout(chaos.token(rng()), delay());
                lease = pool.acquire(request.token());
                may_time_out = may_be_cancelled = true;
                break;
              }
              case 5:
                lease = pool.acquire_for(delay());
                may_time_out = true;
                break;
              case 6:
                lease = pool.acquire_until(steady::now() + delay());
                may_time_out = true;
                break;
              default: {
                if (rng() % 4 == 0) {
                  // A token cancelled before the call acquires nothing,
                  // even with slots free.
                  weft::cancel_source cancelled;
                  cancelled.cancel();
                  lease = pool.acquire(cancelled.token());
                  pre_cancelled = may_be_cancelled = true;
                } else {
                  lease = pool.try_acquire();
                  may_time_out = tried = true;
                }
                break;
              }
            }
          } catch (const std::runtime_error&) {  // open() failed; the slot is free again
            tally.open_exceptions.fetch_add(1);
            continue;
          }
          if (!lease) {
            const auto status = lease.status();
            const bool expected = (status == weft::wait_status::timeout && may_time_out) ||
                                  (status == weft::wait_status::cancelled && may_be_cancelled);
            if (!expected) tally.bad_statuses.fetch_add(1);
            if (status == weft::wait_status::timeout) {
              (tried ? tally.busy : tally.timeouts).fetch_add(1);
            } else {
              tally.cancellations.fetch_add(1);
            }
            continue;
          }
          if (pre_cancelled) tally.bad_statuses.fetch_add(1);
          tally.ok.fetch_add(1);
          if (!ledger.enter(begun)) tally.over_limit.fetch_add(1);
          take_lease(lease, tally);

          // Sometimes a second lease while holding one; only with try, which
          // never waits for a lease (a blocking one could wait for itself).
          if (rng() % 8 == 0) {
            const auto begun_second = ledger.epoch();
            connection_pool::lease second;
            try {
              second = pool.try_acquire();
            } catch (const std::runtime_error&) {
              tally.open_exceptions.fetch_add(1);
            }
            if (second) {
              tally.ok.fetch_add(1);
              if (!ledger.enter(begun_second)) tally.over_limit.fetch_add(1);
              take_lease(second, tally);
              if (second->state.get() == lease->state.get()) tally.double_leases.fetch_add(1);
              return_lease(second, begun_second, ledger, tally, rng);
            }
          }
          for (auto spins = rng() % 4; spins > 0; --spins)
            std::this_thread::yield();  // hold it a little
          return_lease(lease, begun, ledger, tally, rng);
        }
      };

      std::thread chaos_thread([&] {
        std::mt19937_64 rng{seed ^ 0xc4a05u};
        while (!stop.load(std::memory_order_relaxed)) {
          chaos.cancel_and_replace(rng(), rng() % 4 == 0);
          for (std::uint64_t spins = rng() % 32; spins > 0; --spins) std::this_thread::yield();
        }
      });
      // Changes the limits at a random pace, so that each limit is in force
      // long enough for many leases to be checked against it.
      std::thread limits_thread([&] {
        std::mt19937_64 rng{seed ^ 0x11a175u};
        std::size_t in_force = initial_max_open;
        while (!stop.load(std::memory_order_relaxed)) {
          switch (rng() % 4) {
            case 0:
            case 1: {
              const auto max_open = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
              // The ledger's bound may only be looser than the pool's:
              // it learns of a raise before the pool, of a cut after.
              if (max_open > in_force) ledger.limit_changed(max_open);
              pool.set_max_open(max_open);
              if (max_open <= in_force) ledger.limit_changed(max_open);
              in_force = max_open;
              ++limit_changes;
              break;
            }
            case 2:
              pool.set_max_idle(std::uniform_int_distribution<std::size_t>{0, 4}(rng));
              break;
            default:
              (void)pool.close_expired();
              break;
          }
          pause_briefly(rng, stop);
        }
      });
      std::thread stats_thread([&] {
        std::mt19937_64 rng{seed ^ 0x57a75u};
        while (!stop.load(std::memory_order_relaxed)) {
          stats_checker.check(pool.stats());
          for (std::uint64_t spins = rng() % 4; spins > 0; --spins) std::this_thread::yield();
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
      limits_thread.join();
      stats_thread.join();

      // Quiet now: every lease is back.
      quiet = pool.stats();
      CHECK(quiet.in_use == 0);
      CHECK(quiet.waiting == 0);
      CHECK(quiet.open == quiet.idle);
      CHECK(quiet.open == server.live());
      CHECK(quiet.open_failures == server.open_failures.load());
      CHECK(quiet.open_failures == tally.open_exceptions.load());
      CHECK(quiet.validation_failures == server.validation_refusals.load());
      // Every close has a cause the stats count, or is one the user asked
      // for (discard, reset said no), or closes a lease that came back
      // above a lowered max_open (not counted).
      CHECK(server.closed.load() >= quiet.validation_failures + tally.discards.load() +
                                        server.reset_refusals.load() + quiet.max_idle_closed +
                                        quiet.max_idle_time_closed + quiet.max_lifetime_closed);

      // With nothing out, exactly max_open leases can be had at once: no
      // slot was lost, and none was made.
      server.stop_failing();
      std::mt19937_64 rng{seed ^ static_cast<std::uint64_t>(threads_count)};
      final_max_open = std::uniform_int_distribution<std::size_t>{1, 4}(rng);
      pool.set_max_open(final_max_open);
      std::vector<connection_pool::lease> all;
      while (all.size() < 16) {
        auto lease = pool.try_acquire();
        if (!lease) break;
        take_lease(lease, tally);
        all.push_back(std::move(lease));
      }
      free_at_end = all.size();
      CHECK(pool.stats().in_use == free_at_end);
      CHECK(pool.stats().max_open == final_max_open);
      for (auto& lease : all) lease->state->leased.store(false);
      all.clear();
    }
    // The pool is gone: it closed everything it opened, once.
    CHECK(server.live() == 0);
    CHECK(free_at_end == final_max_open);
    CHECK(tally.double_leases.load() == 0);
    CHECK(tally.closed_leases.load() == 0);
    CHECK(tally.dirty_leases.load() == 0);
    CHECK(tally.over_limit.load() == 0);
    CHECK(tally.bad_statuses.load() == 0);
    CHECK(server.double_closes.load() == 0);
    CHECK(server.closed_while_leased.load() == 0);
    CHECK(server.bad_validations.load() == 0);
    CHECK(server.bad_resets.load() == 0);
    CHECK(stats_checker.inconsistent == 0);
    CHECK(stats_checker.out_of_range == 0);
    CHECK(stats_checker.went_back == 0);
    CHECK(tally.ok.load() > 0);
    MESSAGE("threads " << threads_count << ", max_open " << initial_max_open << " ("
                       << limit_changes << " changes): " << tally.ok.load() << " leases, "
                       << tally.timeouts.load() << " timeouts, " << tally.cancellations.load()
                       << " cancellations, " << tally.busy.load() << " busy tries, "
                       << tally.open_exceptions.load() << " failed opens, " << server.opened.load()
                       << " opened, " << stats_checker.snapshots
                       << " stats snapshots, most open at the server " << server.most_live.load());
  }
}

// The narrow case of the scenario above, over and over: max_open is lowered
// while the leases above the new limit come back at the same moment. Once
// all are back, exactly the new max_open leases can be had.
TEST_CASE("resource_pool lowered while its leases come back keeps exactly the new max_open" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x10e4e5u};

  constexpr std::size_t holders = 4;
  // Threads that read stats() in a loop contend for the pool's lock with the
  // returns and with set_max_open, which shifts when each gets in.
  constexpr std::size_t readers = 2;
  fake_server server{seed, {}};
  std::uint64_t rounds = 0;
  std::uint64_t wrong_rounds = 0;
  std::uint64_t first_wrong_round = 0;
  std::size_t first_wrong_limit = 0;
  std::size_t first_wrong_free = 0;
  std::uint64_t double_leases = 0;
  {
    auto pool = make_connection_pool(server, {.max_open = holders, .max_idle = holders});
    std::atomic<bool> reading{false};
    std::atomic<bool> done{false};
    // Per round: holders acquire (phase 1), then return while the main
    // thread lowers the limit (phase 2), then the main thread checks.
    weft_test::round_barrier sync{holders + readers + 1};
    std::vector<std::uint64_t> holder_yields(holders, 0);

    std::vector<std::thread> threads;
    for (std::size_t h = 0; h < holders; ++h) {
      threads.emplace_back([&, h] {
        for (;;) {
          sync.arrive_and_wait();  // round starts (or ends the test)
          if (done.load()) return;
          auto lease = pool.acquire();
          lease->state->leased.store(true);
          sync.arrive_and_wait();  // all held
          for (auto spins = holder_yields[h]; spins > 0; --spins) {
            std::this_thread::yield();
          }
          lease->state->leased.store(false);
          lease.release();
          sync.arrive_and_wait();  // all back
        }
      });
    }
    for (std::size_t r = 0; r < readers; ++r) {
      threads.emplace_back([&] {
        for (;;) {
          sync.arrive_and_wait();
          if (done.load()) return;
          sync.arrive_and_wait();
          while (reading.load()) (void)pool.stats();
          sync.arrive_and_wait();
        }
      });
    }

    const auto until = steady::now() + 2 * run_budget();
    for (; rounds < iteration_cap(200'000) && steady::now() < until; ++rounds) {
      const auto lowered = std::uniform_int_distribution<std::size_t>{1, holders - 1}(rng);
      for (auto& spins : holder_yields) spins = rng() % 4;
      const auto main_yields = rng() % 4;
      reading.store(rng() % 2 == 0);
      sync.arrive_and_wait();  // round starts
      sync.arrive_and_wait();  // all held
      for (auto spins = main_yields; spins > 0; --spins) std::this_thread::yield();
      pool.set_max_open(lowered);
      reading.store(false);
      sync.arrive_and_wait();  // all back

      std::vector<connection_pool::lease> all;
      while (all.size() < 2 * holders) {
        auto lease = pool.try_acquire();
        if (!lease) break;
        if (lease->state->leased.exchange(true)) ++double_leases;
        all.push_back(std::move(lease));
      }
      if (all.size() != lowered) {
        if (wrong_rounds++ == 0) {
          first_wrong_round = rounds;
          first_wrong_limit = lowered;
          first_wrong_free = all.size();
        }
      }
      for (auto& lease : all) lease->state->leased.store(false);
      all.clear();
      pool.set_max_open(holders);
      // What a raise gives back must add up too. The holders acquire without
      // a timeout in the next round, so a pool that lost a slot ends the
      // test here instead of hanging it.
      while (all.size() < 2 * holders) {
        auto lease = pool.try_acquire();
        if (!lease) break;
        all.push_back(std::move(lease));
      }
      const bool raised_right = all.size() == holders;
      all.clear();
      if (!raised_right) {
        ++wrong_rounds;
        ++rounds;
        break;
      }
    }
    done.store(true);
    sync.arrive_and_wait();
    for (auto& t : threads) t.join();
  }
  CAPTURE(rounds);
  CAPTURE(first_wrong_round);
  CAPTURE(first_wrong_limit);
  CAPTURE(first_wrong_free);
  CHECK(wrong_rounds == 0);
  CHECK(double_leases == 0);
  CHECK(server.live() == 0);
  CHECK(server.double_closes.load() == 0);
  MESSAGE(rounds << " rounds, " << wrong_rounds << " ended with the wrong number of free slots");
}

// A raise decides under the pool's lock how many slots it frees and
// releases them after; a lowering in between found none free to take, and
// the raise then put its slots in the semaphore with the lowering's debt
// unpaid: with no lease out and max_open 1, seven could be had.
TEST_CASE("resource_pool raised and lowered at once leaves exactly the limit set last" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x7a15eu};

  weft::resource_pool<int> pool{{.max_open = 1}, [] { return 0; }, [](int&) {}};
  std::atomic<bool> done{false};
  std::array<std::uint64_t, 2> yields{};
  weft_test::round_barrier sync{3};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (;;) {
        sync.arrive_and_wait();  // round starts (or ends the test)
        if (done.load()) return;
        for (auto spins = yields[t]; spins > 0; --spins) std::this_thread::yield();
        pool.set_max_open(t == 0 ? 8 : 1);
        sync.arrive_and_wait();  // both set
      }
    });
  }
  std::uint64_t rounds = 0;
  std::uint64_t wrong_rounds = 0;
  const auto until = steady::now() + run_budget();
  for (; rounds < iteration_cap(100'000) && steady::now() < until; ++rounds) {
    for (auto& spins : yields) spins = rng() % 3;
    sync.arrive_and_wait();
    sync.arrive_and_wait();
    const auto limit = pool.stats().max_open;
    std::vector<weft::resource_pool<int>::lease> all;
    while (all.size() < 16) {
      auto lease = pool.try_acquire();
      if (!lease) break;
      all.push_back(std::move(lease));
    }
    if (all.size() != limit) ++wrong_rounds;
    all.clear();
    pool.set_max_open(1);
  }
  done.store(true);
  sync.arrive_and_wait();
  for (auto& t : threads) t.join();
  CAPTURE(rounds);
  CHECK(rounds > 0);
  CHECK(wrong_rounds == 0);
}

// ---------------------------------------------------------------------------
// object_pool

namespace {

// Counts for one pool's objects.
struct census {
  census() = default;
  // Also remembers, for the first `tracked` objects, whether each is gone.
  explicit census(std::size_t tracked) : gone(tracked) {}

  std::atomic<std::uint64_t> constructed{0};
  std::atomic<std::uint64_t> destroyed{0};
  std::atomic<std::uint64_t> made{0};             // by the pool's factory
  std::atomic<std::uint64_t> adopted_made{0};     // made by the test and put into the pool
  std::atomic<std::uint64_t> deleted_by_test{0};  // released from a handle and deleted
  std::atomic<std::uint64_t> resets{0};
  std::atomic<std::uint64_t> reset_refusals{0};
  std::atomic<std::uint64_t> gets{0};
  std::atomic<std::uint64_t> puts{0};  // handles given back, and adopted objects
  std::atomic<std::uint64_t> releases{0};
  // Contract violations:
  std::atomic<std::uint64_t> double_uses{0};       // an object given to two handles at once
  std::atomic<std::uint64_t> not_reset{0};         // handed out again without a reset
  std::atomic<std::uint64_t> destroyed_in_use{0};  // destroyed while a handle holds it
  std::atomic<std::uint64_t> foreign{0};           // an object of another pool
  std::atomic<std::uint64_t> kept_after_death{
      0};                               // returned after the pool's destruction, not destroyed
  std::vector<std::atomic<bool>> gone;  // by serial
};

struct pooled {
  explicit pooled(census& owner) : counts(&owner), serial(owner.constructed.fetch_add(1)) {}
  pooled(const pooled&) = delete;
  pooled& operator=(const pooled&) = delete;
  ~pooled() {
    if (in_use.load()) counts->destroyed_in_use.fetch_add(1);
    if (serial < counts->gone.size()) counts->gone[serial].store(true);
    counts->destroyed.fetch_add(1);
  }

  census* const counts;
  const std::uint64_t serial;
  std::atomic<bool> in_use{false};
  // Plain, written by whoever holds the object: TSan sees a missing
  // hand-off between two holders as a race.
  bool dirty = false;
  std::size_t size = 0;  // how big the user made it; reset refuses big ones
  std::uint64_t payload = 0;
};

using pooled_pool = weft::object_pool<pooled>;

constexpr std::size_t too_big = 1000;

// The factory and the reset of a pool whose objects `counts` counts.
auto object_factory(census& counts) {
  return [&counts] {
    counts.made.fetch_add(1);
    return std::make_unique<pooled>(counts);
  };
}

auto object_reset(census& counts) {
  return [&counts](pooled& object) {
    counts.resets.fetch_add(1);
    object.dirty = false;
    if (object.size >= too_big) {
      counts.reset_refusals.fetch_add(1);
      return false;
    }
    object.size = 0;
    return true;
  };
}

pooled_pool make_object_pool(census& counts, weft::object_pool_options options) {
  return pooled_pool{object_factory(counts), object_reset(counts), options};
}

// The user's side of a handle just got: nobody else holds the object, and
// the pool reset it since its last use.
template <class Rng>
void take_object(const pooled_pool::handle& handle, census& counts, Rng& rng) {
  pooled& object = *handle;
  if (object.in_use.exchange(true)) counts.double_uses.fetch_add(1);
  if (object.dirty) counts.not_reset.fetch_add(1);
  if (object.counts != &counts) counts.foreign.fetch_add(1);
  object.dirty = true;
  object.size = rng() % 16 == 0 ? too_big : rng() % too_big;
  object.payload = rng();
}

// Gives a handle's object back in one of the ways the API offers.
template <class Rng>
void put_object(pooled_pool& pool, pooled_pool::handle& handle, census& counts, Rng& rng) {
  handle->in_use.store(false);
  counts.puts.fetch_add(1);
  switch (rng() % 4) {
    case 0:
      handle.reset();
      break;
    case 1:
      pool.put(std::move(handle));
      break;
    case 2:
      handle = pooled_pool::handle{};  // assigned over
      break;
    default: {
      auto moved = std::move(handle);  // returned by the moved-to handle's destructor
      break;
    }
  }
}

// Takes a handle's object out of the pool for good, then deletes it or puts
// it back as an adopted object.
template <class Rng>
void release_object(pooled_pool* pool, pooled_pool::handle& handle, census& counts, Rng& rng) {
  auto object = handle.release();
  counts.releases.fetch_add(1);
  if (handle || object == nullptr) counts.foreign.fetch_add(1);
  if (object == nullptr) return;
  object->in_use.store(false);
  if (pool != nullptr && rng() % 2 == 0) {
    counts.puts.fetch_add(1);
    pool->put(std::move(object));
  } else {
    counts.deleted_by_test.fetch_add(1);
    object.reset();
  }
}

// Handles on their way from one thread to another.
class handle_exchange {
 public:
  // False when full (the caller keeps the handle).
  bool offer(pooled_pool::handle& handle) {
    std::lock_guard lock(mutex_);
    if (handles_.size() >= 64) return false;
    handles_.push_back(std::move(handle));
    return true;
  }

  pooled_pool::handle take(std::uint64_t pick) {
    std::lock_guard lock(mutex_);
    if (handles_.empty()) return {};
    const auto index = static_cast<std::ptrdiff_t>(pick % handles_.size());
    auto handle = std::move(handles_[static_cast<std::size_t>(index)]);
    handles_.erase(handles_.begin() + index);
    return handle;
  }

  std::vector<pooled_pool::handle> take_all() {
    std::lock_guard lock(mutex_);
    return std::exchange(handles_, {});
  }

 private:
  std::mutex mutex_;
  std::vector<pooled_pool::handle> handles_;
};

// A handle a thread still holds when it exits, in a thread_local that the
// thread touched before its first call into a pool: so it is destroyed after
// the thread's table of caches, and its object goes back with no cache to
// take it.
struct parting_handle {
  parting_handle() = default;
  parting_handle(const parting_handle&) = delete;
  parting_handle& operator=(const parting_handle&) = delete;
  ~parting_handle() {
    if (!handle) return;
    handle->in_use.store(false);
    counts->puts.fetch_add(1);
    handle.reset();
  }

  pooled_pool::handle handle;
  census* counts = nullptr;
};

thread_local parting_handle parting;

// Checks a snapshot read while the pool is busy: hits + misses == gets,
// nothing wraps or goes back, and the counts stay within what the test did.
struct object_stats_checker {
  std::uint64_t retained_bound = 0;
  std::uint64_t in_flight_bound = 0;  // gets or puts the pool counted and the test not yet
  weft::object_pool_stats last{};
  std::uint64_t snapshots = 0;
  std::uint64_t inconsistent = 0;
  std::uint64_t out_of_range = 0;
  std::uint64_t went_back = 0;
  std::uint64_t disagree = 0;

  void check(const pooled_pool& pool, census& counts) {
    const auto gets_before = counts.gets.load();
    const auto puts_before = counts.puts.load();
    const auto s = pool.stats();
    const auto gets_after = counts.gets.load();
    const auto puts_after = counts.puts.load();
    ++snapshots;
    if (s.hits + s.misses != s.gets || s.misses > s.gets || s.hits > s.gets) ++inconsistent;
    if (s.retained > retained_bound) ++out_of_range;
    if (s.gets < last.gets || s.puts < last.puts || s.misses < last.misses ||
        s.dropped < last.dropped)
      ++went_back;
    // The test counts a get after the pool has (counted before the
    // snapshot means counted in it), and a put before the pool does; each
    // thread has at most one of each in flight.
    if (s.gets < gets_before || s.gets > gets_after + in_flight_bound ||
        s.puts > puts_after + in_flight_bound || s.puts + in_flight_bound < puts_before) {
      ++disagree;
    }
    last = s;
  }
};

}  // namespace

TEST_CASE(
    "object_pool never hands an object to two users, resets before reuse and loses nothing under "
    "random gets, puts, releases, hand-offs, trims and thread exits" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x0b1ec7u};

  for (const int threads_count : thread_counts()) {
    const weft::object_pool_options options{
        .max_cached_per_thread = std::uniform_int_distribution<std::size_t>{1, 8}(setup),
        .max_shared =
            setup() % 4 == 0 ? 0 : std::uniform_int_distribution<std::size_t>{1, 16}(setup),
        .name = "stress"};
    CAPTURE(threads_count);
    CAPTURE(options.max_cached_per_thread);
    CAPTURE(options.max_shared);

    census counts;
    object_stats_checker stats_checker;
    // Live threads with a cache: the lanes' current children, the stats
    // reader (none), and this thread; a snapshot may count a cache's objects
    // twice while they move to the stash.
    stats_checker.retained_bound =
        options.max_shared +
        2 * (static_cast<std::uint64_t>(threads_count) + 1) * options.max_cached_per_thread;
    stats_checker.in_flight_bound = static_cast<std::uint64_t>(threads_count) + 1;
    std::uint64_t children = 0;
    weft::object_pool_stats quiet{};
    weft::object_pool_stats trimmed{};
    std::uint64_t alive_at_quiet = 0;
    {
      auto pool = make_object_pool(counts, options);
      handle_exchange exchange;
      std::atomic<bool> stop{false};
      std::atomic<std::uint64_t> children_started{0};
      const auto until = steady::now() + run_budget();

      // One short-lived thread: a random number of operations, then it
      // exits, taking its cache with it (to the stash) and maybe leaving
      // handles behind in the exchange.
      const auto child = [&](std::uint64_t thread_seed) {
        std::mt19937_64 rng{thread_seed};
        // Before this thread's first call into a pool (see parting_handle).
        parting.counts = &counts;
        std::vector<pooled_pool::handle> held;
        const auto iterations = std::uniform_int_distribution<std::uint64_t>{1, 3000}(rng);
        for (std::uint64_t i = 0; i < iterations; ++i) {
          if ((i & 15) == 0 && steady::now() >= until) break;
          switch (rng() % 16) {
            case 0:
            case 1:
            case 2:
            case 3:
            case 4: {
              auto handle = pool.get();
              counts.gets.fetch_add(1);
              take_object(handle, counts, rng);
              if (held.size() < 8) {
                held.push_back(std::move(handle));
              } else {
                put_object(pool, handle, counts, rng);
              }
              break;
            }
            case 5:
            case 6:
            case 7:
              if (!held.empty()) {
                const auto index = rng() % held.size();
                std::swap(held[index], held.back());
                put_object(pool, held.back(), counts, rng);
                held.pop_back();
              }
              break;
            case 8:
              if (!held.empty()) {
                release_object(&pool, held.back(), counts, rng);
                held.pop_back();
              }
              break;
            case 9:
              if (rng() % 4 == 0) {
                counts.adopted_made.fetch_add(1);
                counts.puts.fetch_add(1);
                pool.put(std::make_unique<pooled>(counts));
              }
              break;
            case 10:
              if (!held.empty() && exchange.offer(held.back())) held.pop_back();
              break;
            case 11:
              if (auto handle = exchange.take(rng())) held.push_back(std::move(handle));
              break;
            case 12:
              if (!held.empty()) {
                // A get and a put in one statement: the old object goes back
                // as the new one arrives.
                held.back()->in_use.store(false);
                counts.puts.fetch_add(1);
                held.back() = pool.get();
                counts.gets.fetch_add(1);
                take_object(held.back(), counts, rng);
              }
              break;
            case 13:
              if (rng() % 8 == 0) pool.trim();
              break;
            default:
              if (!held.empty()) {
                auto& object = *held[rng() % held.size()];
                object.payload += 1;
                if (!object.in_use.load()) counts.double_uses.fetch_add(1);
              }
              break;
          }
        }
        // Exits holding nothing, or leaves handles for the other threads, or
        // one to come back after this thread's caches are gone.
        if (!held.empty() && rng() % 4 == 0) {
          parting.handle = std::move(held.back());
          held.pop_back();
        }
        for (auto& handle : held) {
          if (rng() % 2 == 0 && exchange.offer(handle)) continue;
          put_object(pool, handle, counts, rng);
        }
      };

      std::vector<std::thread> lanes;
      for (int t = 0; t < threads_count; ++t) {
        lanes.emplace_back([&, t] {
          for (std::uint64_t generation = 0;
               generation < iteration_cap(200'000) && steady::now() < until; ++generation) {
            children_started.fetch_add(1);
            std::thread{child, seed + static_cast<std::uint64_t>(threads_count) * 1'000'000'000u +
                                   static_cast<std::uint64_t>(t) * 1'000'000u + generation}
                .join();
          }
        });
      }
      std::thread stats_thread([&] {
        std::mt19937_64 rng{seed ^ 0x57a75u};
        while (!stop.load(std::memory_order_relaxed)) {
          stats_checker.check(pool, counts);
          for (std::uint64_t spins = rng() % 4; spins > 0; --spins) std::this_thread::yield();
        }
      });
      for (auto& lane : lanes) lane.join();
      stop.store(true);
      stats_thread.join();
      children = children_started.load();

      // This thread gives back what the exchange still holds (into a cache
      // of its own).
      {
        std::mt19937_64 rng{seed ^ 0xe7c4a2u};
        auto left = exchange.take_all();
        for (auto& handle : left) put_object(pool, handle, counts, rng);
      }

      // Quiet now: every other thread has exited, every handle is back.
      quiet = pool.stats();
      alive_at_quiet = counts.constructed.load() - counts.destroyed.load();
      pool.trim();  // this thread's cache and the stash: all there is
      trimmed = pool.stats();
    }
    CHECK(quiet.gets == counts.gets.load());
    CHECK(quiet.puts == counts.puts.load());
    CHECK(quiet.hits + quiet.misses == quiet.gets);
    CHECK(quiet.misses == counts.made.load());
    CHECK(quiet.retained == alive_at_quiet);
    // Every object the pool destroyed was counted as dropped.
    CHECK(quiet.dropped + counts.deleted_by_test.load() + alive_at_quiet ==
          counts.constructed.load());
    CHECK(trimmed.retained == 0);
    CHECK(trimmed.dropped == quiet.dropped + quiet.retained);
    CHECK(counts.constructed.load() == counts.made.load() + counts.adopted_made.load());
    CHECK(counts.constructed.load() == counts.destroyed.load());
    CHECK(counts.resets.load() == counts.puts.load());
    CHECK(counts.double_uses.load() == 0);
    CHECK(counts.not_reset.load() == 0);
    CHECK(counts.destroyed_in_use.load() == 0);
    CHECK(counts.foreign.load() == 0);
    CHECK(stats_checker.inconsistent == 0);
    CHECK(stats_checker.out_of_range == 0);
    CHECK(stats_checker.went_back == 0);
    CHECK(stats_checker.disagree == 0);
    MESSAGE("threads " << threads_count << ", cache " << options.max_cached_per_thread << ", stash "
                       << options.max_shared << ": " << children << " threads, " << quiet.gets
                       << " gets (" << quiet.hits << " hits), " << quiet.puts << " puts, "
                       << counts.releases.load() << " releases, " << counts.reset_refusals.load()
                       << " refused by reset, " << stats_checker.snapshots << " stats snapshots");
  }
}

// The pool goes away while handles are out, some of them on their way
// between threads, and while other threads still have caches of it: the
// handles come back, are released, or cross threads during the destruction;
// and once it is over, every handle of the dead pool destroys its object as
// it comes back.
TEST_CASE(
    "object_pool destroyed while handles are out and other threads cache its objects leaks, keeps "
    "and frees nothing twice" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0xdead9001u};

  census counts{std::size_t{1} << 22};  // the doomed pools' objects, over all rounds
  census bystander;                     // a pool that lives through each round
  std::uint64_t rounds = 0;
  std::uint64_t late_returns = 0;
  const auto until = steady::now() + 2 * run_budget();
  for (; rounds < iteration_cap(200'000) / 100 && steady::now() < until &&
         counts.constructed.load() < counts.gone.size() / 2;
       ++rounds) {
    const int workers = std::uniform_int_distribution<int>{2, 6}(setup);
    const weft::object_pool_options options{
        .max_cached_per_thread = std::uniform_int_distribution<std::size_t>{1, 8}(setup),
        .max_shared =
            setup() % 4 == 0 ? 0 : std::uniform_int_distribution<std::size_t>{1, 16}(setup)};
    const std::uint64_t round_seed = seed + rounds * 100;
    CAPTURE(rounds);
    CAPTURE(workers);

    auto other = make_object_pool(bystander, {.max_cached_per_thread = 4, .max_shared = 8});
    std::optional<pooled_pool> doomed;
    doomed.emplace(object_factory(counts), object_reset(counts), options);
    handle_exchange exchange;
    std::latch ready{workers + 1};
    std::latch destroyed{1};
    std::atomic<std::uint64_t> late{0};

    // A handle of the dead pool comes back: its object must be destroyed
    // now, whatever this thread's cache of the pool looks like.
    const auto return_late = [&](pooled_pool::handle& handle) {
      const auto serial = handle->serial;
      handle->in_use.store(false);
      counts.puts.fetch_add(1);
      handle.reset();
      late.fetch_add(1);
      if (serial < counts.gone.size() && !counts.gone[serial].load())
        counts.kept_after_death.fetch_add(1);
    };

    const auto worker = [&](std::uint64_t thread_seed) {
      std::mt19937_64 rng{thread_seed};
      std::vector<pooled_pool::handle> held;
      // Before: use the pool, so this thread has a cache of it and handles.
      // A third of the threads do not: their first contact with the pool is
      // a handle from another thread coming back during the destruction.
      const bool receiver = rng() % 3 == 0;
      for (auto n = receiver ? 0 : rng() % 200; n > 0; --n) {
        switch (rng() % 4) {
          case 0:
          case 1: {
            auto handle = doomed->get();
            counts.gets.fetch_add(1);
            take_object(handle, counts, rng);
            held.push_back(std::move(handle));
            break;
          }
          case 2:
            if (!held.empty()) {
              put_object(*doomed, held.back(), counts, rng);
              held.pop_back();
            }
            break;
          default:
            if (!held.empty() && exchange.offer(held.back())) held.pop_back();
            break;
        }
      }
      while (held.size() > 4) {
        put_object(*doomed, held.back(), counts, rng);
        held.pop_back();
      }
      ready.arrive_and_wait();
      // During the destruction: only the handles, and another pool (calling
      // into any pool frees this thread's caches of dead ones).
      for (auto n = rng() % 8; n > 0; --n) {
        switch (rng() % 5) {
          case 0:
            if (!held.empty()) {
              held.back()->in_use.store(false);
              counts.puts.fetch_add(1);
              held.pop_back();  // back to a pool that may be gone
            }
            break;
          case 1:
            if (!held.empty()) {
              release_object(nullptr, held.back(), counts, rng);
              held.pop_back();
            }
            break;
          case 2:
            if (auto handle = exchange.take(rng())) {
              handle->in_use.store(false);
              counts.puts.fetch_add(1);
            }
            break;
          case 3: {
            auto handle = other.get();
            bystander.gets.fetch_add(1);
            take_object(handle, bystander, rng);
            put_object(other, handle, bystander, rng);
            break;
          }
          default:
            for (auto spins = rng() % 4; spins > 0; --spins) std::this_thread::yield();
            break;
        }
      }
      destroyed.wait();
      // After it.
      while (!held.empty() || rng() % 4 != 0) {
        switch (rng() % 4) {
          case 0:
            if (!held.empty()) {
              return_late(held.back());
              held.pop_back();
            }
            break;
          case 1:
            if (!held.empty()) {
              release_object(nullptr, held.back(), counts, rng);
              held.pop_back();
            }
            break;
          case 2:
            if (auto handle = exchange.take(rng())) return_late(handle);
            break;
          default: {
            auto handle = other.get();
            bystander.gets.fetch_add(1);
            take_object(handle, bystander, rng);
            put_object(other, handle, bystander, rng);
            break;
          }
        }
      }
    };

    std::vector<std::thread> threads;
    for (int t = 0; t < workers; ++t)
      threads.emplace_back(worker, round_seed + static_cast<std::uint64_t>(t));
    // This thread holds handles and a cache too.
    std::mt19937_64 rng{round_seed + 99};
    std::vector<pooled_pool::handle> mine;
    for (auto n = rng() % 8; n > 0; --n) {
      auto handle = doomed->get();
      counts.gets.fetch_add(1);
      take_object(handle, counts, rng);
      if (rng() % 2 == 0) {
        put_object(*doomed, handle, counts, rng);  // into this thread's cache
      } else {
        mine.push_back(std::move(handle));
      }
    }
    ready.arrive_and_wait();
    for (auto spins = rng() % 8; spins > 0; --spins) std::this_thread::yield();
    doomed.reset();
    destroyed.count_down();
    for (auto& handle : mine) return_late(handle);  // on the destroying thread
    mine.clear();
    for (auto& t : threads) t.join();
    for (auto& handle : exchange.take_all()) return_late(handle);
    late_returns += late.load();
    // Every object of the doomed pool is gone now: its handles came back,
    // and the threads that cached its objects have exited.
    REQUIRE(counts.constructed.load() == counts.destroyed.load());
  }
  CHECK(counts.kept_after_death.load() == 0);
  CHECK(counts.double_uses.load() == 0);
  CHECK(counts.not_reset.load() == 0);
  CHECK(counts.destroyed_in_use.load() == 0);
  CHECK(counts.foreign.load() == 0);
  CHECK(bystander.double_uses.load() == 0);
  CHECK(bystander.not_reset.load() == 0);
  CHECK(bystander.destroyed_in_use.load() == 0);
  CHECK(bystander.constructed.load() == bystander.destroyed.load());
  MESSAGE(rounds << " rounds, " << counts.constructed.load() << " objects, " << counts.gets.load()
                 << " gets, " << late_returns
                 << " handles returned after their pool's destruction");
}
