// SPDX-License-Identifier: BSL-1.0
// The timed loop of the multi-threaded benchmarks (semaphore, object_pool,
// resource_pool), between two gates.
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
#include <optional>

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

}  // namespace weft_bench
