// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for weft's Boost.Asio layer (weft/asio/*.hpp,
// detail/asio_waiter.hpp). Every random choice comes from weft_test::seed();
// replay a failure with
//
//   ./weft_stress --seed N --test-case="asio*"
//
// (the interleaving is the scheduler's, so a replay repeats the choices, not
// necessarily the failure). --scale N runs each scenario N times longer.
//
// What it hunts, and the invariants each case checks:
//  - async_acquire on a semaphore (random weights) with callbacks, deferred,
//    use_future and use_awaitable coroutines, cancelled through per-operation
//    slots (emitted on the operation's strand, as Asio requires) while plain
//    threads release, acquire with tokens and deadlines: every handler runs
//    exactly once with (ok, permit of n) or (cancelled, empty permit); never
//    more than the capacity held; at the end available == capacity, nobody
//    queued, and the stats count every grant, cancellation and timeout.
//  - async_acquire on a resource_pool, likewise, with open() failing now and
//    then: at most max_open leases out, every handler once, open - closed
//    == idle at the end, every resource closed when the pool goes.
//  - async_send / async_recv on buffered and rendezvous channels, cancelled
//    through slots, racing close() and blocking threads on both sides: every
//    value whose send reported ok is received exactly once, no value whose
//    send failed is received, nothing is left after every receiver saw
//    `closed`, every item destroyed at the end.
//  - async_wait on a wait_group and on a cancel_token, cancelled through slots
//    while done() / cancel() race them: every handler once, `ok` only after
//    the event; async_wait(task_group) over coroutines added with
//    weft::co_spawn, cancelled through its slot and re-issued, racing
//    group.cancel() and failures: exactly one final outcome, consistent with
//    group.wait(), every coroutine frame destroyed.
//  - Shutdown with operations pending: an io_context stopped and destroyed
//    (or destroyed unrun) while async waits sit in a semaphore, a channel, a
//    wait_group and a cancel token, then those objects used and destroyed;
//    and the reverse, a semaphore destroyed with async waits queued (its
//    header allows it): no handler runs twice, every handler is destroyed,
//    no permit is lost, no item leaks (LeakSanitizer), no use after free.
//  - The pool executor while the pool shuts down: boost::asio::post and
//    co_spawn onto pool.executor(), and async_acquire handlers bound to it
//    granted by plain-thread releases: asio::post never throws (work handed
//    over after shutdown is dropped, weft/asio/executor.hpp), every function
//    runs once or is destroyed, no permit is lost, every frame destroyed.
//  - Async waits of every kind (semaphore, wait_group, both channel ops,
//    cancel token) started on another thread while join() stops the
//    pool's Asio services, for handlers on that pool: join() returns, no
//    handler runs, every handler is destroyed, no permit is kept.
//  - A group's coroutine racing its pool's shutdown() or shutdown_now():
//    a body that finished reports its own outcome, without waiting for
//    join(); one that never started reports weft::rejected, or co_spawn
//    threw it.
//  - Asio posts that find the pool's queue full (they go past it) mixed
//    with plain posts that wait for room, from several threads, on pools
//    of 1-3 workers and queues of 1-4, with pauses that let the workers
//    park: every function runs, so no worker parks with work left past
//    the queue.
//
// Hand-offs: atomics and spin_until (yield) on counts the handlers keep, and
// promises. No sleeps; the only deadlines are real 50 us - 1 ms ones that
// plain threads time out on, and nothing asserts how long anything took.
#include <weft/asio.hpp>
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/resource_pool.hpp>
#include <weft/semaphore.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include <boost/asio.hpp>
#include "../asio_support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

using error_code = boost::system::error_code;
using strand_type = asio::strand<asio::io_context::executor_type>;

using weft_test::chaos_sources;
using weft_test::io_threads;
using weft_test::iteration_cap;
using weft_test::run_budget;
using weft_test::spin_until;
using weft_test::under_sanitizer;
using weft_test::under_tsan;

bool is_cancelled(const error_code& ec) { return ec == weft::errc::cancelled; }

bool is_cancelled(const std::exception_ptr& error) {
  if (!error) return false;
  try {
    std::rethrow_exception(error);
  } catch (const boost::system::system_error& e) {
    return is_cancelled(e.code());
  } catch (...) {
  }
  return false;
}

asio::cancellation_type_t random_cancellation(std::mt19937_64& rng) {
  switch (rng() % 8) {
    case 0:
      return asio::cancellation_type::partial;
    case 1:
      return asio::cancellation_type::total;
    case 2:
      return asio::cancellation_type::none;  // must have no effect
    default:
      return asio::cancellation_type::terminal;
  }
}

// One asynchronous operation (or one coroutine's sequence of them): the
// strand its handler runs on, where its cancellation is emitted, and how
// often its handler ran. Owned by an op_table for the whole scenario, so a
// posted emission never outlives it.
struct op_record {
  explicit op_record(strand_type s) : strand(std::move(s)) {}
  strand_type strand;
  asio::cancellation_signal signal;
  std::atomic<int> calls{0};
  std::ptrdiff_t weight = 0;
};

class op_table {
 public:
  op_record& make(asio::io_context& io) {
    std::lock_guard lock(mutex_);
    all_.push_back(std::make_unique<op_record>(asio::make_strand(io)));
    op_record* made = all_.back().get();
    if (recent_.size() < 64) {
      recent_.push_back(made);
    } else {
      recent_[next_++ % recent_.size()] = made;
    }
    return *made;
  }

  // Emits a random cancellation on a recent operation, on its strand.
  void emit_random(std::mt19937_64& rng) {
    op_record* target = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (recent_.empty()) return;
      target = recent_[rng() % recent_.size()];
    }
    const auto type = random_cancellation(rng);
    asio::post(target->strand, [target, type] { target->signal.emit(type); });
  }

  // Every operation's handler ran exactly `expected` times; returns how many did not.
  std::size_t count_not_called(int expected) {
    std::lock_guard lock(mutex_);
    return static_cast<std::size_t>(std::count_if(
        all_.begin(), all_.end(), [&](const auto& op) { return op->calls.load() != expected; }));
  }

  std::size_t size() {
    std::lock_guard lock(mutex_);
    return all_.size();
  }

 private:
  std::mutex mutex_;
  std::deque<std::unique_ptr<op_record>> all_;
  std::vector<op_record*> recent_;
  std::size_t next_ = 0;
};

// Until `stop`: cancels and replaces a random source of `chaos`, and emits a
// random cancellation on a recent operation of `ops`, over and over.
std::thread start_chaos(chaos_sources& chaos, op_table& ops, const std::atomic<bool>& stop,
                        std::uint64_t seed) {
  return std::thread([&chaos, &ops, &stop, seed] {
    std::mt19937_64 rng{seed};
    while (!stop.load()) {
      chaos.cancel_and_replace(rng());
      ops.emit_random(rng);
      for (auto spins = rng() % 16; spins > 0; --spins) std::this_thread::yield();
    }
  });
}

// Holds the concurrently held amount, and counts any moment above the limit.
struct occupancy {
  explicit occupancy(std::ptrdiff_t most) : limit(most) {}
  void enter(std::ptrdiff_t n) {
    if (held.fetch_add(n) + n > limit) over.fetch_add(1);
  }
  void leave(std::ptrdiff_t n) { held.fetch_sub(n); }
  const std::ptrdiff_t limit;
  std::atomic<std::ptrdiff_t> held{0};
  std::atomic<std::uint64_t> over{0};
};

struct shape {
  int io_threads;
  int drivers;
};

}  // namespace

// ---------------------------------------------------------------------------
// semaphore

namespace {

struct async_semaphore_scenario {
  async_semaphore_scenario(std::ptrdiff_t capacity, std::uint64_t seed)
      : sem(capacity), held(capacity), chaos(4) {
    (void)seed;
  }

