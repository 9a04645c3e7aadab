// SPDX-License-Identifier: BSL-1.0
// detail::start_internal_thread: starts a thread that weft makes on its own
// (a clock's timer thread, the registry's ticker), named, and with the
// signals blocked that the process, not the thread, is sent.
//
// Why: these threads start lazily, on whichever thread first needs one, and
// a new thread inherits its creator's signal mask. A program that takes
// its signals in one thread (sigwait, signalfd) blocks them in every other;
// a weft thread started before the program blocked them would take them
// instead, and a signal's default action (for SIGTERM, to end the process)
// would run there. Asio blocks signals in its internal threads for the same
// reason. Left unblocked: the faults a thread raises on itself (a crash
// must still reach the handler that reports it, a sanitizer's or the
// default core dump) and SIGPROF, which a profiler's timer sends to
// whichever thread is using the CPU. Threads the program asks for (a
// pool's workers, a watchdog) inherit its mask: they run its tasks.
#pragma once

#include <initializer_list>
#include <thread>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <csignal>
#endif

namespace weft::detail {

#if defined(__unix__) || defined(__APPLE__)
// The calling thread's mask is put back on every path out.
class blocked_signals_scope {
 public:
  blocked_signals_scope() noexcept {
    sigset_t blocked;
    sigfillset(&blocked);
    for (const int kept : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGPROF}) {
      sigdelset(&blocked, kept);
    }
    pthread_sigmask(SIG_BLOCK, &blocked, &previous_);
  }
  ~blocked_signals_scope() { pthread_sigmask(SIG_SETMASK, &previous_, nullptr); }
  blocked_signals_scope(const blocked_signals_scope&) = delete;
  blocked_signals_scope& operator=(const blocked_signals_scope&) = delete;

 private:
  sigset_t previous_;
};
#endif

// Named from here, so that the name is in place once this returns. Throws
// what std::thread's constructor throws.
template <class Body>
std::thread start_internal_thread([[maybe_unused]] const char* name, Body&& body) {
  std::thread thread;
  {
#if defined(__unix__) || defined(__APPLE__)
    const blocked_signals_scope blocked;
#endif
    thread = std::thread(std::forward<Body>(body));
  }
#if defined(__linux__)
  pthread_setname_np(thread.native_handle(), name);  // Linux keeps 15 characters
#endif
  return thread;
}

}  // namespace weft::detail
