// SPDX-License-Identifier: BSL-1.0
// A pool task that uses weft's process-wide objects while the program's
// static destructors run: it compares and prints a weft error code, and
// makes a manual_clock deadline and moves the clock past it. weft's error
// category and manual_clock's shared state (its timer heap) were
// function-local statics made on first use, so the exit destroyed them
// before a pool made earlier had joined, and the task called into a
// destroyed category (UBSan's vptr check) and wrote into a freed heap
// (AddressSanitizer): the sanitizer build fails this program on the old
// code. The statics here are made in the order pool, gate, category and
// clock state, so the exit destroys those two first, then runs the gate's
// destructor, which lets the task run and waits for it.
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <latch>
#include <string>
#include <system_error>

namespace {

std::latch go{1};
std::latch done{1};
bool code_intact = false;
bool deadline_fired = false;

weft::worker_pool& static_pool() {
  static weft::worker_pool pool{{.workers = 1, .name = "static"}};
  return pool;
}

// Its destructor runs after those of the statics made after it, before the
// pool's.
struct exit_gate {
  ~exit_gate() {
    go.count_down();
    done.wait();
    if (!code_intact || !deadline_fired) {
      std::printf("FAIL: during the exit, error code intact %d, manual_clock deadline fired %d\n",
                  code_intact, deadline_fired);
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::puts("error codes and manual_clock deadlines still work while statics are destroyed");
    std::fflush(stdout);
  }
};

}  // namespace

int main() {
  using namespace std::chrono_literals;
  static_pool().post([] {
    go.wait();
    const std::error_code code = weft::make_error_code(weft::errc::deadline_exceeded);
    code_intact = code == weft::errc::deadline_exceeded && code.message() == "deadline exceeded" &&
                  code == std::errc::timed_out;
    const auto source = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
    weft::manual_clock::advance(1s);
    deadline_fired = source.token().cause().is_deadline();
    done.count_down();
  });
  static const exit_gate gate;
  // Both made here, after the gate; the clock's timer heap is allocated by
  // a deadline scheduled and cancelled.
  (void)weft::error_category();
  (void)weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
}
