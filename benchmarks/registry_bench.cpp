// SPDX-License-Identifier: BSL-1.0
// What the task registry costs: the tiny-task pool and the group spawn/wait
// workloads of pool_bench and group_bench, with tracking on (impl `weft`,
// the default), switched off at run time (impl `tracking_off`), and
// compiled out (impl `compiled_out`).
//
// Compiled out means built with WEFT_NO_REGISTRY, which changes weft's
// headers, so it cannot share a binary with the other two: CMake builds this
// file a second time as registry_bench__no_registry, and
// scripts/bench_report.py files both under the suite `registry`. The
// report's ratios are weft (tracking on) / each of the other two; the cost
// of switching tracking off at run time is tracking_off / compiled_out,
// which the closing note and the README compute from the same table.
//
// Workloads (as in pool_bench.cpp and group_bench.cpp, see there):
//   registry_pool_tiny_tasks/workers:N   one producer posts 1,000,000 tasks
//                                        that each increment an atomic to a
//                                        pool of N workers, then waits
//   registry_group_spawn_wait            1,000 trivial tasks go()'d into a
//                                        task_group on the default executor,
//                                        then wait()
#include <weft/registry.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "bench_support.hpp"

namespace {

constexpr std::int64_t pool_tasks = 1'000'000;
constexpr std::int64_t group_tasks = 1000;

struct alignas(64) task_counter {
  std::atomic<std::uint64_t> value{0};
};
task_counter counter;

inline void tiny_task() noexcept { counter.value.fetch_add(1, std::memory_order_relaxed); }

void wait_for_count(std::uint64_t target) noexcept {
  for (int i = 0; counter.value.load(std::memory_order_acquire) < target; ++i) {
    if (i >= 512) std::this_thread::yield();
  }
}

// Tracking as the impl wants it, restored afterwards.
class tracking_as {
 public:
  explicit tracking_as(bool on) : was_(weft::registry::enabled()) { weft::registry::set_enabled(on); }
  ~tracking_as() { weft::registry::set_enabled(was_); }
  tracking_as(const tracking_as&) = delete;
  tracking_as& operator=(const tracking_as&) = delete;

 private:
  bool was_;
};

template <bool Tracking>
void pool_tiny_tasks(benchmark::State& state) {
  const tracking_as tracking{Tracking};
  weft::worker_pool pool{{.workers = static_cast<std::size_t>(state.range(0)), .queue_capacity = 1024}};
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    for (std::int64_t i = 0; i < pool_tasks; ++i) pool.post(&tiny_task);
    wait_for_count(static_cast<std::uint64_t>(pool_tasks));
  }
  if (counter.value.load() != static_cast<std::uint64_t>(pool_tasks)) state.SkipWithError("a task was lost");
  state.SetItemsProcessed(state.iterations() * pool_tasks);
}

template <bool Tracking>
void group_spawn_wait(benchmark::State& state) {
  const tracking_as tracking{Tracking};
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    weft::task_group group;
    for (std::int64_t i = 0; i < group_tasks; ++i) group.go(&tiny_task);
    group.wait();
  }
  if (counter.value.load() != static_cast<std::uint64_t>(group_tasks)) state.SkipWithError("a task was lost");
  state.SetItemsProcessed(state.iterations() * group_tasks);
}

void register_impl(const std::string& impl, void (*pool)(benchmark::State&), void (*group)(benchmark::State&)) {
  benchmark::RegisterBenchmark(("registry_pool_tiny_tasks/" + impl).c_str(), pool)
      ->ArgName("workers")
      ->Arg(1)
      ->Arg(2)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.2);
  benchmark::RegisterBenchmark(("registry_group_spawn_wait/" + impl).c_str(), group)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
#if defined(WEFT_NO_REGISTRY)
  register_impl("compiled_out", &pool_tiny_tasks<false>, &group_spawn_wait<false>);
#else
  register_impl("weft", &pool_tiny_tasks<true>, &group_spawn_wait<true>);
  register_impl("tracking_off", &pool_tiny_tasks<false>, &group_spawn_wait<false>);
#endif
  return weft_bench::run_benchmarks(argc, argv);
}