  weft::semaphore sem;
  occupancy held;
  chaos_sources chaos;
  std::atomic<std::uint64_t> outstanding{0};  // async operations not yet finished with
  std::atomic<std::uint64_t> granted{0};      // every successful acquire, async or not
  std::atomic<std::uint64_t> cancelled{0};
  std::atomic<std::uint64_t> timeouts{0};
  std::atomic<std::uint64_t> bad{0};  // a wrong (error, permit) pair, or a handler run twice

  // Permits parked for a while, released later by a plain thread (so grants
  // race the emissions from a thread that is not the handler's).
  std::mutex pen_mutex;
  std::vector<weft::permit> pen;

  void park(weft::permit permit) {
    std::lock_guard lock(pen_mutex);
    pen.push_back(std::move(permit));
  }
  void release_some(std::mt19937_64& rng, bool all = false) {
    std::vector<weft::permit> out;
    {
      std::lock_guard lock(pen_mutex);
      const std::size_t take = all ? pen.size() : std::min<std::size_t>(pen.size(), 1 + rng() % 3);
      for (std::size_t i = 0; i < take; ++i) {
        out.push_back(std::move(pen.back()));
        pen.pop_back();
      }
    }
    for (auto& p : out) {
      held.leave(p.count());
      p.release();
    }
  }

  // A handler's checks; then keeps the permit for a moment (on the strand,
  // or parked) or drops it. Runs on the operation's strand.
  void complete(op_record& op, error_code ec, weft::permit permit, std::uint64_t choice) {
    if (op.calls.fetch_add(1) != 0) bad.fetch_add(1);
    if (ec) {
      if (!is_cancelled(ec) || permit || permit.count() != 0) bad.fetch_add(1);
      cancelled.fetch_add(1);
      outstanding.fetch_sub(1);
      return;
    }
    if (!permit || permit.count() != op.weight) bad.fetch_add(1);
    granted.fetch_add(1);
    held.enter(permit.count());
    switch (choice % 3) {
      case 0:
        held.leave(permit.count());
        permit.release();
        outstanding.fetch_sub(1);
        break;
      case 1:
        park(std::move(permit));
        outstanding.fetch_sub(1);
        break;
      default:
        asio::post(op.strand, [this, p = std::move(permit)]() mutable {
          held.leave(p.count());
          p.release();
          outstanding.fetch_sub(1);
        });
        break;
    }
  }
};

}  // namespace

TEST_CASE(
    "asio semaphore: async acquires cancelled through slots while releases grant them conserve "
    "permits" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x5e3a};

  for (const shape s : {shape{1, 2}, shape{3, 3}, shape{2, 8}}) {
    const std::ptrdiff_t capacity = std::uniform_int_distribution<std::ptrdiff_t>{1, 8}(setup);
    CAPTURE(s.io_threads);
    CAPTURE(s.drivers);
    CAPTURE(capacity);

    asio::io_context io;
    op_table ops;
    async_semaphore_scenario sc{capacity, seed};
    std::atomic<bool> stop{false};
    std::mutex futures_mutex;
    std::vector<std::pair<std::ptrdiff_t, std::future<weft::permit>>> futures;
    io_threads runner{io, s.io_threads};
    const auto until = std::chrono::steady_clock::now() + run_budget();

    const auto driver = [&](std::uint64_t thread_seed) {
      std::mt19937_64 rng{thread_seed};
      std::vector<std::pair<std::ptrdiff_t, std::future<weft::permit>>> mine;
      const auto collect_ready = [&] {
        for (auto it = mine.begin(); it != mine.end();) {
          if (it->second.wait_for(0s) != std::future_status::ready) {
            ++it;
            continue;
          }
          auto permit = it->second.get();
          if (permit.count() != it->first) sc.bad.fetch_add(1);
          sc.granted.fetch_add(1);
          sc.held.enter(permit.count());
          sc.held.leave(permit.count());
          it = mine.erase(it);
        }
      };
      for (std::uint64_t i = 0; i < iteration_cap(100'000); ++i) {
        if ((i & 7) == 0 && std::chrono::steady_clock::now() >= until) break;
        const std::ptrdiff_t n =
            rng() % 6 == 0 ? capacity
                           : std::uniform_int_distribution<std::ptrdiff_t>{1, capacity}(rng);
        const bool room = sc.outstanding.load() < 48;
        const auto action = rng() % 12;
        if (room && action < 6) {
          op_record& op = ops.make(io);
          op.weight = n;
          sc.outstanding.fetch_add(1);
          const std::uint64_t choice = rng();
          auto handler = [&sc, &op, choice](error_code ec, weft::permit permit) {
            sc.complete(op, ec, std::move(permit), choice);
          };
          switch (action % 3) {
            // Initiated on the strand, as the emissions are: installing the
            // slot's handler must not race an emission (Asio's rule).
            case 0:  // a plain callback
              asio::post(op.strand, [&sc, &op, n, handler] {
                weft::async_acquire(sc.sem, n,
                                    asio::bind_cancellation_slot(
                                        op.signal.slot(), asio::bind_executor(op.strand, handler)));
              });
              break;
            case 1: {  // deferred, made here and launched on the strand
              auto deferred = weft::async_acquire(sc.sem, n, asio::deferred);
              asio::post(op.strand, [&op, handler, d = std::move(deferred)]() mutable {
                std::move(d)(asio::bind_cancellation_slot(op.signal.slot(),
                                                          asio::bind_executor(op.strand, handler)));
              });
              break;
            }
            default:  // a coroutine on the strand
              asio::co_spawn(
                  op.strand,
                  [&sc, &op, n, choice]() -> asio::awaitable<void> {
                    auto [ec, permit] = co_await weft::async_acquire(
                        sc.sem, n,
                        asio::bind_cancellation_slot(op.signal.slot(),
                                                     asio::as_tuple(asio::use_awaitable)));
                    if (!ec && choice % 4 == 0) {
                      // Hold it across a suspension, then drop it.
                      if (op.calls.fetch_add(1) != 0) sc.bad.fetch_add(1);
                      if (permit.count() != n) sc.bad.fetch_add(1);
                      sc.granted.fetch_add(1);
                      sc.held.enter(n);
                      co_await asio::post(op.strand, asio::use_awaitable);
                      sc.held.leave(n);
                      permit.release();
                      sc.outstanding.fetch_sub(1);
                      co_return;
                    }
                    sc.complete(op, ec, std::move(permit), choice);
                  },
                  asio::detached);
              break;
          }
        } else if (room && action == 6) {
          mine.emplace_back(n, weft::async_acquire(sc.sem, n, asio::use_future));
        } else if (action < 9) {
          ops.emit_random(rng);
          ops.emit_random(rng);
        } else if (action == 9) {
          sc.release_some(rng);
        } else {
          // A blocking acquire, on a chaos token or a short deadline.
          const auto status =
              rng() % 2 == 0 ? sc.sem.acquire(n, sc.chaos.token(rng()))
                             : sc.sem.acquire_for(n, std::chrono::microseconds{50 + rng() % 950});
          if (status == weft::wait_status::ok) {
            sc.granted.fetch_add(1);
            sc.held.enter(n);
            std::this_thread::yield();
            sc.held.leave(n);
            sc.sem.release(n);
          } else if (status == weft::wait_status::timeout) {
            sc.timeouts.fetch_add(1);
          } else {
            sc.cancelled.fetch_add(1);
          }
        }
        if ((i & 31) == 0) collect_ready();
      }
      std::lock_guard lock(futures_mutex);
      for (auto& f : mine) futures.push_back(std::move(f));
    };

    std::thread chaos_thread = start_chaos(sc.chaos, ops, stop, seed ^ 0xc4a05u);
    std::vector<std::thread> drivers;
    for (int t = 0; t < s.drivers; ++t)
      drivers.emplace_back(driver, seed + 7919u * static_cast<std::uint64_t>(t + 1));
    for (auto& t : drivers) t.join();
    stop.store(true);
    chaos_thread.join();

    // Everything parked goes back; every waiter is then granted in turn.
    std::mt19937_64 rng{seed};
    sc.release_some(rng, true);
    // A granted future holds its permit until get(): take them as they come.
    spin_until([&] {
      sc.release_some(rng, true);
      for (auto it = futures.begin(); it != futures.end();) {
        if (it->second.wait_for(0s) != std::future_status::ready) {
          ++it;
          continue;
        }
        auto permit = it->second.get();
        if (permit.count() != it->first) sc.bad.fetch_add(1);
        sc.granted.fetch_add(1);
        it = futures.erase(it);
      }
      return futures.empty() && sc.outstanding.load() == 0;
    });
    sc.release_some(rng, true);  // what the last handlers parked
    runner.stop();

    CHECK(sc.bad.load() == 0);
    CHECK(sc.held.over.load() == 0);
    CHECK(ops.count_not_called(1) == 0);
    const auto stats = sc.sem.stats();
    CHECK(stats.available == capacity);
    CHECK(stats.waiters == 0);
    CHECK(stats.acquisitions == sc.granted.load());
    CHECK(stats.cancellations == sc.cancelled.load());
    CHECK(stats.timeouts == sc.timeouts.load());
  }
}

