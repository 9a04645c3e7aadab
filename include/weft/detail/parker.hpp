// SPDX-License-Identifier: BSL-1.0
// detail::parker: one thread sleeps until another completes it, spinning
// briefly first and making no system call when nobody sleeps.
//
// The word holds three independent bits:
//   completed  set once, by the one thread that completes the waiter; its
//              release store is the completer's last touch of the parker
//   poked      a wake-up that completes nothing (a deadline timer on a manual
//              clock); the owner clears it and looks again
//   sleeping   the owner is, or may be, inside futex_wait; only then does a
//              completer or poker make the wake system call
// Keeping "completed" apart from "poked" is what makes it safe for the owner
// to destroy the parker after it has seen `completed`: a poke never stands in
// for a completion.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/futex.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace weft::detail {

class parker {
 public:
  static constexpr std::uint32_t completed_bit = 1;
  static constexpr std::uint32_t poked_bit = 2;
  static constexpr std::uint32_t sleeping_bit = 4;

  parker() = default;
  parker(const parker&) = delete;
  parker& operator=(const parker&) = delete;

  // Called at most once. Everything the caller did before is visible to the
  // owner once it returns from a wait that saw the completion.
  void complete() noexcept {
    if (word_.fetch_or(completed_bit, std::memory_order_acq_rel) & sleeping_bit) {
      futex_wake_one(word_);
    }
  }

  void poke() noexcept {
    if (word_.fetch_or(poked_bit, std::memory_order_acq_rel) & sleeping_bit) futex_wake_one(word_);
  }

  bool is_completed() const noexcept {
    return (word_.load(std::memory_order_acquire) & completed_bit) != 0;
  }

  // Owner only, once nobody else can complete or poke it: as new, for
  // another wait.
  void reset() noexcept { word_.store(0, std::memory_order_relaxed); }

  // Owner only: forget a poke that has been handled.
  void clear_poke() noexcept { word_.fetch_and(~poked_bit, std::memory_order_relaxed); }

  // Owner only: returns once completed, polling up to `spin_limit` times
  // before it yields and sleeps (see detail::backoff).
  void wait_completed(int spin_limit = WEFT_SPIN_LIMIT) noexcept {
    while ((wait_for_change(completed_bit, nullptr, spin_limit) & completed_bit) == 0) {
    }
  }

  // Owner only: returns once completed or poked, or after `timeout` has
  // passed (possibly early, on a spurious wake-up). Returns the word's bits.
  std::uint32_t wait(std::chrono::nanoseconds timeout) noexcept {
    return wait_for_change(completed_bit | poked_bit, &timeout);
  }

  // Owner only: returns once completed or poked.
  std::uint32_t wait() noexcept { return wait_for_change(completed_bit | poked_bit, nullptr); }

 private:
  std::uint32_t wait_for_change(std::uint32_t done, const std::chrono::nanoseconds* timeout,
                                int spin_limit = WEFT_SPIN_LIMIT) noexcept {
    for (backoff pause{spin_limit}; pause.wait();) {
      if (const auto word = word_.load(std::memory_order_acquire); word & done) return word;
    }
    auto word = word_.fetch_or(sleeping_bit, std::memory_order_acq_rel) | sleeping_bit;
    if ((word & done) == 0) {
      futex_wait(word_, word, timeout);
      word = word_.load(std::memory_order_acquire);
    }
    return word;
  }

  std::atomic<std::uint32_t> word_{0};
};

}  // namespace weft::detail
