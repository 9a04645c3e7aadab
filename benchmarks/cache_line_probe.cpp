// SPDX-License-Identifier: BSL-1.0
// cache_line_probe: how long a cache line takes, right now, to go from one
// CPU to another. scripts/bench.sh runs it before and after the benchmarks,
// and the report prints both times.
//
// Why: on the 2-vCPU virtual machines weft is measured on, that time moves
// between about 50 ns and about 200 ns within minutes, as the hypervisor
// moves the vCPUs. weft's worker_pool, whose cost per tiny task is mostly
// such crossings, runs 40-50% slower in the slow state, while a mutex pool,
// whose cost is mostly its own instructions and system calls, does not. A
// reader of a report can tell from this which state a run met.
//
// Method: two threads, pinned to the first two CPUs this process may run
// on, take turns writing one atomic, each spinning until it sees the
// other's write. The one-way time is half a round trip: the median of 5
// batches of 100,000 round trips (well under a second in either state).
//
// Output: one line, `one_way_ns=<ns> cpus=<a>,<b>`, or `one_way_ns=none`
// when the process may use fewer than two CPUs or may not pin its threads
// (two spinning threads could then share one CPU). Exits 0 either way.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr int batches = 5;
constexpr std::uint64_t round_trips = 100'000;

alignas(64) std::atomic<std::uint64_t> turn{0};

bool pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

}  // namespace

int main() {
  const std::vector<int> cpus = allowed_cpus();
  if (cpus.size() < 2 || !pin_to(cpus[0])) {
    std::puts("one_way_ns=none");
    return 0;
  }
  constexpr std::uint64_t total = batches * round_trips;
  enum : int { starting, pinned, not_pinned };
  std::atomic<int> answerer_state{starting};
  // The other side answers every odd value with the next even one.
  std::thread answerer([&] {
    if (!pin_to(cpus[1])) {
      answerer_state.store(not_pinned);
      return;
    }
    answerer_state.store(pinned);
    for (std::uint64_t i = 0; i < total; ++i) {
      while (turn.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      turn.store(2 * i + 2, std::memory_order_release);
    }
  });
  while (answerer_state.load() == starting) {
  }
  if (answerer_state.load() == not_pinned) {
    answerer.join();
    std::puts("one_way_ns=none");
    return 0;
  }
  std::array<double, batches> one_way_ns{};
  std::uint64_t next = 0;
  for (double& result : one_way_ns) {
    const auto start = std::chrono::steady_clock::now();
    for (std::uint64_t i = 0; i < round_trips; ++i, ++next) {
      turn.store(2 * next + 1, std::memory_order_release);
      while (turn.load(std::memory_order_acquire) != 2 * next + 2) {
      }
    }
    const std::chrono::duration<double, std::nano> elapsed =
        std::chrono::steady_clock::now() - start;
    result = elapsed.count() / static_cast<double>(round_trips) / 2;
  }
  answerer.join();
  std::sort(one_way_ns.begin(), one_way_ns.end());
  std::printf("one_way_ns=%.1f cpus=%d,%d\n", one_way_ns[batches / 2], cpus[0], cpus[1]);
  return 0;
}