// ---------------------------------------------------------------------------
// resource_pool

namespace {

struct numbered_connection {
  int id = 0;
};

using pool_type = weft::resource_pool<numbered_connection>;

}  // namespace

TEST_CASE(
    "asio resource_pool: async acquires cancelled through slots never exceed max_open nor lose a "
    "slot" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x9001};

  for (const shape s : {shape{1, 2}, shape{3, 4}}) {
    const std::size_t max_open = 1 + setup() % 4;
    const std::size_t max_idle = setup() % (max_open + 1);
    CAPTURE(s.io_threads);
    CAPTURE(s.drivers);
    CAPTURE(max_open);
    CAPTURE(max_idle);

    std::atomic<int> opened{0};
    std::atomic<int> closed{0};
    std::atomic<std::uint64_t> fail_next{0};
    std::optional<pool_type> pool;
    pool.emplace(
        weft::resource_pool_options{.max_open = max_open, .max_idle = max_idle},
        [&] {
          if (fail_next.fetch_add(1) % 13 == 12) throw std::runtime_error("open failed");
          return numbered_connection{++opened};
        },
        [&](numbered_connection&) { ++closed; });

    asio::io_context io;
    op_table ops;
    occupancy held{static_cast<std::ptrdiff_t>(max_open)};
    chaos_sources chaos{4};
    std::atomic<std::uint64_t> outstanding{0};
    std::atomic<std::uint64_t> bad{0};
    std::atomic<std::uint64_t> leased{0};
    std::atomic<std::uint64_t> failures_seen{0};
    std::atomic<bool> stop{false};
    {
      io_threads runner{io, s.io_threads};
      const auto until = std::chrono::steady_clock::now() + run_budget();

      // Checks a completion; keeps the lease across one more trip through the strand, or not.
      const auto finish = [&](op_record& op, std::exception_ptr error, pool_type::lease lease,
                              bool hold) {
        if (op.calls.fetch_add(1) != 0) bad.fetch_add(1);
        if (error) {
          if (lease) bad.fetch_add(1);
          if (!is_cancelled(error)) failures_seen.fetch_add(1);
          outstanding.fetch_sub(1);
          return;
        }
        if (!lease || lease->id <= 0) bad.fetch_add(1);
        leased.fetch_add(1);
        held.enter(1);
        if (!hold) {
          held.leave(1);
          lease.release();
          outstanding.fetch_sub(1);
          return;
        }
        asio::post(op.strand, [&, l = std::move(lease)]() mutable {
          held.leave(1);
          if (l->id % 5 == 0) {
            l.discard();
          } else {
            l.release();
          }
          outstanding.fetch_sub(1);
        });
      };

      const auto driver = [&](std::uint64_t thread_seed) {
        std::mt19937_64 rng{thread_seed};
        for (std::uint64_t i = 0; i < iteration_cap(100'000); ++i) {
          if ((i & 7) == 0 && std::chrono::steady_clock::now() >= until) break;
          const auto action = rng() % 10;
          const bool room = outstanding.load() < 32;
          if (room && action < 5) {
            op_record& op = ops.make(io);
            outstanding.fetch_add(1);
            const bool hold = rng() % 2 == 0;
            if (action % 2 == 0) {
              asio::post(op.strand, [&, hold] {
                weft::async_acquire(
                    *pool, asio::bind_cancellation_slot(
                               op.signal.slot(),
                               asio::bind_executor(
                                   op.strand, [&, hold](std::exception_ptr e, pool_type::lease l) {
                                     finish(op, std::move(e), std::move(l), hold);
                                   })));
              });
            } else {
              asio::co_spawn(
                  op.strand,
                  [&, hold]() -> asio::awaitable<void> {
                    auto [e, l] = co_await weft::async_acquire(
                        *pool, asio::bind_cancellation_slot(op.signal.slot(),
                                                            asio::as_tuple(asio::use_awaitable)));
                    finish(op, std::move(e), std::move(l), hold);
                  },
                  asio::detached);
            }
          } else if (action < 8) {
            ops.emit_random(rng);
          } else {
            try {
              auto lease = rng() % 2 == 0
                               ? pool->acquire(chaos.token(rng()))
                               : pool->acquire_for(std::chrono::microseconds{50 + rng() % 950});
              if (lease) {
                leased.fetch_add(1);
                held.enter(1);
                std::this_thread::yield();
                held.leave(1);
              }
            } catch (const std::runtime_error&) {
              failures_seen.fetch_add(1);
            }
          }
        }
      };

      std::thread chaos_thread = start_chaos(chaos, ops, stop, seed ^ 0xc4a06u);
      std::vector<std::thread> drivers;
      for (int t = 0; t < s.drivers; ++t)
        drivers.emplace_back(driver, seed + 104729u * static_cast<std::uint64_t>(t + 1));
      for (auto& t : drivers) t.join();
      stop.store(true);
      chaos_thread.join();
      spin_until([&] { return outstanding.load() == 0; });
      runner.stop();
    }

    CHECK(bad.load() == 0);
    CHECK(held.over.load() == 0);
    CHECK(ops.count_not_called(1) == 0);
    const auto stats = pool->stats();
    CHECK(stats.in_use == 0);
    CHECK(stats.waiting == 0);
    CHECK(stats.open == stats.idle);
    CHECK(stats.idle <= max_idle);
    CHECK(stats.open_failures == failures_seen.load());
    CHECK(static_cast<std::size_t>(opened.load() - closed.load()) == stats.open);
    // Every slot is free: max_open leases at once, with no waiting.
    {
      std::vector<pool_type::lease> all;
      for (std::size_t i = 0; i < max_open; ++i) {
        fail_next.store(0);  // no failure now
        all.push_back(pool->try_acquire());
        CHECK(static_cast<bool>(all.back()));
      }
      fail_next.store(0);
      CHECK_FALSE(static_cast<bool>(pool->try_acquire()));
    }
    pool.reset();
    CHECK(opened.load() == closed.load());
  }
}

// ---------------------------------------------------------------------------
// channels

