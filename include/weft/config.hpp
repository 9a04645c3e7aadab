// SPDX-License-Identifier: BSL-1.0
// The macros a user may define before including any weft header.
//
// WEFT_ASSERT(condition)
//   Checks an internal invariant or a precondition that is too costly to check
//   with an exception on a hot path (for example: a semaphore destroyed while
//   threads still wait on it). Defaults to assert(), so it is active unless
//   NDEBUG is defined. Define it to nothing to remove the checks, or to your
//   own handler to log them in release builds.
//
// WEFT_SPIN_LIMIT
//   How many times a waiter polls (with a pause instruction) before it
//   yields, queues, or parks its thread in the kernel. Waking a parked thread
//   costs 5-20 us on virtual machines, while the thing a waiter waits for
//   usually arrives within a microsecond on a busy system; a short bounded
//   spin avoids most parks.
//   Default 16.
//
// WEFT_YIELD_LIMIT
//   How many times a waiter then yields its core (std::this_thread::yield)
//   before it parks: when threads outnumber cores, the thread that will wake
//   it often needs this core to run. Default 64. Both limits 0 park at once.
//
// WEFT_WORKER_SPIN_LIMIT
//   How many times a pool worker that has run out of work polls the queue
//   (with a pause instruction) before it starts to yield, while the pool's
//   awake workers leave a hardware thread to spare (otherwise it polls
//   WEFT_SPIN_LIMIT times: its core may be the one a producer needs); and
//   how many times a thread whose fan-out has no calls left polls for its
//   helpers to finish theirs; and half as many times a task group's runner
//   that has run out of the group's tasks polls for the next one before it
//   gives up its worker. All wait for something that is usually on its way:
//   the next task of a busy producer, a helper's last call. A yield
//   is a system call, 1.2 us on the 2-vCPU VM the benchmarks run on, and a
//   task posted while the worker is inside one waits until it returns; a
//   pause takes 20 ns there, so 16 polls ended long before a back-to-back
//   fan-out's next post (fan_bench's 16 calls: the helper's first call began
//   1.6 us into the fan-out with 16 polls, 1.0 us with 128). The pause's
//   length varies with the CPU (about 140 cycles on recent Intel server
//   cores). The hardware threads counted are those the process may use
//   (weft::hardware_threads(): its CPU affinity, capped by its cgroups' CPU
//   quota).
//   Default 8 x WEFT_SPIN_LIMIT.
#pragma once

#ifndef WEFT_ASSERT
#include <cassert>
#define WEFT_ASSERT(condition) assert(condition)
#endif

#ifndef WEFT_SPIN_LIMIT
#define WEFT_SPIN_LIMIT 16
#endif

#ifndef WEFT_YIELD_LIMIT
#define WEFT_YIELD_LIMIT 64
#endif

#ifndef WEFT_WORKER_SPIN_LIMIT
#define WEFT_WORKER_SPIN_LIMIT \
  ((WEFT_SPIN_LIMIT) > 2147483647 / 8 ? 2147483647 : 8 * (WEFT_SPIN_LIMIT))
#endif

// Internal: keeps a slow path out of the fast path it belongs to.
#if defined(__GNUC__) || defined(__clang__)
#define WEFT_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define WEFT_NOINLINE __declspec(noinline)
#else
#define WEFT_NOINLINE
#endif

// Internal: the result refers to this argument, so Clang warns (-Wdangling)
// when the argument is a temporary that dies before the result does.
#if defined(__has_cpp_attribute)
#if __has_cpp_attribute(clang::lifetimebound)
#define WEFT_LIFETIMEBOUND [[clang::lifetimebound]]
#endif
#endif
#ifndef WEFT_LIFETIMEBOUND
#define WEFT_LIFETIMEBOUND
#endif
