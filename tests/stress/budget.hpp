// SPDX-License-Identifier: BSL-1.0
// How long and how widely a weft_stress scenario runs, shared by the
// scenario files: a time budget per configuration, a cap on every loop, and
// thread counts above the core count. All scale with --scale N.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "seed.hpp"

namespace weft_test {

#if defined(__SANITIZE_THREAD__)
inline constexpr bool under_tsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool under_tsan = true;
#else
inline constexpr bool under_tsan = false;
#endif
#else
inline constexpr bool under_tsan = false;
#endif

// How long one configuration of a scenario runs: about 0.6 s, a third of
// that under TSan, which runs everything 5-15x slower anyway.
inline std::chrono::steady_clock::duration run_budget() {
  using namespace std::chrono_literals;
  const auto base = under_tsan ? 200ms : 600ms;
  return base * static_cast<int>(std::min<std::uint64_t>(scale(), 1000));
}

// `per_scale` times the scale: an upper bound on a loop's iterations, so
// every loop ends even if the clock misbehaves.
inline std::uint64_t iteration_cap(std::uint64_t per_scale) {
  return per_scale * std::min<std::uint64_t>(scale(), 1000);
}

// More threads than cores, always.
inline std::vector<int> thread_counts() {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<int> counts{3, 8, 16, 32};
  if (4 * cores > 32) counts.push_back(4 * cores);
  return counts;
}

}  // namespace weft_test