namespace {

// A value that knows its id and counts live instances, so a leak or a
// double destruction shows; a moved-from item has id 0.
struct counted_item {
  counted_item() noexcept { live.fetch_add(1); }
  explicit counted_item(std::uint64_t i) noexcept : id(i) { live.fetch_add(1); }
  counted_item(counted_item&& other) noexcept : id(std::exchange(other.id, 0)) {
    live.fetch_add(1);
  }
  counted_item& operator=(counted_item&& other) noexcept {
    id = std::exchange(other.id, 0);
    return *this;
  }
  counted_item(const counted_item&) = delete;
  counted_item& operator=(const counted_item&) = delete;
  ~counted_item() { live.fetch_sub(1); }
  std::uint64_t id = 0;
  static inline std::atomic<long> live{0};
};

// What happened to every id: sends reported, receptions seen.
class ledger {
 public:
  void sent(std::uint64_t id, bool ok) {
    std::lock_guard lock(mutex_);
    auto& e = entries_[id];
    ++(ok ? e.sent_ok : e.send_failed);
  }
  void received(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    ++entries_[id].received;
  }
  struct verdict {
    std::size_t lost = 0;         // sent ok, never received
    std::size_t doubled = 0;      // received more than once
    std::size_t phantom = 0;      // received, but its send failed or never reported
    std::size_t misreported = 0;  // a send reported more than once
    std::uint64_t sent_ok = 0;
    std::uint64_t received_total = 0;
  };
  // `lossy`: values of completions destroyed unrun may vanish (io_context gone).
  verdict check(bool lossy = false) {
    std::lock_guard lock(mutex_);
    verdict v;
    for (const auto& [id, e] : entries_) {
      if (e.sent_ok + e.send_failed > 1) ++v.misreported;
      if (e.received > 1) ++v.doubled;
      if (e.sent_ok == 1 && e.received == 0 && !lossy) ++v.lost;
      if (e.received > 0 && e.sent_ok == 0 && !lossy) ++v.phantom;
      if (id == 0 && e.received > 0) ++v.phantom;
      v.sent_ok += e.sent_ok;
      v.received_total += e.received;
    }
    return v;
  }

 private:
  struct entry {
    int sent_ok = 0;
    int send_failed = 0;
    int received = 0;
  };
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, entry> entries_;
};

}  // namespace

TEST_CASE(
    "asio channel: async sends and receives cancelled through slots and racing close() deliver "
    "each value once" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0xc4a7};

  for (const std::size_t capacity :
       {std::size_t{0}, std::size_t{1}, std::size_t{4}, std::size_t{0}, std::size_t{16}}) {
    const int io_count = 1 + static_cast<int>(setup() % 3);
    const int producers = 1 + static_cast<int>(setup() % 3);
    const int coroutine_consumers = 1 + static_cast<int>(setup() % 3);
    CAPTURE(capacity);
    CAPTURE(io_count);
    CAPTURE(producers);
    {
      asio::io_context io;
      op_table ops;
      ledger book;
      std::optional<weft::channel<counted_item>> ch;
      ch.emplace(capacity);
      chaos_sources chaos{4};
      std::atomic<std::uint64_t> outstanding{0};  // async operations and consumers not yet finished
      std::atomic<std::uint64_t> bad{0};
      std::atomic<bool> stop{false};
      std::atomic<std::uint64_t> progress{0};
      std::atomic<int> producers_done{0};
      io_threads runner{io, io_count};
      const auto until = std::chrono::steady_clock::now() + run_budget() / 2;

      // A receive's checks (on its strand or thread); false once closed.
      const auto on_recv = [&](error_code ec, std::optional<counted_item>& value) {
        if (!ec) {
          if (!value || value->id == 0) bad.fetch_add(1);
          if (value) book.received(value->id);
          return true;
        }
        if (value) bad.fetch_add(1);
        if (ec == weft::errc::closed) return false;
        if (!is_cancelled(ec)) bad.fetch_add(1);
        return true;
      };

      // Consumers: coroutines looping on async_recv with a slot...
      for (int c = 0; c < coroutine_consumers; ++c) {
        op_record& op = ops.make(io);
        outstanding.fetch_add(1);
        asio::co_spawn(
            op.strand,
            [&]() -> asio::awaitable<void> {
              for (;;) {
                auto [ec, value] = co_await weft::async_recv(
                    *ch, asio::bind_cancellation_slot(op.signal.slot(),
                                                      asio::as_tuple(asio::use_awaitable)));
                if (!on_recv(ec, value)) break;
              }
              op.calls.fetch_add(1);
              outstanding.fetch_sub(1);
            },
            asio::detached);
      }
      // ...a chain of callbacks, each issuing the next receive...
      struct chain {
        std::function<void()> next;
      };
      chain callbacks;
      op_record& chain_op = ops.make(io);
      outstanding.fetch_add(1);
      callbacks.next = [&] {
        weft::async_recv(*ch,
                         asio::bind_cancellation_slot(
                             chain_op.signal.slot(),
                             asio::bind_executor(chain_op.strand,
                                                 [&](error_code ec, std::optional<counted_item> v) {
                                                   if (on_recv(ec, v)) {
                                                     callbacks.next();
                                                   } else {
                                                     chain_op.calls.fetch_add(1);
                                                     outstanding.fetch_sub(1);
                                                   }
                                                 })));
      };
      asio::post(chain_op.strand, [&] { callbacks.next(); });
      // ...and a plain thread on a chaos token.
      std::thread thread_consumer([&] {
        std::mt19937_64 rng{seed ^ 0x7c};
        for (;;) {
          auto result = ch->recv(chaos.token(rng()));
          if (result) {
            if ((*result).id == 0) bad.fetch_add(1);
            book.received((*result).id);
          } else if (result.status() == weft::wait_status::closed) {
            break;
          }
        }
      });

      const auto producer = [&](std::uint64_t index) {
        std::mt19937_64 rng{seed + 31337u * (index + 1)};
        std::uint64_t next_id = (index + 1) << 40;
        for (std::uint64_t i = 0; i < iteration_cap(50'000); ++i, progress.fetch_add(1)) {
          if ((i & 7) == 0 && std::chrono::steady_clock::now() >= until) break;
          const auto action = rng() % 8;
          const bool room = outstanding.load() < 64;
          const std::uint64_t id = ++next_id;
          if (room && action < 3) {
            op_record& op = ops.make(io);
            outstanding.fetch_add(1);
            asio::post(op.strand, [&, id, value = counted_item{id}]() mutable {
              weft::async_send(
                  *ch, std::move(value),
                  asio::bind_cancellation_slot(
                      op.signal.slot(), asio::bind_executor(op.strand, [&, id](error_code ec) {
                        if (op.calls.fetch_add(1) != 0) bad.fetch_add(1);
                        if (ec && ec != weft::errc::closed && !is_cancelled(ec)) bad.fetch_add(1);
                        book.sent(id, !ec);
                        outstanding.fetch_sub(1);
                      })));
            });
          } else if (room && action == 3) {
            op_record& op = ops.make(io);
            outstanding.fetch_add(1);
            const int burst = 1 + static_cast<int>(rng() % 4);
            next_id += static_cast<std::uint64_t>(burst);
            asio::co_spawn(
                op.strand,
                [&, id, burst]() -> asio::awaitable<void> {
                  for (int k = 0; k < burst; ++k) {
                    const std::uint64_t v = id + static_cast<std::uint64_t>(k);
                    auto [ec] = co_await weft::async_send(
                        *ch, counted_item{v},
                        asio::bind_cancellation_slot(op.signal.slot(),
                                                     asio::as_tuple(asio::use_awaitable)));
                    if (ec && ec != weft::errc::closed && !is_cancelled(ec)) bad.fetch_add(1);
                    book.sent(v, !ec);
                  }
                  op.calls.fetch_add(1);
                  outstanding.fetch_sub(1);
                },
                asio::detached);
          } else if (action < 6) {
            ops.emit_random(rng);
          } else {
            counted_item value{id};
            const auto status = ch->send(std::move(value), chaos.token(rng()));
            if ((status == weft::wait_status::ok) != (value.id == 0))
              bad.fetch_add(1);  // moved from only on success
            book.sent(id, status == weft::wait_status::ok);
          }
        }
        producers_done.fetch_add(1);
      };

      std::thread chaos_thread = start_chaos(chaos, ops, stop, seed ^ 0xc4a07u);
      std::vector<std::thread> threads;
      for (int p = 0; p < producers; ++p)
        threads.emplace_back(producer, static_cast<std::uint64_t>(p));
      // Close while the producers still run (and async sends still wait), now
      // and then: after a random number of their steps, or once they are done.
      std::mt19937_64 rng{seed ^ 0xc105e};
      if (rng() % 2 == 0) {
        const std::uint64_t after = rng() % 2000;
        spin_until([&] { return progress.load() >= after || producers_done.load() == producers; });
        ch->close();
      }
      for (auto& t : threads) t.join();
      ch->close();
      spin_until([&] { return outstanding.load() == 0; });
      thread_consumer.join();
      stop.store(true);
      chaos_thread.join();
      runner.stop();

      // Every receiver saw `closed`: nothing may be left.
      std::size_t left = 0;
      while (auto v = ch->try_recv()) ++left;
      CHECK(left == 0);
      const auto v = book.check();
      CHECK(bad.load() == 0);
      CHECK(v.lost == 0);
      CHECK(v.doubled == 0);
      CHECK(v.phantom == 0);
      CHECK(v.misreported == 0);
      CHECK(v.sent_ok == v.received_total);
      CHECK(ops.count_not_called(1) == 0);
      ch.reset();
    }
    CHECK(counted_item::live.load() == 0);
  }
}

