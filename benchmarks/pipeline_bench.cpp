// SPDX-License-Identifier: BSL-1.0
// weft::pipeline against the staged pipelines a C++ service would otherwise
// build, on the same work, in the same binary and the same run.
//
// Benchmark names are `pipeline_3stage/<impl>/real_time`; the report
// (scripts/bench_report.py) groups them by workload (`pipeline_3stage`) and
// compares impl `weft` with each other impl.
//
// Workload pipeline_3stage (each iteration builds a fresh pipeline and runs
// it to the end):
//   A source hands on 1,000,000 std::int64_t values 0 .. 999,999, read from
//   a std::vector filled once before the timed loop (the same vector for
//   every impl). Stage 1 computes x + 1, stage 2 x * 2, and the sink adds
//   each value to a sum. Between two neighbours there are at most 256 items
//   in flight: a bounded queue of 256 in front of each stage and of the sink
//   (weft, mutex_condvar_queues), or 256 tokens (tbb).
//
// Contention model: almost no work per item (an add, a multiply, an add), so
// nothing but the cost of handing each item from stage to stage, three times
// per item. Every stage is as fast as its neighbours, so the queues swing
// between full and empty and the stages block and wake each other often:
// wake-up heavy, so noisy (±10-50%). Four threads (source, two stages, sink)
// for weft and the hand-written version, whatever the core count: on a small
// machine that is oversubscription, and the scheduler's share shows.
//
// What is timed: everything a user pays per run. weft's run() creates its
// own worker_pool with one worker per stage task and joins it before
// returning; the hand-written version starts and joins its four threads;
// tbb reuses its global workers (how tbb is used: there is no per-run pool).
// Building the weft pipeline (a few allocations) is timed too.
//
// After each iteration the benchmark checks that the sum is exactly
// sum over i of (i + 1) * 2 = 1,000,000 * 1,000,001; if not (or if run()
// threw), it reports an error (SkipWithError) instead of a number.
//
// Impls:
//   weft                   weft::pipeline(values, "pipeline_3stage")
//                          .stage(x + 1, {.buffer = 256})
//                          .stage(x * 2, {.buffer = 256})
//                          .sink(sum += x, {.buffer = 256}).run():
//                          one worker per stage (serial stages, as tbb's
//                          serial filters), unordered (with one worker, the
//                          order is kept anyway)
//   weft_parallel          the same with {.workers = 2} (unordered) on the two
//                          middle stages: 6 tasks; the sum does not depend
//                          on the order
//   tbb_parallel_pipeline  tbb::parallel_pipeline with 256 live tokens and
//                          four serial_in_order filters (an input filter
//                          reading the vector, x + 1, x * 2, an output filter
//                          summing), in tbb's default arena (one slot per
//                          hardware thread; the calling thread takes part)
//                          (only with oneTBB: WEFT_HAVE_TBB)
//   mutex_condvar_queues   the hand-written version: a producer thread, two
//                          stage threads and a sink thread connected by three
//                          bounded blocking queues of 256 (std::mutex, a
//                          std::deque, a not-full and a not-empty
//                          std::condition_variable, notify_one on every push
//                          and pop, and close(): each stage closes its output
//                          when its input is closed and drained)
#include <weft/pipeline.hpp>

#if defined(WEFT_HAVE_TBB)
#include <tbb/parallel_pipeline.h>
#endif

#include <benchmark/benchmark.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::int64_t total_items = 1'000'000;
constexpr std::size_t buffer = 256;

// sum over i in [0, n) of (i + 1) * 2 = n * (n + 1).
constexpr std::int64_t expected_sum = total_items * (total_items + 1);

// 0 .. total_items - 1: the source of every impl, filled before timing.
std::vector<std::int64_t> make_values() {
  std::vector<std::int64_t> values(static_cast<std::size_t>(total_items));
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<std::int64_t>(i);
  return values;
}

constexpr std::int64_t stage1(std::int64_t x) noexcept { return x + 1; }
constexpr std::int64_t stage2(std::int64_t x) noexcept { return x * 2; }

// False (and the benchmark marked as failed) if `sum` is wrong.
bool check_sum(benchmark::State& state, std::int64_t sum) {
  if (sum == expected_sum) return true;
  const std::string error =
      "sum " + std::to_string(sum) + ", expected " + std::to_string(expected_sum) + ": lost or duplicated items";
  state.SkipWithError(error.c_str());
  return false;
}

void finish(benchmark::State& state) { state.SetItemsProcessed(state.iterations() * total_items); }

// ---------------------------------------------------------------------------
// weft

