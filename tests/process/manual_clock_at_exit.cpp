// SPDX-License-Identifier: BSL-1.0
// A pool task that makes a manual_clock deadline and moves the clock past
// it while the program's static destructors run. The clock's shared state
// (its timer heap) was a function-local static made on first use, so it
// was destroyed before a pool made earlier had joined; the task then wrote
// into the freed heap (AddressSanitizer fails this program on the old
// code). The statics here are made in the order pool, gate, clock state, so
// the exit destroys the clock's state first, then runs the gate's
// destructor, which lets the task run and waits for it.
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/worker_pool.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <latch>

namespace {

std::latch go{1};
std::latch done{1};
bool deadline_fired = false;

weft::worker_pool& static_pool() {
  static weft::worker_pool pool{{.workers = 1, .name = "static"}};
  return pool;
}

// Its destructor runs after the clock state's would have, before the pool's.
struct exit_gate {
  ~exit_gate() {
    go.count_down();
    done.wait();
    if (!deadline_fired) {
      std::puts("FAIL: a manual_clock deadline made during the exit did not fire");
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::puts("manual_clock deadlines still work while statics are destroyed");
    std::fflush(stdout);
  }
};

}  // namespace

int main() {
  using namespace std::chrono_literals;
  static_pool().post([] {
    go.wait();
    const auto source = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
    weft::manual_clock::advance(1s);
    deadline_fired = source.token().cause().is_deadline();
    done.count_down();
  });
  static const exit_gate gate;
  // The clock's state is made here, after the gate, and its timer heap
  // allocated: a deadline scheduled and cancelled.
  (void)weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
}
