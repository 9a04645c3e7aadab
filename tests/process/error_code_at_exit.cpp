// SPDX-License-Identifier: BSL-1.0
// A pool task that compares and prints weft error codes while the program's
// static destructors run. weft's error category was a function-local static
// made on first use, so it was destroyed before a pool made earlier had
// joined; a task of that pool then called into a destroyed object (UBSan's
// vptr check fails this program on the old code). The statics here are made
// in the order pool, gate, category, so the exit destroys the category first,
// then runs the gate's destructor, which lets the task run and waits for it.
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>

#include <cstdio>
#include <cstdlib>
#include <latch>
#include <string>
#include <system_error>

namespace {

std::latch go{1};
std::latch done{1};
bool code_intact = false;

weft::worker_pool& static_pool() {
  static weft::worker_pool pool{{.workers = 1, .name = "static"}};
  return pool;
}

// Its destructor runs after the category's would have, before the pool's.
struct exit_gate {
  ~exit_gate() {
    go.count_down();
    done.wait();
    if (!code_intact) {
      std::puts("FAIL: a weft error code changed during the exit");
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::puts("weft error codes still work while statics are destroyed");
    std::fflush(stdout);
  }
};

}  // namespace

int main() {
  static_pool().post([] {
    go.wait();
    const std::error_code code = weft::make_error_code(weft::errc::deadline_exceeded);
    code_intact = code == weft::errc::deadline_exceeded && code.message() == "deadline exceeded" &&
                  code == std::errc::timed_out;
    done.count_down();
  });
  static const exit_gate gate;
  (void)weft::error_category();
}
