// SPDX-License-Identifier: BSL-1.0
// weft::parallel_map and weft::gather against the ways a C++ program
// otherwise fans out a few small computations and gathers their results, on
// the same work, in the same binary and the same run.
//
// Benchmark names are `fan_out_fan_in/<impl>/real_time`; the report
// (scripts/bench_report.py) compares impl `weft` (parallel_map) with each
// other impl, weft_gather included.
//
// Workload fan_out_fan_in: 16 calls of a small computation (a chain of
// xorshift steps seeded by the call's index and a salt the compiler cannot
// see, about 150-200 ns of dependent arithmetic, no memory traffic), their
// 16 results summed on the calling thread. items/s counts the calls: 16 per
// iteration. Every parallel impl runs on one worker per hardware thread,
// created before the timed loop.
//
// Contention model: a request handler that fans out a handful of short
// calls and needs all their results before it can go on. Each call is about
// as long as a wake-up takes, so this measures the overhead of the fan-out
// and the join more than any parallel speed-up: a join that parks while its
// calls sit in a queue pays for two wake-ups per round; one that runs calls
// itself (weft, tbb) may pay for none. `serial` is the floor to beat. Wake-up
// heavy, so noisy (±10-50%).
//
// Impls:
//   weft                   weft::parallel_map over a std::array of the 16 indices
//   weft_gather            weft::gather with 16 lambdas (a std::tuple of 16 results)
//   std_async              16 x std::async(std::launch::async, ...) + get()
//   tbb_task_group         tbb::task_group: 16 run() writing into an array, wait()
//   asio_thread_pool_latch boost::asio::thread_pool(hardware threads): 16 posts
//                          writing into an array, a std::latch(16) to join
//   serial                 the same 16 calls in a loop on the calling thread
//
// Workload map_cheap_elements: a map over 100,000 std::uint64_t whose call
// is one multiply-add, into a new vector. items/s counts the elements. The
// calls cost nothing, so this measures how a parallel map hands out the
// elements: one shared read-modify-write per element would move a cache
// line between cores per element.
//
// Impls:
//   weft                   weft::parallel_map (the default executor)
//   tbb_parallel_for       tbb::parallel_for over a blocked_range into a
//                          vector of the size (tbb's default arena)
//   serial                 a loop that pushes into a reserved vector
#include <weft/fan.hpp>
#include <weft/worker_pool.hpp>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#if defined(WEFT_HAVE_TBB)
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_group.h>
#endif

#include <benchmark/benchmark.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <future>
#include <latch>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::size_t fan_width = 16;
// Dependent xorshift steps per call: 112 took about 165 ns of CPU time per
// call on the 2-core x86-64 machine this was written on (the `serial` row
// shows it: 16 calls per iteration).
constexpr int steps = 112;

using indices_t = std::array<std::size_t, fan_width>;
constexpr indices_t indices = [] {
  indices_t a{};
  for (std::size_t i = 0; i < fan_width; ++i) a[i] = i;
  return a;
}();

// The salt is laundered through DoNotOptimize at the start of every
// benchmark, so the compiler can neither fold the calls nor hoist them out of
// the timed loop.
std::uint64_t salt = 0x9e3779b97f4a7c15ULL;

std::uint64_t compute(std::size_t index) noexcept {
  std::uint64_t x = salt ^ (static_cast<std::uint64_t>(index) * 0xbf58476d1ce4e5b9ULL + 1);
  for (int i = 0; i < steps; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
  }
  // Kept: the result must exist, and (a memory clobber) the next call must
  // read the salt again, so no call is hoisted out of a timed loop.
  benchmark::DoNotOptimize(x);
  return x;
}

void launder_salt() { benchmark::DoNotOptimize(salt); }

void finish(benchmark::State& state, std::uint64_t sum) {
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(fan_width));
}

void weft_parallel_map(benchmark::State& state) {
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    auto results = weft::parallel_map(indices, [](const std::size_t& i) { return compute(i); });
    sum += std::accumulate(results.begin(), results.end(), std::uint64_t{0});
  }
  finish(state, sum);
}

template <std::size_t... I>
auto gather_all(std::index_sequence<I...>) {
  return weft::gather(weft::cancel_token{}, [] { return compute(I); }...);
}

void weft_gather(benchmark::State& state) {
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    auto results = gather_all(std::make_index_sequence<fan_width>{});
    sum += std::apply([](auto... r) { return (std::uint64_t{0} + ... + r); }, results);
  }
  finish(state, sum);
}

