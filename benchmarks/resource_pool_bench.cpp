// SPDX-License-Identifier: BSL-1.0
// weft::resource_pool<R> against the connection pool a C++ service would
// otherwise write by hand, on the same work, in the same binary and the same
// run.
//
// Benchmark names are `resource_pool_acquire_release/<impl>/real_time/
// threads:T`; the report (scripts/bench_report.py) groups them by workload
// and thread count (`resource_pool_acquire_release/threads:T`) and compares
// impl `weft` with each other impl.
//
// Workload resource_pool_acquire_release: T threads (1, 4, 8) share one pool
// of at most 4 resources (max_open 4, all 4 may stay idle). Each thread
// loops: acquire a resource, do about 300 ns of arithmetic on it (the
// same dependent multiply-add chain for every impl, on the resource's own
// state, so the work needs the resource), release it. One item is one
// acquire + work + release; items/s is the total for all threads.
// The resource is a fake connection: a small struct that open() makes at
// once and close() forgets. No validate, no reset, no lifetimes.
//
// Contention model:
//   threads:1  uncontended: a resource is always idle; the cost of the fast
//              path (lock, take, give back) next to the work.
//   threads:4  as many threads as resources: nobody waits for a resource,
//              but the threads contend on the pool's own state.
//   threads:8  twice as many threads as resources, and every thread wants a
//              resource all the time (no work outside the lease): the pool is
//              always exhausted, and half the threads are always waiting.
//              That is the pessimistic model (a service whose database is
//              the bottleneck); it rewards pools that let a thread that has
//              just released take a resource straight back (barging) over
//              pools that hand it to the longest waiter (fair), because a
//              hand-off costs a wake-up. High items/s here says nothing
//              about tail latency or starvation. On a 2-core machine 8
//              threads also oversubscribe the cores (preemption while
//              holding a resource). Wake-up heavy: noisy (±10-50%).
//
// Impls (each an adapter with acquire(), resource(handle) and
// release(handle), so every impl runs exactly the same benchmark body):
//   weft           weft::resource_pool<fake_connection> with max_open 4 and
//                  max_idle 4 (the default max_idle, 2, would close and
//                  reopen resources, which the hand-written pool never does)
//   mutex_condvar  the pool people write by hand: std::mutex, a
//                  std::vector of idle resources, one
//                  std::condition_variable; acquire takes an idle one, opens
//                  one (outside the lock) while fewer than max_open exist,
//                  else waits on the condvar; release pushes the resource
//                  back and notify_one()s after unlocking. Barging: a
//                  releasing thread may take the resource straight back
//   no_pool        threads:1 only: the work alone on a resource of its own,
//                  no pool at all. The ceiling: weft / no_pool says what
//                  share of the time goes to the pool when nobody waits
//
// Multi-threaded timing: every thread waits at a start gate until all have
// started timing, and at an end gate until all have finished their
// iterations, so each thread's timed window spans the whole concurrent phase
// and items/s is total items / wall time (see bench_support.hpp for why).
// After each run, the benchmark checks that no impl opened more than
// max_open resources.
#include <weft/resource_pool.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::size_t max_open = 4;

// The pooled resource: what a connection handle looks like to a pool, a
// small movable value.
struct fake_connection {
  std::uint64_t id = 0;
  std::uint64_t state = 0;
};

// How many resources an impl has opened in the current run (never more than
// max_open, or the run reports an error). Its own cache line: only open()
// touches it.
struct alignas(64) open_counter {
  std::atomic<std::uint64_t> value{0};
};
open_counter opened;

fake_connection open_connection() {
  const std::uint64_t id = opened.value.fetch_add(1, std::memory_order_relaxed) + 1;
  return fake_connection{id, id};
}

void close_connection(fake_connection&) noexcept {}

// The work done while holding a resource: a chain of 256 dependent
// multiply-adds (64-bit LCG steps) on the resource's own state, about 300 ns
// in all (310 ns on a 2.1 GHz VM; no_pool shows it). Identical for every
// impl.
constexpr int work_steps = 64 * 4;

