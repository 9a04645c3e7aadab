// SPDX-License-Identifier: BSL-1.0
// weft::async_wait(token, handler) when an allocation fails while it starts:
// the exception reaches the caller and the handler is destroyed at once.
// The wait used to let go of its waiter before it installed the handler's
// cancellation handler, whose allocation could fail: the waiter, and the
// handler with everything it captured, then stayed with the io_context until
// the io_context was destroyed, and the token's cancel() never reached it.
//
// Asio allocates a cancellation slot's handler with aligned_alloc (Boost
// 1.81, asio/detail/memory.hpp). This program defines aligned_alloc itself,
// on top of posix_memalign, and makes the n-th call fail once armed, for
// n = 0, 1, ... until async_wait starts: a process of its own, so no other
// test sees it. (Replacing operator new instead would clash with
// ThreadSanitizer's own in the tsan build.)
#include <weft/asio.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <utility>

namespace {

// Calls left before one fails; negative: none fails.
std::atomic<long> allocations_before_failure{-1};

[[noreturn]] void fail(const char* what, long failing) {
  std::printf("FAIL: %s (allocation %ld failed)\n", what, failing);
  std::fflush(stdout);
  std::_Exit(1);
}

}  // namespace

extern "C" void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  if (allocations_before_failure.load(std::memory_order_relaxed) >= 0 &&
      allocations_before_failure.fetch_sub(1, std::memory_order_relaxed) == 0) {
    return nullptr;
  }
  void* memory = nullptr;
  const std::size_t at_least_a_pointer = alignment < sizeof(void*) ? sizeof(void*) : alignment;
  return posix_memalign(&memory, at_least_a_pointer, size) == 0 ? memory : nullptr;
}

int main() {
  int failures_seen = 0;
  for (long failing = 0;; ++failing) {
    boost::asio::io_context context;
    weft::cancel_source source;
    boost::asio::cancellation_signal signal;
    auto captured = std::make_shared<int>(0);
    int completions = 0;
    bool threw = false;
    allocations_before_failure.store(failing, std::memory_order_relaxed);
    auto handler = [captured, &completions](boost::system::error_code) { ++completions; };
    try {
      weft::async_wait(source.token(),
                       boost::asio::bind_cancellation_slot(
                           signal.slot(), boost::asio::bind_executor(context, std::move(handler))));
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    allocations_before_failure.store(-1, std::memory_order_relaxed);
    if (threw) {
      ++failures_seen;
      if (captured.use_count() != 1) fail("the handler outlived a failed start", failing);
      source.cancel();
      context.run();
      if (completions != 0) fail("a wait that failed to start completed", failing);
      continue;
    }
    // Every allocation the start makes has failed once: the wait works.
    source.cancel();
    context.run();
    if (completions != 1) fail("the wait did not complete once", failing);
    if (captured.use_count() != 1) fail("the handler was not destroyed after completing", failing);
    break;
  }
  // At least the slot's handler: else this program tests nothing.
  if (failures_seen == 0) fail("no allocation of the start went through aligned_alloc", 0);
  std::printf("async_wait started after %d failed allocations\n", failures_seen);
  return 0;
}