// `middle_workers` workers on each of the two middle stages.
void weft_pipeline(benchmark::State& state, std::size_t middle_workers) {
  const std::vector<std::int64_t> values = make_values();
  for (auto _ : state) {
    std::int64_t sum = 0;  // one sink worker: no race
    try {
      auto run = weft::pipeline(values, "pipeline_3stage")
                     .stage(&stage1, {.workers = middle_workers, .buffer = buffer, .name = "x+1"})
                     .stage(&stage2, {.workers = middle_workers, .buffer = buffer, .name = "x*2"})
                     .sink([&sum](std::int64_t x) { sum += x; }, {.buffer = buffer, .name = "sum"});
      run.run();
    } catch (const std::exception& e) {
      state.SkipWithError((std::string("run() threw: ") + e.what()).c_str());
      break;
    }
    if (!check_sum(state, sum)) break;
  }
  finish(state);
}

void weft_serial(benchmark::State& state) { weft_pipeline(state, 1); }
void weft_parallel(benchmark::State& state) { weft_pipeline(state, 2); }

// ---------------------------------------------------------------------------
// oneTBB

#if defined(WEFT_HAVE_TBB)
void tbb_pipeline(benchmark::State& state) {
  const std::vector<std::int64_t> values = make_values();
  for (auto _ : state) {
    std::int64_t sum = 0;
    std::size_t next = 0;
    try {
      tbb::parallel_pipeline(
          buffer,
          tbb::make_filter<void, std::int64_t>(tbb::filter_mode::serial_in_order,
                                               [&](tbb::flow_control& control) -> std::int64_t {
                                                 if (next == values.size()) {
                                                   control.stop();
                                                   return 0;
                                                 }
                                                 return values[next++];
                                               }) &
              tbb::make_filter<std::int64_t, std::int64_t>(tbb::filter_mode::serial_in_order, &stage1) &
              tbb::make_filter<std::int64_t, std::int64_t>(tbb::filter_mode::serial_in_order, &stage2) &
              tbb::make_filter<std::int64_t, void>(tbb::filter_mode::serial_in_order,
                                                   [&sum](std::int64_t x) { sum += x; }));
    } catch (const std::exception& e) {
      state.SkipWithError((std::string("parallel_pipeline threw: ") + e.what()).c_str());
      break;
    }
    if (!check_sum(state, sum)) break;
  }
  finish(state);
}
#endif

// ---------------------------------------------------------------------------
// Hand-written: threads and bounded blocking queues.

using blocking_queue = weft_bench::mutex_condvar_queue<std::int64_t>;

// Pops from `in` until it is closed and drained, pushes f(v) to `out`, then
// closes `out`.
template <class F>
void relay(blocking_queue& in, blocking_queue& out, F f) {
  while (std::optional<std::int64_t> v = in.pop()) out.push(f(*v));
  out.close();
}

void mutex_condvar_queues(benchmark::State& state) {
  const std::vector<std::int64_t> values = make_values();
  for (auto _ : state) {
    std::int64_t sum = 0;
    blocking_queue to_stage1{buffer};
    blocking_queue to_stage2{buffer};
    blocking_queue to_sink{buffer};
    std::thread producer([&] {
      for (const std::int64_t v : values) to_stage1.push(v);
      to_stage1.close();
    });
    std::thread first([&] { relay(to_stage1, to_stage2, &stage1); });
    std::thread second([&] { relay(to_stage2, to_sink, &stage2); });
    std::thread sink([&] {
      while (std::optional<std::int64_t> v = to_sink.pop()) sum += *v;
    });
    producer.join();
    first.join();
    second.join();
    sink.join();
    if (!check_sum(state, sum)) break;
  }
  finish(state);
}

// ---------------------------------------------------------------------------
// Registration: `pipeline_3stage/<impl>/real_time`.

void register_impl(const char* impl, void (*function)(benchmark::State&)) {
  benchmark::RegisterBenchmark((std::string("pipeline_3stage/") + impl).c_str(), function)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      // One iteration is 1,000,000 items through three hand-offs (tens to
      // hundreds of ms): a short minimum keeps the slow cases at one or two
      // iterations per repetition.
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  register_impl("weft", &weft_serial);
  register_impl("weft_parallel", &weft_parallel);
#if defined(WEFT_HAVE_TBB)
  register_impl("tbb_parallel_pipeline", &tbb_pipeline);
#endif
  register_impl("mutex_condvar_queues", &mutex_condvar_queues);

  return weft_bench::run_benchmarks(argc, argv);
}