// ---------------------------------------------------------------------------
// wait_group and cancel_token

TEST_CASE(
    "asio async_wait on wait_group and cancel_token completes once when slots race done() and "
    "cancel()" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x3a17};

  asio::io_context io;
  op_table ops;
  std::atomic<std::uint64_t> bad{0};
  std::atomic<std::uint64_t> early{0};  // ok before the event
  std::atomic<std::uint64_t> rounds{0};
  {
    io_threads runner{io, 3};
    const auto until = std::chrono::steady_clock::now() + run_budget();
    for (std::uint64_t round = 0; round < iteration_cap(20'000); ++round) {
      if (std::chrono::steady_clock::now() >= until) break;
      rounds.fetch_add(1);
      const int waiters = 1 + static_cast<int>(rng() % 6);
      const int tasks = 1 + static_cast<int>(rng() % 4);
      std::atomic<int> pending{waiters};
      std::atomic<bool> happened{false};
      std::vector<op_record*> mine;
      std::vector<std::future<void>> futures;

      weft::wait_group group;
      weft::cancel_source source;
      const bool on_group = rng() % 2 == 0;
      if (on_group) group.add(tasks);
      for (int w = 0; w < waiters; ++w) {
        op_record& op = ops.make(io);
        mine.push_back(&op);
        auto handler = [&, op_ptr = &op](error_code ec) {
          if (op_ptr->calls.fetch_add(1) != 0) bad.fetch_add(1);
          if (!ec && !happened.load()) early.fetch_add(1);
          if (ec && !is_cancelled(ec)) bad.fetch_add(1);
          pending.fetch_sub(1);
        };
        auto bound =
            asio::bind_cancellation_slot(op.signal.slot(), asio::bind_executor(op.strand, handler));
        switch (rng() % 4) {
          case 0:
            if (on_group) {
              weft::async_wait(group, bound);
            } else {
              weft::async_wait(source.token(), bound);
            }
            break;
          case 1:
            if (on_group) {
              weft::async_wait(group, asio::deferred)(bound);
            } else {
              weft::async_wait(source.token(), asio::deferred)(bound);
            }
            break;
          case 2:
            asio::co_spawn(
                op.strand,
                [&, on_group, op_ptr = &op]() -> asio::awaitable<void> {
                  auto slot_token = asio::bind_cancellation_slot(
                      op_ptr->signal.slot(), asio::as_tuple(asio::use_awaitable));
                  auto [ec] = on_group ? co_await weft::async_wait(group, slot_token)
                                       : co_await weft::async_wait(source.token(), slot_token);
                  if (op_ptr->calls.fetch_add(1) != 0) bad.fetch_add(1);
                  if (!ec && !happened.load()) early.fetch_add(1);
                  if (ec && !is_cancelled(ec)) bad.fetch_add(1);
                  pending.fetch_sub(1);
                },
                asio::detached);
            break;
          default:
            // use_future: no slot, so only the event ends it.
            op.calls.fetch_add(1);
            pending.fetch_sub(1);
            futures.push_back(on_group ? weft::async_wait(group, asio::use_future)
                                       : weft::async_wait(source.token(), asio::use_future));
            break;
        }
      }
      // The event, from other threads, racing emissions on the waiters' strands.
      std::vector<std::thread> actors;
      std::atomic<int> remaining{tasks};
      if (on_group) {
        for (int t = 0; t < tasks; ++t) {
          actors.emplace_back([&] {
            if (remaining.fetch_sub(1) == 1) happened.store(true);
            group.done();
          });
        }
      } else {
        actors.emplace_back([&] {
          happened.store(true);
          source.cancel();
        });
      }
      for (int e = static_cast<int>(rng() % 4); e > 0; --e) {
        op_record* target = mine[rng() % mine.size()];
        const auto type = random_cancellation(rng);
        asio::post(target->strand, [target, type] { target->signal.emit(type); });
      }
      for (auto& a : actors) a.join();
      for (auto& f : futures) {
        try {
          f.get();
        } catch (...) {
          bad.fetch_add(1);
        }
      }
      spin_until([&] { return pending.load() == 0; });
      // Let any emission still posted to these strands run before the next round.
      for (op_record* op : mine) {
        std::promise<void> flushed;
        asio::post(op->strand, [&] { flushed.set_value(); });
        flushed.get_future().wait();
      }
      CHECK(group.stats().waiters == 0);
      CHECK(weft::detail::state_of(source.token())->callback_count() == 0);
    }
    runner.stop();
  }
  CHECK(rounds.load() > 0);
  CHECK(bad.load() == 0);
  CHECK(early.load() == 0);
  CHECK(ops.count_not_called(1) == 0);
}

// ---------------------------------------------------------------------------
// task_group with coroutines

namespace {

struct frame_counter {
  frame_counter() { live.fetch_add(1); }
  frame_counter(const frame_counter&) = delete;
  frame_counter& operator=(const frame_counter&) = delete;
  ~frame_counter() { live.fetch_sub(1); }
  static inline std::atomic<int> live{0};
};

// A coroutine in a group: waits on a semaphore and a token, maybe throws.
asio::awaitable<void> group_member(weft::semaphore& sem, weft::cancel_token gate, int kind,
                                   std::atomic<int>& finished) {
  frame_counter frame;
  auto executor = co_await asio::this_coro::executor;
  (void)executor;
  if (kind % 3 == 0) {
    auto permit = co_await weft::async_acquire(sem, 1, asio::use_awaitable);
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  } else if (kind % 3 == 1) {
    co_await weft::async_wait(gate, asio::use_awaitable);
  }
  if (kind == 7) throw std::runtime_error("member failed");
  finished.fetch_add(1);
}

}  // namespace

