// SPDX-License-Identifier: BSL-1.0
// An object destroyed while something still uses it must be diagnosed, not
// left to corrupt memory later: weft checks it with WEFT_ASSERT. This
// program checks that the check fires for a resource_pool destroyed while a
// lease is out, and for a semaphore destroyed while a thread is queued in
// acquire(), and that it stays quiet for the same objects destroyed once
// the lease is back or the waiter has been let through (a check that fired
// on every destruction would pass the misuse scenarios).
//
// A process of its own: it defines WEFT_ASSERT before any weft header (a
// config macro must be the same in every translation unit of a program), so
// that a failed check prints its condition and ends the process at once
// with a status of its own, in every build type (the default, assert(), is
// gone under NDEBUG). A misused object is left in a state nothing can clean
// up (a thread parked on a destroyed semaphore, a lease that would return
// to a destroyed pool), so each scenario runs in a child of its own, forked
// from this single-threaded parent before weft has started any thread, and
// ends by std::_Exit, which runs no destructor. The parent reads each
// child's exit status: `diagnosed` when the expected check fired, 0 when no
// check fired, anything else a failure (another check fired, the misuse
// went unseen, or the child was killed). A child's alarm() ends it should a
// scenario hang, so the program never does. Exits 0 when every misuse was
// diagnosed and every correct use was not, 1 otherwise, 77 when it cannot
// fork.
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {
// The message of the check a scenario expects to fire; null for a scenario
// that expects none.
const char* expected_check = nullptr;
}  // namespace

[[noreturn]] void weft_check_failed(const char* condition) noexcept;

#define WEFT_ASSERT(condition) ((condition) ? static_cast<void>(0) : weft_check_failed(#condition))

#include <weft/resource_pool.hpp>
#include <weft/semaphore.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <thread>

namespace {

constexpr int diagnosed = 42;
constexpr int other_check_fired = 43;
constexpr int not_diagnosed = 44;
constexpr int setup_failed = 45;
constexpr unsigned watchdog_seconds = 30;

}  // namespace

void weft_check_failed(const char* condition) noexcept {
  std::fprintf(stderr, "WEFT_ASSERT failed: %s\n", condition);
  const bool expected =
      expected_check != nullptr && std::strstr(condition, expected_check) != nullptr;
  std::_Exit(expected ? diagnosed : other_check_fired);
}

namespace {

// Called right after the destruction that should have been diagnosed.
[[noreturn]] void misuse_unseen(const char* what) {
  std::fprintf(stderr, "FAIL: %s returned without a diagnosis\n", what);
  std::_Exit(not_diagnosed);
}

using int_pool = weft::resource_pool<int>;

std::unique_ptr<int_pool> make_pool() {
  return std::make_unique<int_pool>(
      weft::resource_pool_options{.max_open = 1}, [] { return 7; }, [](int&) {});
}

int pool_with_lease_out() {
  auto pool = make_pool();
  auto lease = std::make_unique<int_pool::lease>(pool->acquire());
  expected_check = "weft::resource_pool destroyed while a lease is out";
  pool.reset();
  misuse_unseen("destroying a resource_pool while a lease is out");
}

int pool_with_lease_returned() {
  auto pool = make_pool();
  auto lease = std::make_unique<int_pool::lease>(pool->acquire());
  lease.reset();
  pool.reset();
  return 0;
}

// Starts a thread that queues in acquire() on a semaphore whose only permit
// is held, and returns once it is queued.
std::thread queue_waiter(weft::semaphore& permits) {
  permits.acquire();
  std::thread waiter([&permits] { permits.acquire(); });
  // A bound, not a hand-off: the waiter queues within microseconds.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds{10};
  // stats() takes the queue's mutex, so what the waiter wrote as it queued
  // happens-before the destruction that reads it.
  while (permits.stats().waiters != 1) {
    if (std::chrono::steady_clock::now() > give_up) {
      std::fprintf(stderr, "FAIL: the waiter did not queue\n");
      std::_Exit(setup_failed);
    }
    std::this_thread::yield();
  }
  (void)permits.stats();  // the one above may have locked before the waiter did
  return waiter;
}

int semaphore_with_waiter_queued() {
  auto permits = std::make_unique<weft::semaphore>(1);
  std::thread waiter = queue_waiter(*permits);
  expected_check = "a weft primitive was destroyed while a thread waits on it";
  permits.reset();
  misuse_unseen("destroying a semaphore while a thread waits in acquire()");
}

int semaphore_with_waiter_let_through() {
  auto permits = std::make_unique<weft::semaphore>(1);
  std::thread waiter = queue_waiter(*permits);
  permits->release();
  waiter.join();
  permits->release();
  permits.reset();
  return 0;
}

struct scenario {
  const char* name;
  int (*run)();
  int expected_status;
};

constexpr scenario scenarios[] = {
    {"resource_pool destroyed while a lease is out", pool_with_lease_out, diagnosed},
    {"resource_pool destroyed after its lease returned", pool_with_lease_returned, 0},
    {"semaphore destroyed while a thread is queued in acquire()", semaphore_with_waiter_queued,
     diagnosed},
    {"semaphore destroyed after its waiter was let through", semaphore_with_waiter_let_through, 0},
};

}  // namespace

int main() {
  bool passed = true;
  for (const scenario& s : scenarios) {
    std::fflush(nullptr);  // a child must not print the parent's buffered output again
    const pid_t child = ::fork();
    if (child == -1) {
      std::perror("fork");
      return 77;
    }
    if (child == 0) {
      ::alarm(watchdog_seconds);
      std::_Exit(s.run());
    }
    int status = 0;
    if (::waitpid(child, &status, 0) != child) {
      std::perror("waitpid");
      return 1;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == s.expected_status) {
      std::printf("ok: %s\n", s.name);
      continue;
    }
    passed = false;
    if (WIFEXITED(status)) {
      std::printf("FAIL: %s: the child exited with %d, not %d\n", s.name, WEXITSTATUS(status),
                  s.expected_status);
    } else {
      std::printf("FAIL: %s: the child was killed by signal %d\n", s.name,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
  }
  return passed ? 0 : 1;
}
