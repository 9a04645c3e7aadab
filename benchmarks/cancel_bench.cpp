// SPDX-License-Identifier: BSL-1.0
// weft::cancel_source / cancel_token against std::stop_source /
// std::stop_token, on the same work, in the same binary and the same run.
//
// Benchmark names are `<workload>/<impl>`; the weft implementation is always
// the impl `weft`, so a report can group by workload and compute
// weft/alternative ratios.
//
// Contention model: none. Every workload is one thread doing the whole life
// cycle of a cancellation (or a token hand-off) over and over: what a server
// pays per request when it makes a per-request context, hangs a callback on
// it and tears it down. No other thread touches the states, so these are the
// fast paths (allocation, reference counts, the state's lock) and nothing
// else: steady numbers (±1-3%). Cancellation racing callback removal on
// another thread is a correctness matter for the tests, not measured here.
//
// Workloads:
//   cancel_cycle      make a source, register one callback, cancel (the
//                     callback runs and bumps a counter), destroy the
//                     registration and the source.
//                       weft:            cancel_source + on_cancel + cancel()
//                       std_stop_source: stop_source + stop_callback + request_stop()
//   token_copy_check  copy a long-lived token and ask whether it is cancelled
//                     (what every function taking a token by value does).
//                       weft:            cancel_token copy + cancelled()
//                       std_stop_source: stop_token copy + stop_requested()
//   child_cycle       make a child of a long-lived parent, register a callback
//                     on the child, destroy both (the parent is not
//                     cancelled: the common case of a request that finishes).
//                       weft:                    parent_token.child() + on_cancel
//                       std_stop_callback_chain: a std::stop_source for the
//                         child, a std::stop_callback on the parent's token
//                         that requests stop on it, and a stop_callback on the
//                         child's token (std has no parent/child links, so
//                         this is how it is done by hand)
#include <weft/cancel.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <stop_token>
#include <string>
#include <thread>

#include "bench_support.hpp"

namespace {

// The callback every workload registers: bumps a counter the benchmark owns.
struct bump {
  std::uint64_t* count;
  void operator()() const noexcept { ++*count; }
};

// std::stop_callback body that forwards a stop to another source.
struct request_stop_on {
  std::stop_source* source;
  void operator()() const noexcept { source->request_stop(); }
};

// ---------------------------------------------------------------------------
// Adapters: one per alternative, the same operations for every workload.

struct weft_impl {
  static constexpr const char* name = "weft";
  using source = weft::cancel_source;
  using token = weft::cancel_token;

  static void cancel_cycle(std::uint64_t& count) {
    weft::cancel_source source;
    {
      auto registration = weft::on_cancel(source.token(), bump{&count});
      source.cancel();
    }
  }

  static bool copy_and_check(const token& t) {
    token copy = t;
    benchmark::DoNotOptimize(copy);
    return copy.cancelled();
  }

  static void child_cycle(const token& parent, std::uint64_t& count) {
    weft::cancel_source child = parent.child();
    auto registration = weft::on_cancel(child.token(), bump{&count});
    benchmark::DoNotOptimize(registration);
  }

  static source make_source() { return source{}; }
  static token token_of(const source& s) { return s.token(); }
};

struct std_impl {
  static constexpr const char* name = "std_stop_source";
  using source = std::stop_source;
  using token = std::stop_token;

  static void cancel_cycle(std::uint64_t& count) {
    std::stop_source source;
    {
      std::stop_callback registration(source.get_token(), bump{&count});
      source.request_stop();
    }
  }

  static bool copy_and_check(const token& t) {
    token copy = t;
    benchmark::DoNotOptimize(copy);
    return copy.stop_requested();
  }

  static void child_cycle(const token& parent, std::uint64_t& count) {
    std::stop_source child;
    std::stop_callback link(parent, request_stop_on{&child});
    std::stop_callback registration(child.get_token(), bump{&count});
    benchmark::DoNotOptimize(registration);
  }

  static source make_source() { return source{}; }
  static token token_of(const source& s) { return s.get_token(); }
};

// ---------------------------------------------------------------------------
// Benchmark bodies, one per workload, templated on the adapter.

template <class Impl>
void cancel_cycle(benchmark::State& state) {
  std::uint64_t count = 0;
  for (auto _ : state) {
    Impl::cancel_cycle(count);
  }
  benchmark::DoNotOptimize(count);
  if (count != static_cast<std::uint64_t>(state.iterations())) {
    state.SkipWithError("a callback did not run exactly once per cancel");
  }
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void token_copy_check(benchmark::State& state) {
  const auto source = Impl::make_source();
  const auto token = Impl::token_of(source);
  std::uint64_t cancelled = 0;
  for (auto _ : state) {
    cancelled += Impl::copy_and_check(token) ? 1 : 0;
  }
  benchmark::DoNotOptimize(cancelled);
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void child_cycle(benchmark::State& state) {
  const auto parent = Impl::make_source();
  const auto parent_token = Impl::token_of(parent);
  std::uint64_t count = 0;
  for (auto _ : state) {
    Impl::child_cycle(parent_token, count);
  }
  benchmark::DoNotOptimize(count);
  if (count != 0) state.SkipWithError("a child's callback ran although nothing was cancelled");
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void register_workload(const char* workload, void (*body)(benchmark::State&), const char* impl_name = Impl::name) {
  benchmark::RegisterBenchmark((std::string(workload) + "/" + impl_name).c_str(), body);
}

}  // namespace

int main(int argc, char** argv) {
  register_workload<weft_impl>("cancel_cycle", &cancel_cycle<weft_impl>);
  register_workload<std_impl>("cancel_cycle", &cancel_cycle<std_impl>);
  register_workload<weft_impl>("token_copy_check", &token_copy_check<weft_impl>);
  register_workload<std_impl>("token_copy_check", &token_copy_check<std_impl>);
  register_workload<weft_impl>("child_cycle", &child_cycle<weft_impl>);
  register_workload<std_impl>("child_cycle", &child_cycle<std_impl>, "std_stop_callback_chain");

  return weft_bench::run_benchmarks(argc, argv);
}