TEST_CASE(
    "asio task_group: async_wait cancelled through its slot and re-issued agrees with wait() over "
    "coroutines" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x76a9};

  weft::worker_pool pool{{.workers = 3}};
  asio::io_context io;
  std::atomic<std::uint64_t> bad{0};
  std::uint64_t rounds = 0;
  {
    io_threads runner{io, 2};
    const auto until = std::chrono::steady_clock::now() + run_budget();
    for (std::uint64_t round = 0; round < iteration_cap(5'000); ++round) {
      if (std::chrono::steady_clock::now() >= until) break;
      ++rounds;
      weft::semaphore sem{1 + static_cast<std::ptrdiff_t>(rng() % 2)};
      weft::cancel_source gate;
      std::atomic<int> finished{0};
      std::atomic<int> thread_tasks{0};
      int failing = 0;
      {
        weft::task_group group{pool.executor()};
        const int members = 1 + static_cast<int>(rng() % 6);
        for (int m = 0; m < members; ++m) {
          const int kind = static_cast<int>(rng() % 8);
          if (kind == 7) ++failing;
          if (rng() % 2 == 0) {
            weft::co_spawn(group, group_member(sem, gate.token(), kind, finished));
          } else {
            weft::co_spawn(group, io.get_executor(),
                           group_member(sem, gate.token(), kind, finished));
          }
        }
        group.go([&] { thread_tasks.fetch_add(1); });
        const bool cancel_group = rng() % 4 == 0;

        // The wait, re-issued while it ends by its own cancellation.
        auto strand = asio::make_strand(io);
        asio::cancellation_signal signal;
        std::exception_ptr outcome;
        int issued = 0;
        for (;;) {
          ++issued;
          auto calls = std::make_shared<std::atomic<int>>(0);
          std::promise<std::exception_ptr> done;
          weft::async_wait(
              group,
              asio::bind_cancellation_slot(
                  signal.slot(), asio::bind_executor(strand, [calls, &done](std::exception_ptr e) {
                    if (calls->fetch_add(1) == 0) done.set_value(e);
                  })));
          const bool emitted = rng() % 2 == 0;
          if (emitted) {
            const auto type = random_cancellation(rng);
            asio::post(strand, [&signal, type] { signal.emit(type); });
          }
          if (issued == 1) {
            if (cancel_group) group.cancel();
            gate.cancel();
          }
          auto e = done.get_future().get();
          // Let a late emission drain before the next issue or the end.
          std::promise<void> flushed;
          asio::post(strand, [&] { flushed.set_value(); });
          flushed.get_future().wait();
          if (calls->load() != 1) bad.fetch_add(1);
          // Cancelled by its own slot: wait again (a member's failure may be
          // a cancellation too, so only a wait nobody emitted on is final).
          if (emitted && is_cancelled(e)) continue;
          outcome = e;
          break;
        }
        // The outcome: none, or the first failure (or the group's cancellation).
        if (outcome == nullptr) {
          if (failing != 0) bad.fetch_add(1);  // a failure must be reported
          if (finished.load() != members) bad.fetch_add(1);
          if (thread_tasks.load() != 1) bad.fetch_add(1);
        } else if (failing == 0 && !cancel_group) {
          bad.fetch_add(1);
        }
        bool threw = false;
        try {
          group.wait();
        } catch (...) {
          threw = true;
        }
        // A failure is delivered to every wait; a report of skipped members
        // (the group cancelled) only once, so the wait() after a wait that
        // reported them may return normally (task_group.hpp, outcome()).
        if (outcome == nullptr && threw) bad.fetch_add(1);
        if (failing != 0 && !threw) bad.fetch_add(1);
      }
    }
    runner.stop();
  }
  CHECK(rounds > 0);
  CHECK(bad.load() == 0);
  CHECK(frame_counter::live.load() == 0);
}

// ---------------------------------------------------------------------------
// shutdown with operations pending

namespace {

// Carried by every handler of the shutdown scenarios: counts handlers alive
// (so a handler neither run nor destroyed shows) and calls.
struct handler_mark {
  explicit handler_mark(std::atomic<long>& alive_count) : alive(&alive_count) {
    alive->fetch_add(1);
  }
  handler_mark(handler_mark&& other) noexcept : alive(std::exchange(other.alive, nullptr)) {}
  handler_mark& operator=(handler_mark&&) = delete;
  handler_mark(const handler_mark&) = delete;
  ~handler_mark() {
    if (alive != nullptr) alive->fetch_sub(1);
  }
  std::atomic<long>* alive;
};

}  // namespace

TEST_CASE(
    "asio shutdown: an io_context stopped or destroyed with waits queued in weft objects loses "
    "nothing" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x5d0e};

  std::atomic<long> handlers_alive{0};
  std::atomic<std::uint64_t> bad{0};
  std::uint64_t rounds = 0;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  for (std::uint64_t round = 0; round < iteration_cap(5'000); ++round) {
    if (std::chrono::steady_clock::now() >= until) break;
    ++rounds;
    const std::ptrdiff_t capacity = 1 + static_cast<std::ptrdiff_t>(rng() % 4);
    weft::semaphore sem{capacity};
    weft::channel<counted_item> ch{rng() % 2 == 0 ? 0u : 2u};
    weft::wait_group group;
    group.add(1);
    weft::cancel_source source;
    ledger book;
    std::atomic<std::uint64_t> granted_calls{0};
    // Half the permits held by this thread while the async waits queue.
    const std::ptrdiff_t taken =
        1 + static_cast<std::ptrdiff_t>(rng() % static_cast<std::uint64_t>(capacity));
    sem.acquire(taken);
    {
      auto io = std::make_unique<asio::io_context>();
      const int io_count = static_cast<int>(rng() % 3);
      std::vector<std::thread> io_runners;
      auto work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(
          io->get_executor());
      for (int t = 0; t < io_count; ++t) io_runners.emplace_back([&io_ref = *io] { io_ref.run(); });

      const int ops = 2 + static_cast<int>(rng() % 10);
      std::uint64_t next_id = round << 20;
      for (int k = 0; k < ops; ++k) {
        handler_mark mark{handlers_alive};
        auto once = std::make_shared<std::atomic<int>>(0);
        switch (rng() % 5) {
          case 0: {
            const std::ptrdiff_t n =
                1 + static_cast<std::ptrdiff_t>(rng() % static_cast<std::uint64_t>(capacity));
            weft::async_acquire(sem, n,
                                asio::bind_executor(*io, [&, n, once, m = std::move(mark)](
                                                             error_code ec, weft::permit p) {
                                  if (once->fetch_add(1) != 0 || ec || p.count() != n)
                                    bad.fetch_add(1);
                                  granted_calls.fetch_add(1);
                                }));
            break;
          }
          case 1: {
            const std::uint64_t id = ++next_id;
            weft::async_send(
                ch, counted_item{id},
                asio::bind_executor(*io, [&, id, once, m = std::move(mark)](error_code ec) {
                  if (once->fetch_add(1) != 0) bad.fetch_add(1);
                  book.sent(id, !ec);
                }));
            break;
          }
          case 2:
            weft::async_recv(
                ch, asio::bind_executor(*io, [&, once, m = std::move(mark)](
                                                 error_code ec, std::optional<counted_item> v) {
                  if (once->fetch_add(1) != 0) bad.fetch_add(1);
                  if (!ec && v) book.received(v->id);
                }));
            break;
          case 3:
            weft::async_wait(group,
                             asio::bind_executor(*io, [&, once, m = std::move(mark)](error_code) {
                               if (once->fetch_add(1) != 0) bad.fetch_add(1);
                             }));
            break;
          default:
            weft::async_wait(source.token(),
                             asio::bind_executor(*io, [&, once, m = std::move(mark)](error_code) {
                               if (once->fetch_add(1) != 0) bad.fetch_add(1);
                             }));
            break;
        }
      }
      // Others wake some of the waits, while the io_context goes away.
      std::atomic<bool> go{false};
      std::thread waker([&] {
        spin_until([&] { return go.load(); });
        std::mt19937_64 local{seed + round};
        sem.release(taken);
        if (local() % 2 == 0) group.done();
        if (local() % 2 == 0) source.cancel();
        counted_item value{(round << 20) | 0xFFFFF};
        if (ch.try_send(std::move(value))) book.sent((round << 20) | 0xFFFFF, true);
        if (auto got = ch.try_recv()) book.received(got->id);
      });
      const auto how = rng() % 3;
      go.store(true);
      if (how == 0) {
        // Stopped: run() returns; the context is then destroyed unrun.
        io->stop();
      } else if (how == 1) {
        // Let the waker finish first: destruction strictly after the grants.
        waker.join();
      }
      work.reset();
      if (io_count != 0 && how != 0) io->stop();
      for (auto& t : io_runners) t.join();
      io.reset();  // destroys whatever is left: posted completions, queued waiters
      if (waker.joinable()) waker.join();
    }
    // The objects outlive the context and keep working.
    if (sem.stats().waiters != 0) bad.fetch_add(1);
    if (group.count() == 1) group.done();
    source.cancel();
    ch.close();
    while (auto v = ch.try_recv()) book.received(v->id);
    if (sem.available() != capacity) bad.fetch_add(1);
    if (sem.acquire_for(capacity, 0s) != weft::wait_status::ok) {
      bad.fetch_add(1);
    } else {
      sem.release(capacity);
    }
    const auto v = book.check(true);
    if (v.doubled != 0 || v.misreported != 0) bad.fetch_add(1);
    if (handlers_alive.load() != 0) bad.fetch_add(1);
  }
  CHECK(rounds > 0);
  CHECK(bad.load() == 0);
  CHECK(handlers_alive.load() == 0);
  CHECK(counted_item::live.load() == 0);
}

