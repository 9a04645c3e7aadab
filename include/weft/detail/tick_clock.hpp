// SPDX-License-Identifier: BSL-1.0
// detail::tick_clock: a monotonic clock that a read takes from memory. A
// ticker thread publishes steady_clock's time once per tick (4 ms); a read
// returns the last time published. The registry stamps tasks with it.
//
// Why: tracking stamps every task twice, when it is spawned and when it
// starts. Even the kernel's coarse clock (CLOCK_MONOTONIC_COARSE through
// the vDSO: a call and a sequence-locked read, about 2 ns each on the
// 2.1 GHz KVM guest the benchmarks run on) was nearly a third of what
// tracking cost per pool task; a load from a line that changes 250 times a
// second costs next to nothing. Seastar's lowres_clock is kept the same
// way.
//
// Contract:
//  - now_ns() is steady_clock's time since its epoch, in nanoseconds,
//    behind it by up to a tick while the ticker runs (more while the
//    ticker's thread waits for a CPU), never ahead of it. It never goes
//    back: a read that happens after another returns at least as much,
//    whichever thread made each.
//  - The first read starts the ticker. After idle_ticks ticks with no read
//    the ticker parks, and the next read wakes it. A read that finds the
//    ticker not ticking reads steady_clock itself and publishes what it
//    read, which keeps the reads monotonic.
//  - stop() ends the ticker for good; later reads read steady_clock. The
//    registry's clock is stopped, and its thread joined, when the program
//    exits. Like weft's other threads, the ticker does not survive fork():
//    a child that goes on using weft must exec first.
//  - A tick_clock is never destroyed while it may be read: the registry's
//    lives as long as the program, and a test's is stopped before it ends.
//
// Cost: a read while the ticker runs is two loads from one cache line, and
// the first read after each tick stores a mark there. The ticker wakes once
// per tick while reads come, and not at all once they have stopped.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/futex.hpp>
#include <weft/detail/internal_thread.hpp>
#include <weft/detail/spin_mutex.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>

namespace weft::detail {

class tick_clock {
 public:
  struct settings {
    std::chrono::nanoseconds tick{std::chrono::milliseconds{4}};
    // Ticks with no read before the ticker parks: a tenth of a second, so
    // that a service spawning a task now and then does not keep it awake
    // (the read that wakes it pays for a system call).
    std::uint32_t idle_ticks = 25;
  };

  constexpr tick_clock() noexcept = default;
  constexpr explicit tick_clock(settings clock_settings) noexcept : settings_(clock_settings) {}

  tick_clock(const tick_clock&) = delete;
  tick_clock& operator=(const tick_clock&) = delete;

  std::int64_t now_ns() noexcept {
    // Acquire: a ticker that starts ticking published the time first.
    if (state_.load(std::memory_order_acquire) == ticking) {
      if (!read_since_tick_.load(std::memory_order_relaxed)) {
        read_since_tick_.store(true, std::memory_order_relaxed);
      }
      return now_ns_.load(std::memory_order_relaxed);
    }
    return now_ns_slow();
  }

  // Ends the ticker and waits for its thread; reads go to steady_clock from
  // now on.
  void stop() noexcept {
    std::thread* thread = nullptr;
    {
      std::lock_guard guard(thread_mutex_);
      state_.store(stopped, std::memory_order_seq_cst);
      thread = std::exchange(thread_, nullptr);
    }
    futex_wake_all(state_);
    if (thread == nullptr) return;
    if (thread->get_id() == std::this_thread::get_id()) {
      thread->detach();  // exit() called on the ticker's thread: nobody else can join it
    } else {
      thread->join();
    }
    delete thread;
  }

  // For tests: whether the ticker is parked, and how often it has ticked.
  bool parked() const noexcept { return state_.load(std::memory_order_acquire) == parked_state; }
  std::uint64_t ticks() const noexcept { return ticks_.load(std::memory_order_acquire); }

