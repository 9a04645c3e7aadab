// SPDX-License-Identifier: BSL-1.0
// weft::task_group against the ways a C++ program otherwise spawns a batch
// of tasks and joins them, on the same work, in the same binary and the same
// run.
//
// Benchmark names are `group_spawn_wait/<impl>/real_time`; the report
// (scripts/bench_report.py) compares impl `weft` with each other impl.
//
// Workload group_spawn_wait: the benchmark thread spawns 1,000 trivial tasks
// (each increments one relaxed atomic counter in static storage, on its own
// cache line) into a group, then waits for the group. items/s counts the
// tasks: 1,000 per iteration. Every impl runs on one worker per hardware
// thread, created before the timed loop (weft's default executor and tbb's
// default arena are process-wide and already warm after the first run).
//
// Contention model: one spawner, hardware-threads consumers, almost no work
// per task: the cost of spawn + join itself (queueing, wake-ups, the join's
// bookkeeping). Joins that run queued tasks on the waiting thread (weft,
// tbb) avoid a wake-up round trip at the end. Wake-up heavy, so noisy
// (±10-50%); std_async is dominated by thread creation.
//
// Impls:
//   weft                   weft::task_group g; g.go(...) x1000; g.wait()
//                          (the default executor: one worker per hardware thread)
//   tbb_task_group         tbb::task_group run() x1000 + wait() (tbb's default
//                          arena: hardware threads, the waiter helps)
//   std_async              1000 x std::async(std::launch::async, ...), then get()
//                          on every future: a thread per task
//   asio_thread_pool_latch boost::asio::thread_pool(hardware threads) + a
//                          std::latch(1000) that each task counts down
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#if defined(WEFT_HAVE_TBB)
#include <tbb/task_group.h>
#endif

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <future>
#include <latch>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::int64_t group_tasks = 1000;

struct alignas(64) task_counter {
  std::atomic<std::uint64_t> value{0};
};
task_counter counter;

inline void tiny_task() noexcept { counter.value.fetch_add(1, std::memory_order_relaxed); }

void finish(benchmark::State& state) {
  const auto expected = static_cast<std::uint64_t>(state.iterations() * group_tasks);
  if (counter.value.load(std::memory_order_acquire) != expected) state.SkipWithError("a task was lost or ran twice");
  state.SetItemsProcessed(state.iterations() * group_tasks);
}

void weft_group(benchmark::State& state) {
  counter.value.store(0, std::memory_order_relaxed);
  for (auto _ : state) {
    weft::task_group g;
    for (std::int64_t i = 0; i < group_tasks; ++i) g.go(&tiny_task);
    g.wait();
  }
  finish(state);
}

#if defined(WEFT_HAVE_TBB)
void tbb_group(benchmark::State& state) {
  counter.value.store(0, std::memory_order_relaxed);
  for (auto _ : state) {
    tbb::task_group g;
    for (std::int64_t i = 0; i < group_tasks; ++i) g.run(&tiny_task);
    g.wait();
  }
  finish(state);
}
#endif

void std_async(benchmark::State& state) {
  counter.value.store(0, std::memory_order_relaxed);
  std::vector<std::future<void>> futures;
  futures.reserve(static_cast<std::size_t>(group_tasks));
  for (auto _ : state) {
    for (std::int64_t i = 0; i < group_tasks; ++i) futures.push_back(std::async(std::launch::async, &tiny_task));
    for (auto& f : futures) f.get();
    futures.clear();
  }
  finish(state);
}

void asio_latch(benchmark::State& state) {
  // Sized as weft's default executor is, by the CPUs this process may use.
  boost::asio::thread_pool pool(weft::hardware_threads());
  counter.value.store(0, std::memory_order_relaxed);
  for (auto _ : state) {
    std::latch done(group_tasks);
    for (std::int64_t i = 0; i < group_tasks; ++i) {
      boost::asio::post(pool, [&done] {
        tiny_task();
        done.count_down();
      });
    }
    done.wait();
  }
  finish(state);
  pool.join();
}

void register_group(const char* impl, void (*body)(benchmark::State&)) {
  benchmark::RegisterBenchmark((std::string("group_spawn_wait/") + impl).c_str(), body)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  register_group("weft", &weft_group);
#if defined(WEFT_HAVE_TBB)
  register_group("tbb_task_group", &tbb_group);
#endif
  register_group("std_async", &std_async);
  register_group("asio_thread_pool_latch", &asio_latch);

  return weft_bench::run_benchmarks(argc, argv);
}