TEST_CASE(
    "asio shutdown: a semaphore destroyed with async waits queued destroys their handlers unrun" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0xde57};

  std::atomic<long> handlers_alive{0};
  std::atomic<int> handlers_run{0};
  asio::io_context io;
  {
    io_threads runner{io, 2};
    const auto until = std::chrono::steady_clock::now() + run_budget() / 2;
    for (std::uint64_t round = 0; round < iteration_cap(5'000); ++round) {
      if (std::chrono::steady_clock::now() >= until) break;
      auto sem = std::make_unique<weft::semaphore>(2);
      sem->acquire(2);
      const int waits = 1 + static_cast<int>(rng() % 8);
      for (int w = 0; w < waits; ++w) {
        weft::async_acquire(
            *sem, 1 + static_cast<std::ptrdiff_t>(rng() % 2),
            asio::bind_executor(io, [&, m = handler_mark{handlers_alive}](
                                        error_code, weft::permit) { handlers_run.fetch_add(1); }));
      }
      CHECK(sem->stats().waiters == static_cast<std::size_t>(waits));
      sem->release(2);  // the first waiters may be granted: hold them before the semaphore goes
      // Granted completions hold permits of this semaphore: run them before it goes.
      std::promise<void> flushed;
      asio::post(io, [&] { flushed.set_value(); });
      flushed.get_future().wait();
      spin_until([&] { return handlers_alive.load() == static_cast<long>(sem->stats().waiters); });
      sem.reset();
      CHECK(handlers_alive.load() == 0);
    }
    runner.stop();  // returns: the destroyed waiters gave their outstanding work back
  }
  CHECK(handlers_alive.load() == 0);
}

// ---------------------------------------------------------------------------
// the pool executor while the pool shuts down

TEST_CASE(
    "asio executor: post, co_spawn and granted async_acquires onto a pool that shuts down drop or "
    "run, never throw" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0xe8ec};

  std::atomic<long> alive{0};
  std::uint64_t rounds = 0;
  std::atomic<std::uint64_t> post_threw{0};
  std::atomic<std::uint64_t> bad{0};
  const auto until = std::chrono::steady_clock::now() + run_budget();
  for (std::uint64_t round = 0; round < iteration_cap(2'000); ++round) {
    if (std::chrono::steady_clock::now() >= until) break;
    ++rounds;
    const std::ptrdiff_t capacity = 1 + static_cast<std::ptrdiff_t>(rng() % 3);
    weft::semaphore sem{capacity};
    std::atomic<int> ran{0};
    std::atomic<int> posted{0};
    {
      weft::worker_pool pool{{.workers = 1 + rng() % 2, .queue_capacity = 2 + rng() % 8}};
      sem.acquire(capacity);
      // Async waiters whose handlers run on the pool.
      const int waiters = static_cast<int>(rng() % 4);
      for (int w = 0; w < waiters; ++w) {
        weft::async_acquire(
            sem, 1,
            asio::bind_executor(pool.executor(),
                                [&, m = handler_mark{alive}](error_code ec, weft::permit p) {
                                  if (ec || p.count() != 1) bad.fetch_add(1);
                                  ran.fetch_add(1);
                                }));
      }
      std::atomic<bool> go{false};
      std::vector<std::thread> threads;
      for (int t = 0; t < 2; ++t) {
        threads.emplace_back([&, t] {
          std::mt19937_64 local{seed + round * 3 + static_cast<std::uint64_t>(t)};
          spin_until([&] { return go.load(); });
          for (int i = 0; i < 16; ++i) {
            try {
              if (local() % 2 == 0) {
                posted.fetch_add(1);
                asio::post(pool.executor(), [&, m = handler_mark{alive}] { ran.fetch_add(1); });
              } else {
                posted.fetch_add(1);
                asio::co_spawn(
                    pool.executor(),
                    [&, m = handler_mark{alive}]() -> asio::awaitable<void> {
                      frame_counter frame;
                      co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
                      ran.fetch_add(1);
                    },
                    asio::detached);
              }
            } catch (const std::exception&) {
              post_threw.fetch_add(1);
            }
          }
        });
      }
      // The releaser grants the async waiters, whose completions go to the pool.
      threads.emplace_back([&] {
        spin_until([&] { return go.load(); });
        sem.release(capacity);
      });
      go.store(true);
      if (rng() % 2 == 0) std::this_thread::yield();
      if (rng() % 2 == 0) {
        pool.shutdown();
      } else {
        pool.shutdown_now();
      }
      for (auto& t : threads) t.join();
    }
    // Every posted function, coroutine and handler ran or was destroyed.
    if (alive.load() != 0) bad.fetch_add(1);
    if (sem.stats().waiters != 0) bad.fetch_add(1);
    if (sem.available() != capacity) bad.fetch_add(1);
  }
  CHECK(rounds > 0);
  CHECK(post_threw.load() == 0);
  CHECK(bad.load() == 0);
  CHECK(alive.load() == 0);
  CHECK(frame_counter::live.load() == 0);
}

namespace {

// A handler bound to a pool whose cancellation slot lookup dawdles: the
// initiating functions look the slot up after they made their waiter and
// before they queue it, so the dawdle widens the moment that a concurrent
// join() must not fall into.
struct dawdling_handler {
  using executor_type = weft::pool_executor;
  using cancellation_slot_type = asio::cancellation_slot;

  executor_type get_executor() const noexcept { return executor; }
  cancellation_slot_type get_cancellation_slot() const noexcept {
    for (int i = 0; i < spins; ++i) std::this_thread::yield();
    return slot;
  }

  template <class... Arguments>
  void operator()(Arguments&&...) {
    ran->fetch_add(1);
  }

  weft::pool_executor executor;
  asio::cancellation_slot slot;
  int spins = 0;
  std::atomic<int>* ran = nullptr;
  handler_mark mark;
};

}  // namespace

