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
//   registry_pool_pinned/producer_cpu:C  as registry_pool_tiny_tasks with one
//                                        worker, the producer pinned to CPU C
//                                        and the worker to the other of CPUs
//                                        0 and 1 (Linux, 2 CPUs or more)
//   registry_pool_one_cpu                as registry_pool_tiny_tasks with one
//                                        worker, the producer and the worker
//                                        both pinned to CPU 0 (Linux): the
//                                        producer fills the queue, then the
//                                        worker drains it
//
// Why pinned rows: on the 2-vCPU machines this was measured on, the two
// vCPUs are at times not alike (for hours, a producer on vCPU 0 posted 1.5x
// as fast as one on vCPU 1; later, both alike). Unpinned, each process
// settles on one placement by chance, so the ratios between impls, which
// come from different runs (and, for compiled_out, a different process),
// swing by more than tracking costs. Each pinned row compares impls on the
// same placement.
//
// Why one CPU: with two threads on two cores, throughput is set by whichever
// thread is slower at the moment and by how fast cache lines cross between
// the cores, which on a VM changes from minute to minute. On one CPU, no
// line crosses, and the time per task is the producer's and the worker's CPU
// time added up, the cost tracking adds included: in back-to-back runs each
// impl's figure here moved by 1-5%, where the two-core rows swung by 20-50%
// (runs some minutes apart can still differ by 25%).
#include <weft/registry.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

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

// The timed loop of both pool workloads.
void post_tiny_tasks(benchmark::State& state, weft::worker_pool& pool) {
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    for (std::int64_t i = 0; i < pool_tasks; ++i) pool.post(&tiny_task);
    wait_for_count(static_cast<std::uint64_t>(pool_tasks));
  }
  if (counter.value.load() != static_cast<std::uint64_t>(pool_tasks)) state.SkipWithError("a task was lost");
  state.SetItemsProcessed(state.iterations() * pool_tasks);
}

template <bool Tracking>
void pool_tiny_tasks(benchmark::State& state) {
  const tracking_as tracking{Tracking};
  weft::worker_pool pool{{.workers = static_cast<std::size_t>(state.range(0)), .queue_capacity = 1024}};
  post_tiny_tasks(state, pool);
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

#if defined(__linux__)
bool pin_this_thread(int cpu) noexcept {
  cpu_set_t only{};
  CPU_ZERO(&only);
  CPU_SET(cpu, &only);
  return pthread_setaffinity_np(pthread_self(), sizeof only, &only) == 0;
}

// Pins the calling thread to `cpu` while it lives; restores the old mask.
class pinned_to {
 public:
  explicit pinned_to(int cpu) {
    pthread_getaffinity_np(pthread_self(), sizeof previous_, &previous_);
    pinned_ = pin_this_thread(cpu);
  }
  ~pinned_to() { pthread_setaffinity_np(pthread_self(), sizeof previous_, &previous_); }
  pinned_to(const pinned_to&) = delete;
  pinned_to& operator=(const pinned_to&) = delete;
  bool pinned() const noexcept { return pinned_; }

 private:
  cpu_set_t previous_{};
  bool pinned_ = false;
};

// A one-worker pool fed from CPU `producer_cpu` and run on CPU `worker_cpu`.
template <bool Tracking>
void pool_pinned_to(benchmark::State& state, int producer_cpu, int worker_cpu) {
  const tracking_as tracking{Tracking};
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1024}};
  const pinned_to producer{producer_cpu};
  // The worker pins itself for good: the pool is this benchmark's own.
  const bool worker_pinned = pool.submit([worker_cpu] { return pin_this_thread(worker_cpu); }).get();
  if (!producer.pinned() || !worker_pinned) {
    state.SkipWithError("could not pin the threads to their CPUs");
    return;
  }
  post_tiny_tasks(state, pool);
}

template <bool Tracking>
void pool_pinned(benchmark::State& state) {
  const auto producer_cpu = static_cast<int>(state.range(0));
  pool_pinned_to<Tracking>(state, producer_cpu, 1 - producer_cpu);
}

template <bool Tracking>
void pool_one_cpu(benchmark::State& state) {
  pool_pinned_to<Tracking>(state, 0, 0);
}
#endif

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

template <bool Tracking>
void register_pinned([[maybe_unused]] const std::string& impl) {
#if defined(__linux__)
  benchmark::RegisterBenchmark(("registry_pool_one_cpu/" + impl).c_str(), &pool_one_cpu<Tracking>)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.2);
  if (std::thread::hardware_concurrency() < 2) return;
  benchmark::RegisterBenchmark(("registry_pool_pinned/" + impl).c_str(), &pool_pinned<Tracking>)
      ->ArgName("producer_cpu")
      ->Arg(0)
      ->Arg(1)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.2);
#endif
}

}  // namespace

int main(int argc, char** argv) {
#if defined(WEFT_NO_REGISTRY)
  register_impl("compiled_out", &pool_tiny_tasks<false>, &group_spawn_wait<false>);
  register_pinned<false>("compiled_out");
#else
  register_impl("weft", &pool_tiny_tasks<true>, &group_spawn_wait<true>);
  register_impl("tracking_off", &pool_tiny_tasks<false>, &group_spawn_wait<false>);
  register_pinned<true>("weft");
  register_pinned<false>("tracking_off");
#endif
  return weft_bench::run_benchmarks(argc, argv);
}