void std_async(benchmark::State& state) {
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    std::array<std::future<std::uint64_t>, fan_width> futures;
    for (std::size_t i = 0; i < fan_width; ++i) futures[i] = std::async(std::launch::async, &compute, i);
    for (auto& f : futures) sum += f.get();
  }
  finish(state, sum);
}

#if defined(WEFT_HAVE_TBB)
void tbb_group(benchmark::State& state) {
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    std::array<std::uint64_t, fan_width> results{};
    tbb::task_group g;
    for (std::size_t i = 0; i < fan_width; ++i) g.run([&results, i] { results[i] = compute(i); });
    g.wait();
    sum += std::accumulate(results.begin(), results.end(), std::uint64_t{0});
  }
  finish(state, sum);
}
#endif

void asio_latch(benchmark::State& state) {
  // Sized as weft's default executor is, by the CPUs this process may use.
  boost::asio::thread_pool pool(weft::hardware_threads());
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    std::array<std::uint64_t, fan_width> results{};
    std::latch done(static_cast<std::ptrdiff_t>(fan_width));
    for (std::size_t i = 0; i < fan_width; ++i) {
      boost::asio::post(pool, [&results, &done, i] {
        results[i] = compute(i);
        done.count_down();
      });
    }
    done.wait();
    sum += std::accumulate(results.begin(), results.end(), std::uint64_t{0});
  }
  finish(state, sum);
  pool.join();
}

void serial(benchmark::State& state) {
  launder_salt();
  std::uint64_t sum = 0;
  for (auto _ : state) {
    for (std::size_t i : indices) sum += compute(i);
  }
  finish(state, sum);
}

constexpr std::size_t map_size = 100'000;

std::vector<std::uint64_t> map_input() {
  std::vector<std::uint64_t> input(map_size);
  std::iota(input.begin(), input.end(), salt);
  return input;
}

inline std::uint64_t cheap(std::uint64_t x) noexcept { return x * 0x9e3779b97f4a7c15ULL + 1; }

void finish_map(benchmark::State& state, const std::vector<std::uint64_t>& last) {
  if (last.size() != map_size || last.back() != cheap(map_input().back())) state.SkipWithError("a wrong result");
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(map_size));
}

void weft_map_cheap(benchmark::State& state) {
  launder_salt();
  const auto input = map_input();
  std::vector<std::uint64_t> out;
  for (auto _ : state) {
    out = weft::parallel_map(input, [](std::uint64_t x) { return cheap(x); });
    benchmark::DoNotOptimize(out.data());
  }
  finish_map(state, out);
}

#if defined(WEFT_HAVE_TBB)
void tbb_map_cheap(benchmark::State& state) {
  launder_salt();
  const auto input = map_input();
  std::vector<std::uint64_t> out;
  for (auto _ : state) {
    out = std::vector<std::uint64_t>(input.size());
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, input.size()), [&](const tbb::blocked_range<std::size_t>& r) {
      for (std::size_t i = r.begin(); i != r.end(); ++i) out[i] = cheap(input[i]);
    });
    benchmark::DoNotOptimize(out.data());
  }
  finish_map(state, out);
}
#endif

void serial_map_cheap(benchmark::State& state) {
  launder_salt();
  const auto input = map_input();
  std::vector<std::uint64_t> out;
  for (auto _ : state) {
    out.clear();
    out.reserve(input.size());
    for (const auto x : input) out.push_back(cheap(x));
    benchmark::DoNotOptimize(out.data());
  }
  finish_map(state, out);
}

void register_in(const char* workload, const char* impl, void (*body)(benchmark::State&)) {
  benchmark::RegisterBenchmark((std::string(workload) + "/" + impl).c_str(), body)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  register_in("fan_out_fan_in", "weft", &weft_parallel_map);
  register_in("fan_out_fan_in", "weft_gather", &weft_gather);
  register_in("fan_out_fan_in", "std_async", &std_async);
#if defined(WEFT_HAVE_TBB)
  register_in("fan_out_fan_in", "tbb_task_group", &tbb_group);
#endif
  register_in("fan_out_fan_in", "asio_thread_pool_latch", &asio_latch);
  register_in("fan_out_fan_in", "serial", &serial);

  register_in("map_cheap_elements", "weft", &weft_map_cheap);
#if defined(WEFT_HAVE_TBB)
  register_in("map_cheap_elements", "tbb_parallel_for", &tbb_map_cheap);
#endif
  register_in("map_cheap_elements", "serial", &serial_map_cheap);

  return weft_bench::run_benchmarks(argc, argv);
}