// join() shuts the pool's Asio services down; an async wait for a handler
// on the pool may be starting on another thread at that moment. The
// shutdown withdrew what it found listed, and waited for the grant of what
// it could not withdraw: a wait listed but not yet queued made it wait for
// a grant that only came after join() (a hang), and the token's waiter was
// freed under its own start() (a use after free).
TEST_CASE(
    "asio shutdown: async waits started as join() stops the pool's services neither hang it nor "
    "outlive it" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x701d};

  std::atomic<long> alive{0};
  std::atomic<std::uint64_t> bad{0};
  std::uint64_t rounds = 0;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  for (std::uint64_t round = 0; round < iteration_cap(5'000); ++round) {
    if (std::chrono::steady_clock::now() >= until) break;
    ++rounds;
    weft::semaphore sem{1};
    sem.acquire(1);
    weft::wait_group group;
    group.add(1);
    weft::channel<int> empty{1};
    weft::channel<int> full{1};
    full.send(0);
    weft::cancel_source source;
    std::deque<asio::cancellation_signal> signals;
    std::atomic<int> ran{0};
    {
      weft::worker_pool pool{{.workers = 1}};
      auto handler = [&](std::uint64_t spins) {
        return dawdling_handler{pool.executor(), signals.emplace_back().slot(),
                                static_cast<int>(spins), &ran, handler_mark{alive}};
      };
      // The first wait makes the service, before any thread races join().
      weft::async_acquire(sem, 1, handler(0));
      const int ops = 1 + static_cast<int>(rng() % 4);
      std::vector<std::pair<std::uint64_t, std::uint64_t>> plan;  // (kind, spins)
      for (int k = 0; k < ops; ++k) plan.emplace_back(rng() % 5, rng() % 8);
      std::vector<dawdling_handler> handlers;
      for (const auto& [kind, spins] : plan) handlers.push_back(handler(spins));
      std::atomic<bool> go{false};
      std::thread starter([&, delay = rng() % 16] {
        spin_until([&] { return go.load(); });
        for (auto i = delay; i > 0; --i) std::this_thread::yield();
        for (std::size_t k = 0; k < plan.size(); ++k) {
          auto h = std::move(handlers[k]);
          switch (plan[k].first) {
            case 0:
              weft::async_acquire(sem, 1, std::move(h));
              break;
            case 1:
              weft::async_wait(group, std::move(h));
              break;
            case 2:
              weft::async_recv(empty, std::move(h));
              break;
            case 3:
              weft::async_send(full, 1, std::move(h));
              break;
            default:
              weft::async_wait(source.token(), std::move(h));
              break;
          }
        }
      });
      go.store(true);
      for (auto i = rng() % 16; i > 0; --i) std::this_thread::yield();
      pool.shutdown();
      pool.join();  // hung here
      starter.join();
      // Whatever was queued is granted now, to a pool that is gone: each
      // is destroyed, and gives back what the grant gave it.
      sem.release(1);
      group.done();
      empty.close();
      if (!full.try_recv()) bad.fetch_add(1);
      full.close();
      source.cancel();
    }
    if (ran.load() != 0) bad.fetch_add(1);
    if (alive.load() != 0) bad.fetch_add(1);
    if (sem.available() != 1 || sem.stats().waiters != 0) bad.fetch_add(1);
  }
  CHECK(rounds > 0);
  CHECK(bad.load() == 0);
  CHECK(alive.load() == 0);
}

// Asio work that finds the pool's queue full goes past it, to a list the
// workers serve first (weft/worker_pool.hpp). A worker going idle must look
// at that list as it looks at the queue, or work sits there while every
// worker is parked: a round would then never finish, and the test time out.
TEST_CASE("asio executor: work posted past a full queue always runs, while workers park and wake" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x0c4a};

  std::uint64_t rounds = 0;
  std::uint64_t held_rounds = 0;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  for (std::size_t workers = 1; workers <= 3; ++workers) {
    weft::worker_pool pool{{.workers = workers, .queue_capacity = 1 + rng() % 4}};
    const auto pool_until = std::chrono::steady_clock::now() + run_budget() / 3;
    for (std::uint64_t round = 0; round < iteration_cap(3'000); ++round) {
      if (std::chrono::steady_clock::now() >= std::min(until, pool_until) && round > 0) break;
      ++rounds;
      // Some rounds hold every worker first, so the queue fills for sure.
      weft::cancel_source gate;
      const bool held = rng() % 3 == 0;
      if (held) {
        ++held_rounds;
        for (std::size_t w = 0; w < workers; ++w)
          pool.post([token = gate.token()] { token.wait(); });
      }
      std::atomic<int> ran{0};
      const int producers = 1 + static_cast<int>(rng() % 3);
      std::vector<int> posts(static_cast<std::size_t>(producers));
      int total = 0;
      for (auto& count : posts) total += count = 1 + static_cast<int>(rng() % 48);
      std::vector<std::thread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p, local_seed = rng()] {
          std::mt19937_64 local{local_seed};
          for (int i = 0; i < posts[static_cast<std::size_t>(p)]; ++i) {
            // Plain posts wait for room, Asio's go past it; both feed the
            // same workers.
            if (local() % 4 == 0) {
              pool.post([&] { ran.fetch_add(1); });
            } else {
              asio::post(pool.executor(), [&] { ran.fetch_add(1); });
            }
            if (local() % 8 == 0) {
              for (auto n = local() % 64; n != 0; --n) std::this_thread::yield();
            }
          }
        });
      }
      if (held) {
        // More than the queue and the workers' claimed runs can hold while
        // the workers wait on the gate: one at least goes past the queue.
        const auto past_full = pool.queue_capacity() + 7 * workers + 1;
        for (std::size_t i = 0; i < past_full; ++i)
          asio::post(pool.executor(), [&] { ran.fetch_add(1); });
        total += static_cast<int>(past_full);
        for (auto n = rng() % 256; n != 0; --n) std::this_thread::yield();
        gate.cancel();
      }
      for (auto& t : threads) t.join();
      spin_until([&] { return ran.load() == total; });
      // Sometimes a pause long enough for the workers to park before the
      // next round's first post.
      if (rng() % 4 == 0) {
        for (auto n = rng() % 4'000; n != 0; --n) std::this_thread::yield();
      }
    }
    const weft::worker_pool_stats stats = pool.stats();
    CHECK(stats.queued == 0);
    CHECK(stats.over_capacity >= held_rounds);
    held_rounds = 0;
  }
  CHECK(rounds > 0);
}

namespace {
struct coroutine_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs without suspending for `spins` yields, then returns or throws.
asio::awaitable<void> finish_after_spins(std::atomic<bool>& started, std::atomic<bool>& finished,
                                         std::uint64_t spins, bool throws) {
  started = true;
  for (; spins != 0; --spins) std::this_thread::yield();
  finished = true;
  if (throws) throw coroutine_error("the coroutine's own");
  co_return;
}
}  // namespace

// A group's coroutine races its pool's shutdown() or shutdown_now(): a body
// that finished reports its own outcome (its end used to go through a step
// that the shut-down pool dropped, and the group reported weft::rejected);
// a coroutine that never started reports weft::rejected (once the pool is
// joined), or co_spawn threw it.
TEST_CASE(
    "asio task_group: a coroutine racing its pool's shutdown reports its own outcome once it ran" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 rng{seed ^ 0x5e11};

  std::uint64_t rounds = 0;
  std::uint64_t own_outcomes = 0;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  for (; rounds < iteration_cap(2'000) && (rounds == 0 || std::chrono::steady_clock::now() < until);
       ++rounds) {
    const bool now = rng() % 2 == 0;
    const bool throws = rng() % 2 == 0;
    weft::worker_pool pool{{.workers = 1 + rng() % 2}};
    weft::task_group group{pool.executor()};
    std::atomic<bool> started{false};
    std::atomic<bool> finished{false};
    std::atomic<bool> go{false};
    std::thread closer([&, pause = rng() % 64] {
      while (!go.load()) std::this_thread::yield();
      for (auto n = pause; n != 0; --n) std::this_thread::yield();
      if (now) {
        pool.shutdown_now();
      } else {
        pool.shutdown();
      }
    });
    bool spawn_threw = false;
    go = true;
    for (auto n = rng() % 64; n != 0; --n) std::this_thread::yield();
    try {
      weft::co_spawn(group, finish_after_spins(started, finished, rng() % 64, throws));
    } catch (const weft::rejected&) {
      spawn_threw = true;
    }
    closer.join();
    const auto check_own_outcome = [&] {
      if (throws) {
        CHECK_THROWS_AS(group.wait(), coroutine_error);
      } else {
        CHECK_NOTHROW(group.wait());
      }
    };
    // Before join(): a finished body does not wait for the pool.
    if (finished.load()) {
      check_own_outcome();
      ++own_outcomes;
    }
    pool.join();
    if (spawn_threw) {
      CHECK_FALSE(started.load());
      CHECK_NOTHROW(group.wait());
    } else if (!started.load()) {
      CHECK_THROWS_AS(group.wait(), weft::rejected);
    } else {
      REQUIRE(finished.load());  // it never suspends, and join() waited for the workers
      check_own_outcome();
    }
  }
  CHECK(rounds > 0);
  MESSAGE("rounds " << rounds << ", own outcomes " << own_outcomes);
}
