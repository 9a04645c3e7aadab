// SPDX-License-Identifier: BSL-1.0
// The default pool used from a static's destructor that runs after the
// pool's exit handler: the pool is shut down, so a post throws
// weft::rejected. The pool used to be a function-local static, destroyed
// by then: a use after free (AddressSanitizer: heap-use-after-free in
// worker_pool::stats).
#include <weft/worker_pool.hpp>

#include <cstdio>
#include <cstdlib>

namespace {

// Made before the pool's first use, so destroyed after its exit handler.
struct late_user {
  ~late_user() {
    try {
      weft::default_executor().post([] { std::puts("FAIL: ran after the exit handler"); });
      std::puts("FAIL: post after the exit handler was accepted");
      std::_Exit(1);
    } catch (const weft::rejected&) {
    }
    const weft::worker_pool_stats stats = weft::default_pool().stats();
    if (stats.completed != 1) {
      std::printf("FAIL: %llu tasks completed, 1 expected\n",
                  static_cast<unsigned long long>(stats.completed));
      std::_Exit(1);
    }
    std::puts("rejected after exit");
  }
};
late_user user;

}  // namespace

int main() {
  // The first use: starts the pool and registers its exit handler.
  weft::default_executor().context().submit([] {}).get();
}
