// SPDX-License-Identifier: BSL-1.0
// A deadline whose timer thread cannot start, in a process that may start
// no more threads (RLIMIT_NPROC): with_deadline throws std::system_error and
// leaves nothing queued, and a later deadline, once threads may start
// again, fires. The failed deadline used to stay in the timer queue after
// its memory was freed (AddressSanitizer: heap-use-after-free in
// timer_queue::sift_up), and the later one never fired.
//
// A process of its own: it gives up root (which RLIMIT_NPROC does not
// bind) for good. Exits 0 when all of that held, 77 (CTest: skipped) where
// the limit cannot be applied, 1 otherwise.
#include <weft/cancel.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <system_error>
#include <thread>

namespace {
constexpr int held = 0;
constexpr int failed = 1;
constexpr int skipped = 77;

int fail(const char* why) {
  std::printf("FAIL: %s\n", why);
  return failed;
}
}  // namespace

int main() {
  using namespace std::chrono_literals;
  if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) return skipped;
  rlimit original{};
  if (::getrlimit(RLIMIT_NPROC, &original) != 0) return skipped;
  rlimit limited = original;
  limited.rlim_cur = 0;
  if (::setrlimit(RLIMIT_NPROC, &limited) != 0) return skipped;
  try {
    std::thread([] {}).join();
    return skipped;  // threads still start: the limit is not applied here
  } catch (const std::system_error&) {
  }

  // No deadline has started the timer thread yet: this one has to.
  const auto deadline = std::chrono::steady_clock::now() + 200ms;
  try {
    auto refused = weft::with_deadline(weft::cancel_token{}, deadline);
    return fail("with_deadline did not throw, with no timer thread to serve it");
  } catch (const std::system_error&) {
  }

  if (::setrlimit(RLIMIT_NPROC, &original) != 0) return fail("cannot lift the limit again");
  // Takes the memory the refused source was freed from, so that the source
  // below lies elsewhere, and a stale queue entry cannot pass for it.
  auto expired = weft::with_deadline(weft::cancel_token{}, std::chrono::steady_clock::time_point{});
  auto later = weft::with_deadline(weft::cancel_token{}, deadline + 1ms);
  (void)later.token().wait();  // waits for the deadline, the thing under test
  if (!later.token().cause().is_deadline())
    return fail("the later source was not cancelled by its deadline");
  return held;
}