void use(fake_connection& c) noexcept {
  std::uint64_t x = c.state;
  for (int i = 0; i < work_steps; ++i) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  benchmark::DoNotOptimize(x);
  c.state = x;
}

// ---------------------------------------------------------------------------
// Adapters: default-constructible pools of at most max_open resources;
// `handle acquire()`, `static fake_connection& resource(handle&)` and
// `void release(handle&&)`.

struct weft_impl {
  static constexpr const char* name = "weft";
  using handle = weft::resource_pool<fake_connection>::lease;
  handle acquire() { return pool.acquire(); }
  static fake_connection& resource(handle& h) { return *h; }
  void release(handle&& h) { h.release(); }

  weft::resource_pool<fake_connection> pool{
      weft::resource_pool_options{.max_open = max_open, .max_idle = max_open},
      &open_connection, &close_connection};
};

// The hand-written pool.
class mutex_condvar_pool {
 public:
  mutex_condvar_pool() { idle_.reserve(max_open); }
  mutex_condvar_pool(const mutex_condvar_pool&) = delete;
  mutex_condvar_pool& operator=(const mutex_condvar_pool&) = delete;
  ~mutex_condvar_pool() {
    for (fake_connection& c : idle_) close_connection(c);
  }

  fake_connection acquire() {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (!idle_.empty()) {
        fake_connection c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
      if (open_ < max_open) {
        ++open_;
        lock.unlock();
        try {
          return open_connection();
        } catch (...) {
          lock.lock();
          --open_;
          lock.unlock();
          returned_.notify_one();  // the slot is free again
          throw;
        }
      }
      returned_.wait(lock);
    }
  }

  void release(fake_connection c) {
    {
      std::lock_guard lock(mutex_);
      idle_.push_back(std::move(c));
    }
    returned_.notify_one();
  }

 private:
  std::mutex mutex_;
  std::condition_variable returned_;
  std::vector<fake_connection> idle_;
  std::size_t open_ = 0;  // idle + in use
};

struct mutex_condvar_impl {
  static constexpr const char* name = "mutex_condvar";
  using handle = fake_connection;
  handle acquire() { return pool.acquire(); }
  static fake_connection& resource(handle& h) { return h; }
  void release(handle&& h) { pool.release(std::move(h)); }
  mutex_condvar_pool pool;
};

using weft_bench::gated_loop;

// Shared by the threads of one run: thread 0 creates it before the timed loop
// and destroys it after; Google Benchmark's barriers at the start and the end
// of the loop order that against the other threads.
template <class Impl>
struct shared_impl {
  static inline std::optional<Impl> instance;
};

template <class Impl>
void resource_pool_acquire_release(benchmark::State& state) {
  auto& shared = shared_impl<Impl>::instance;
  if (state.thread_index() == 0) {
    opened.value.store(0, std::memory_order_relaxed);
    shared.emplace();
  }
  gated_loop(state, [&] {
    typename Impl::handle h = shared->acquire();
    use(Impl::resource(h));
    shared->release(std::move(h));
  });
  if (state.thread_index() == 0) {
    shared.reset();
    if (opened.value.load(std::memory_order_relaxed) > max_open)
      state.SkipWithError("the pool opened more than max_open resources");
  }
}

// Not a pool: the work alone, on one thread, with one resource that nobody
// else uses (the ceiling for threads:1).
void no_pool(benchmark::State& state) {
  fake_connection c = open_connection();
  gated_loop(state, [&] { use(c); });
}

// ---------------------------------------------------------------------------
// Registration: `resource_pool_acquire_release/<impl>`, then /real_time/threads:T.

template <class Impl>
void register_impl() {
  benchmark::RegisterBenchmark((std::string("resource_pool_acquire_release/") + Impl::name).c_str(),
                               &resource_pool_acquire_release<Impl>)
      ->Threads(1)
      ->Threads(4)
      ->Threads(8)
      ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_impl<weft_impl>();
  register_impl<mutex_condvar_impl>();
  benchmark::RegisterBenchmark("resource_pool_acquire_release/no_pool", &no_pool)->Threads(1)->UseRealTime();

  return weft_bench::run_benchmarks(argc, argv);
}
