// SPDX-License-Identifier: BSL-1.0
// An asymmetric memory barrier: a heavy side that one rare operation pays so
// that a frequent operation on other threads needs no fence at all.
//
// The frequent side orders a store before a later load with a compiler
// barrier only (std::atomic_signal_fence); the CPU may still let the load
// overtake the store. The heavy side, asymmetric_barrier_heavy(), makes
// every thread of the process that is running at that moment execute a full
// memory barrier (the membarrier system call, MEMBARRIER_CMD_PRIVATE_EXPEDITED:
// an inter-processor interrupt to each core running one of our threads;
// threads not running passed one when they were switched out). So for a
// frequent side `store A; load B` and a heavy side `store B;
// asymmetric_barrier_heavy(); load A`, at least one of the loads sees the
// other side's store: the Dekker pattern, with the fence moved entirely to
// one side. Userspace RCU and folly's hazard pointers use the same call.
//
// Cost: one registration per process (about 140 us, on the first call of
// asymmetric_barrier_available()); each heavy barrier is a system call, 1 us
// when no other thread runs and about 20 us when one does, on the 2-vCPU
// virtual machines we measured. Callers make it rare.
//
// Linux only (4.14 and later). Elsewhere, or where the call is refused (a
// seccomp filter), asymmetric_barrier_available() is false and the caller
// must not rely on the frequent side's compiler barrier.
#pragma once

#include <cstdio>
#include <exception>

#if defined(__linux__)
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cerrno>
#endif

namespace weft::detail {

#if defined(__linux__) && defined(__NR_membarrier)

inline long membarrier_call(int command) noexcept {
  return ::syscall(__NR_membarrier, command, 0, 0);
}

inline bool membarrier_register() noexcept {
  const long supported = membarrier_call(MEMBARRIER_CMD_QUERY);
  return supported > 0 && (supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 &&
         membarrier_call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 &&
         membarrier_call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0;
}

// True when asymmetric_barrier_heavy() works in this process. The first call
// registers the process with the kernel; a fork()ed child inherits the
// registration.
inline bool asymmetric_barrier_available() noexcept {
  static const bool available = membarrier_register();
  return available;
}

// Only after asymmetric_barrier_available() returned true.
inline void asymmetric_barrier_heavy() noexcept {
  if (membarrier_call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return;
  // A process image that did not register itself (it cannot be one that
  // asked asymmetric_barrier_available(), but be sure): register and retry.
  if (errno == EPERM && membarrier_call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0 &&
      membarrier_call(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) {
    return;
  }
  // The call worked when availability was checked; without it, a waiter
  // could sleep through the release meant to wake it, so stop here.
  std::fputs("weft: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after it had worked\n",
             stderr);
  std::terminate();
}

#else

inline bool asymmetric_barrier_available() noexcept { return false; }
inline void asymmetric_barrier_heavy() noexcept { std::terminate(); }

#endif

}  // namespace weft::detail
