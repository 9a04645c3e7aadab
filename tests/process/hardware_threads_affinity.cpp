// SPDX-License-Identifier: BSL-1.0
// A process whose CPU affinity allows one CPU (taskset -c 0, a container's
// cpuset) gets one hardware thread from weft, and a default pool of one
// worker, however many CPUs the machine has: a pool sized by the machine
// would put its workers on one core to take turns.
//
// A process of its own: hardware_threads() is read once per process, so
// the mask must be set before anything in weft asks for it. Exits 0 when
// it holds, 1 when it does not, 77 when the mask cannot be set.
#include <weft/fan.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <numeric>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

int main() {
#if defined(__linux__)
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return 77;
  int first = 0;
  while (first < CPU_SETSIZE && !CPU_ISSET(first, &allowed)) ++first;
  if (first == CPU_SETSIZE) return 77;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  if (::sched_setaffinity(0, sizeof one, &one) != 0) return 77;

  int failures = 0;
  const auto check = [&](bool holds, const char* what) {
    if (!holds) {
      std::fprintf(stderr, "hardware_threads_affinity: %s does not hold\n", what);
      ++failures;
    }
  };
  check(weft::hardware_threads() == 1, "hardware_threads() == 1");
  check(weft::default_pool().size() == 1, "default_pool().size() == 1");
  check(weft::worker_pool_options{}.workers == 1, "worker_pool_options{}.workers == 1");
  // Its fan-outs run on this thread alone: the default limit is one task
  // per worker, and a task more only while a CPU is left for it.
  std::array<int, 64> values{};
  std::iota(values.begin(), values.end(), 0);
  const auto caller = std::this_thread::get_id();
  const auto ran_here =
      weft::parallel_map(values, [&](int) { return std::this_thread::get_id() == caller; });
  check(std::all_of(ran_here.begin(), ran_here.end(), [](bool here) { return here; }),
        "parallel_map ran every call on the calling thread");
  return failures == 0 ? 0 : 1;
#else
  return 77;
#endif
}
