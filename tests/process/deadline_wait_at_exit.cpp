// SPDX-License-Identifier: BSL-1.0
// Tasks waiting on deadlines while the program exits: one on the default
// pool (joined by its exit handler), one on a static pool (joined by its
// destructor), each on a deadline whose clock had no timer thread before
// the pool was made. Each deadline fires, its task returns, and the exit
// ends. Each clock's timer thread used to be stopped by a guard made with
// it, which the exit ran before the pool's handler or destructor: the
// deadline never fired, and exit() waited for good in the pool's join
// (CTest's time limit fails this program then).
#include <weft/cancel.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <latch>

namespace {

std::atomic<int> woken_by_deadline{0};
std::latch armed{2};  // not main's: a count_down may still be returning as main does

weft::worker_pool& static_pool() {
  static weft::worker_pool pool{{.workers = 1, .name = "static"}};
  return pool;
}

// Waits on `source`'s token, which its deadline cancels.
void wait_for_deadline(const weft::cancel_source& source) {
  if (source.token().wait() == weft::wait_status::ok && source.token().cause().is_deadline()) {
    woken_by_deadline.fetch_add(1);
  }
}

}  // namespace

int main() {
  // Registered first, so it runs last: after both pools have joined.
  std::atexit([] {
    if (woken_by_deadline.load() != 2) {
      std::printf("FAIL: %d of 2 tasks woken by their deadline\n", woken_by_deadline.load());
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::puts("both deadlines fired during the exit");
    std::fflush(stdout);
  });
  // Both pools are made before any timer thread.
  (void)weft::default_pool();
  (void)static_pool();

  using namespace std::chrono_literals;
  weft::default_executor().post([] {
    const auto source = weft::with_timeout(weft::cancel_token{}, 20ms);
    armed.count_down();
    wait_for_deadline(source);
  });
  static_pool().post([] {
    const auto source =
        weft::with_deadline(weft::cancel_token{}, std::chrono::system_clock::now() + 20ms);
    armed.count_down();
    wait_for_deadline(source);
  });
  armed.wait();
}
