// SPDX-License-Identifier: BSL-1.0
// What the weft_stress scenario files share: how long and how widely a
// scenario runs (a time budget per configuration or a count of rounds, a cap
// on every loop, and thread counts above the core count, all scaled by
// --scale N), the spins and the hash their random gaps and choices come
// from, and the cancel sources their chaos threads cancel.
#pragma once

#include <weft/cancel.hpp>
#include <weft/detail/futex.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "../support.hpp"
#include "seed.hpp"

namespace weft_test {

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

// `normal` rounds, a quarter as many (at least one) under sanitizers, which
// run everything several times slower, times the scale (at most 100): for the
// scenarios that count rounds rather than run for a time.
inline int rounds(int normal) {
  const int base = under_sanitizer ? std::max(1, normal / 4) : normal;
  return base * static_cast<int>(std::min<std::uint64_t>(scale(), 100));
}

// A gap without a sleep: other threads move on, and workers go idle, at
// moments that vary with the count.
inline void spin_for(std::uint64_t iterations) {
  for (std::uint64_t i = 0; i < iterations; ++i) weft::detail::cpu_relax();
}

// splitmix64's finaliser: a random-looking choice made where no thread's
// generator is at hand, or that must depend on a value and the seed, not on
// the thread that makes it.
inline std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15u;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9u;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebu;
  return x ^ (x >> 31);
}

// More threads than cores, always.
inline std::vector<int> thread_counts() {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<int> counts{3, 8, 16, 32};
  if (4 * cores > 32) counts.push_back(4 * cores);
  return counts;
}

// Cancel sources that a chaos thread cancels and replaces at random; workers
// wait on tokens taken from them.
class chaos_sources {
 public:
  explicit chaos_sources(std::size_t count) : sources_(count) {}

  weft::cancel_token token(std::uint64_t index) {
    std::lock_guard lock(mutex_);
    return sources_[index % sources_.size()].token();
  }

  // Cancels one source, plainly or with errc::operation_canceled as the
  // cause, and puts a new one in its place.
  void cancel_and_replace(std::uint64_t index, bool with_cause = false) {
    weft::cancel_source cancelled;
    {
      std::lock_guard lock(mutex_);
      auto& slot = sources_[index % sources_.size()];
      cancelled = slot;
      slot = weft::cancel_source{};
    }
    // Outside the lock: the callbacks take the queue locks of whatever the
    // workers wait on.
    if (with_cause) {
      cancelled.cancel(std::make_error_code(std::errc::operation_canceled));
    } else {
      cancelled.cancel();
    }
  }

  std::size_t size() const { return sources_.size(); }

 private:
  std::mutex mutex_;
  std::vector<weft::cancel_source> sources_;
};

}  // namespace weft_test
