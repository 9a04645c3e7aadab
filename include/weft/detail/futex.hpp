// SPDX-License-Identifier: BSL-1.0
// Park a thread on a 32-bit word until another thread changes it: the futex
// system call on Linux, a striped mutex/condition-variable table elsewhere.
//
// Why not std::atomic::wait: it has no timeout, and libstdc++ 12 makes a
// system call on notify even when nobody waits. Callers of futex_wake keep
// their own count of sleepers and call it only when one may be asleep.
//
// futex_wake may be called on a word whose owner has already been destroyed
// by the woken thread: on Linux the kernel only hashes the address (a stray
// wake is a spurious wake-up, which every waiter tolerates); the fallback
// never dereferences the address either.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <climits>
#include <ctime>
#else
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#endif

namespace weft::detail {

#if defined(__linux__)

// Sleeps while `word == expected`, for at most `timeout` (none when null).
// Returns on a wake, a timeout, a signal, or at once if the word differs.
inline void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       const std::chrono::nanoseconds* timeout = nullptr) noexcept {
  timespec relative{};
  if (timeout != nullptr) {
    auto ns = timeout->count();
    if (ns < 0) ns = 0;
    relative.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    relative.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  }
  ::syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected,
            timeout != nullptr ? &relative : nullptr, nullptr, 0);
}

inline void futex_wake_one(const std::atomic<std::uint32_t>& word) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, 1,
            nullptr, nullptr, 0);
}

inline void futex_wake_all(const std::atomic<std::uint32_t>& word) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX,
            nullptr, nullptr, 0);
}

#else

struct futex_bucket {
  std::mutex mutex;
  std::condition_variable changed;
};

inline futex_bucket& futex_bucket_for(const void* address) noexcept {
  // Never destroyed: a pool made before the table's first use joins its
  // workers after the exit would have destroyed it, and they park here.
  static futex_bucket* const buckets = new futex_bucket[64];
  return buckets[std::hash<const void*>{}(address) % 64];
}

inline void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                       const std::chrono::nanoseconds* timeout = nullptr) noexcept {
  auto& bucket = futex_bucket_for(&word);
  std::unique_lock lock(bucket.mutex);
  if (word.load(std::memory_order_acquire) != expected) return;
  if (timeout == nullptr) {
    bucket.changed.wait(lock);
  } else {
    bucket.changed.wait_for(lock, *timeout);
  }
}

inline void futex_wake_all(const std::atomic<std::uint32_t>& word) noexcept {
  auto& bucket = futex_bucket_for(&word);
  // Taking the bucket's lock orders this wake after a waiter's check of the word.
  { std::lock_guard lock(bucket.mutex); }
  bucket.changed.notify_all();
}

inline void futex_wake_one(const std::atomic<std::uint32_t>& word) noexcept { futex_wake_all(word); }

#endif

// A pause hint for spin loops: lets the sibling hyper-thread run and saves power.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace weft::detail