 private:
  // The ticker's states, in a futex word: readers wake a parked ticker
  // through it, and stop() wakes a ticking one.
  static constexpr std::uint32_t not_started = 0;
  static constexpr std::uint32_t waking = 1;  // started or woken, not yet ticking
  static constexpr std::uint32_t ticking = 2;
  static constexpr std::uint32_t parked_state = 3;
  static constexpr std::uint32_t stopped = 4;

  static std::int64_t steady_now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  WEFT_NOINLINE std::int64_t now_ns_slow() noexcept {
    auto state = state_.load(std::memory_order_acquire);
    if (state == not_started) {
      start();
    } else if (state == parked_state &&
               state_.compare_exchange_strong(state, waking, std::memory_order_acq_rel)) {
      futex_wake_one(state_);
    }
    return publish(steady_now_ns());
  }

  // Raises the published time to `now` unless it is later already, and
  // returns the published time.
  std::int64_t publish(std::int64_t now) noexcept {
    auto seen = now_ns_.load(std::memory_order_relaxed);
    while (seen < now && !now_ns_.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
    return std::max(seen, now);
  }

  void tick() noexcept {
    publish(steady_now_ns());
    ticks_.store(ticks_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  void start() noexcept;
  void run() noexcept;

  // Readers load all three; only the first read after a tick stores.
  alignas(64) std::atomic<std::uint32_t> state_{not_started};
  std::atomic<bool> read_since_tick_{false};
  std::atomic<std::int64_t> now_ns_{0};
  // The ticker's thread, owned by whoever stops the clock.
  alignas(64) spin_mutex thread_mutex_;
  std::thread* thread_ = nullptr;
  std::atomic<std::uint64_t> ticks_{0};  // written by the ticker only
  settings settings_{};
};

// The registry's clock: constant-initialised and never destroyed, so that
// any thread can read it at any time, during static destruction included.
inline constinit tick_clock registry_clock{};

inline void tick_clock::start() noexcept {
  std::lock_guard guard(thread_mutex_);
  auto state = not_started;
  if (!state_.compare_exchange_strong(state, waking, std::memory_order_acq_rel)) return;
  if (this == &registry_clock) {
    // Joins the ticker at exit, after which reads go to steady_clock.
    struct exit_guard {
      ~exit_guard() { registry_clock.stop(); }
    };
    static const exit_guard guard;
  }
  try {
    thread_ = new std::thread(start_internal_thread("weft-clock", [this] { run(); }));
  } catch (...) {
    // No thread (out of memory or threads): every read reads steady_clock.
    state_.store(stopped, std::memory_order_release);
  }
}

inline void tick_clock::run() noexcept {
  std::uint32_t idle_ticks = 0;
  for (;;) {
    tick();
    // Either exchange below fails only when stop() came first.
    auto state = waking;
    if (!state_.compare_exchange_strong(state, ticking, std::memory_order_acq_rel)) return;
    read_since_tick_.store(true, std::memory_order_relaxed);
    while (idle_ticks < settings_.idle_ticks) {
      // Only stop() changes a ticking state: this sleeps a whole tick.
      futex_wait(state_, ticking, &settings_.tick);
      if (state_.load(std::memory_order_acquire) == stopped) return;
      tick();
      idle_ticks = read_since_tick_.exchange(false, std::memory_order_relaxed) ? 0 : idle_ticks + 1;
    }
    // Readers that loaded `ticking` before this take the time of the tick
    // just published; later ones read steady_clock, and the first wakes
    // this thread.
    state = ticking;
    if (!state_.compare_exchange_strong(state, parked_state, std::memory_order_acq_rel)) return;
    while ((state = state_.load(std::memory_order_acquire)) == parked_state) {
      futex_wait(state_, parked_state);
    }
    if (state == stopped) return;
    idle_ticks = 0;
  }
}

}  // namespace weft::detail
