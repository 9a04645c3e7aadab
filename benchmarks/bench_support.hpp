// SPDX-License-Identifier: BSL-1.0
// What weft's benchmark executables share: their main() (run_benchmarks),
// the gated loop of the multi-threaded ones, and the bounded queue a C++
// user writes by hand (the alternative in chan_bench and pipeline_bench).
//
// Why the gates: with ->Threads(n), Google Benchmark times each thread from
// when *that thread* leaves its start barrier to when *it* finishes, and
// averages. When threads outnumber cores (8 on 2) a thread may not run for a
// while after the barrier opens, and a convoy can run the threads one after
// another; each then times only its own, uncontended, stretch, and the
// average reports up to T times the real throughput (we saw 430M/s for a
// capacity-1 semaphore at 8 threads). So inside the timed region every thread
// waits at a start gate until all have started timing, and at an end gate
// until all have finished their iterations: every thread's window then spans
// the whole concurrent phase, and items/s is total items / wall time.
#pragma once

#include <benchmark/benchmark.h>

#include <barrier>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace weft_bench {

struct run_gates {
  std::optional<std::barrier<>> start;
  std::optional<std::barrier<>> end;
};
inline run_gates gates;

// Runs `op` once per iteration, between the gates. Thread 0 arms the gates
// before the loop (Google Benchmark's start barrier publishes them).
template <class Op>
void gated_loop(benchmark::State& state, Op op) {
  if (state.thread_index() == 0) {
    gates.start.emplace(state.threads());
    gates.end.emplace(state.threads());
  }
  const benchmark::IterationCount last = state.max_iterations;
  benchmark::IterationCount done = 0;
  for (auto _ : state) {
    if (done == 0) gates.start->arrive_and_wait();
    op();
    if (++done == last) gates.end->arrive_and_wait();
  }
  state.SetItemsProcessed(state.iterations());  // per thread; Google Benchmark sums them
}

// Runs the benchmarks registered so far; main() returns what it returns.
// The process is made multi-threaded first, as a service is: while a
// process has only ever had one thread, glibc's malloc and mutex and
// libstdc++ skip some synchronisation (shared_ptr's counts,
// std::stop_callback's semaphore; a std::mutex lock+unlock takes 5 ns then,
// 14 ns after), which would flatter the alternatives in the single-threaded
// benchmarks.
inline int run_benchmarks(int argc, char** argv) {
  std::thread([] {}).join();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

// The bounded blocking queue people write by hand: a mutex, two condition
// variables and a std::deque, with close().
template <class T>
class mutex_condvar_queue {
 public:
  explicit mutex_condvar_queue(std::size_t capacity) : capacity_(capacity) {}

  // False if closed.
  bool push(T value) {
    {
      std::unique_lock lock(mutex_);
      not_full_.wait(lock, [this] { return closed_ || items_.size() < capacity_; });
      if (closed_) return false;
      items_.push_back(std::move(value));
    }
    not_empty_.notify_one();
    return true;
  }

  // Empty once closed and drained.
  std::optional<T> pop() {
    std::optional<T> value;
    {
      std::unique_lock lock(mutex_);
      not_empty_.wait(lock, [this] { return closed_ || !items_.empty(); });
      if (items_.empty()) return value;
      value.emplace(std::move(items_.front()));
      items_.pop_front();
    }
    not_full_.notify_one();
    return value;
  }

  void close() {
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
    }
    not_full_.notify_all();
    not_empty_.notify_all();
  }

 private:
  const std::size_t capacity_;
  std::mutex mutex_;
  std::condition_variable not_full_;
  std::condition_variable not_empty_;
  std::deque<T> items_;
  bool closed_ = false;
};

}  // namespace weft_bench
