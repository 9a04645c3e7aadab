// SPDX-License-Identifier: BSL-1.0
// The stress scenarios' watchdog: a run that stops making progress is a lost
// wake-up (or a deadlock, or a lost permit). doctest's timeout only reports a
// test once it ends, so the watchdog prints every thread's current operation,
// lets the scenario dump its own state, and aborts.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "../support.hpp"
#include "seed.hpp"

namespace weft_test {

class watchdog {
 public:
  // `suite` and `scenario` name the run in the report (string literals).
  watchdog(const char* suite, const char* scenario, std::size_t threads, std::function<void()> dump)
      : suite_(suite), scenario_(scenario), doing_(threads), ops_(threads), dump_(std::move(dump)) {
    for (auto& doing : doing_) doing.store("starting", std::memory_order_relaxed);
    thread_ = std::thread([this] { watch(); });
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;
  ~watchdog() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  // Thread `who` starts `what` (a string literal); also counts as progress.
  void note(std::size_t who, const char* what) noexcept {
    doing_[who].store(what, std::memory_order_relaxed);
    ops_[who].fetch_add(1, std::memory_order_relaxed);
    progress_.fetch_add(1, std::memory_order_relaxed);
  }

 private:
  static std::chrono::seconds stall_limit() {
    using namespace std::chrono_literals;
    return under_tsan ? 90s : under_sanitizer ? 45s : 20s;
  }

  void watch() {
    using namespace std::chrono_literals;
    std::unique_lock lock(mutex_);
    auto last = progress_.load(std::memory_order_relaxed);
    auto since = std::chrono::steady_clock::now();
    while (!stop_) {
      // A look ten times a second; the watchdog makes nothing happen.
      wake_.wait_for(lock, 100ms);
      const auto now = std::chrono::steady_clock::now();
      const auto progress = progress_.load(std::memory_order_relaxed);
      if (progress != last) {
        last = progress;
        since = now;
      } else if (!stop_ && now - since > stall_limit()) {
        std::fprintf(stderr,
                     "\n[%s] WATCHDOG: no progress in \"%s\" for %lld s (seed %llu, scale %llu); "
                     "a lost wake-up or a deadlock. Threads:\n",
                     suite_, scenario_, static_cast<long long>(stall_limit().count()),
                     static_cast<unsigned long long>(seed()),
                     static_cast<unsigned long long>(scale()));
        for (std::size_t i = 0; i < doing_.size(); ++i) {
          std::fprintf(stderr, "  thread %2zu: %s (operation %llu)\n", i,
                       doing_[i].load(std::memory_order_relaxed),
                       static_cast<unsigned long long>(ops_[i].load(std::memory_order_relaxed)));
        }
        std::fflush(stderr);
        if (dump_) dump_();
        std::fflush(stderr);
        std::abort();
      }
    }
  }

  const char* suite_;
  const char* scenario_;
  std::vector<std::atomic<const char*>> doing_;
  std::vector<std::atomic<std::uint64_t>> ops_;
  std::function<void()> dump_;
  std::atomic<std::uint64_t> progress_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace weft_test
