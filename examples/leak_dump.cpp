// A leak on purpose, and how weft shows it.
//
// A request handler takes a database connection (a permit of the semaphore
// "db-conns") and, on one path, forgets to give it back. Two requests take
// that path; every later request then blocks on the semaphore forever, and
// the requests behind them wait in the handler pool's queue. Nothing
// crashes; the service just stops answering.
//
// The later requests run under a weft::leak_check, as a test would. The
// program prints what a goroutine dump would show in Go: the live tasks
// grouped by the line that started them, with what they are blocked on; then
// the check's report. Finally it shuts the service down: the stuck handlers
// see the shutdown through their token and give up.
#include <weft/cancel.hpp>
#include <weft/registry.hpp>
#include <weft/semaphore.hpp>
#include <weft/worker_pool.hpp>

#include <chrono>
#include <future>
#include <iostream>
#include <string>
#include <thread>

namespace {

using namespace std::chrono_literals;

struct service {
  weft::cancel_source running;  // cancelled at shutdown: waits on it give up
  weft::semaphore connections{2, "db-conns"};
  weft::worker_pool handlers{{.workers = 4, .queue_capacity = 64, .name = "handlers"}};

  void query() {
    auto connection = connections.acquire_permit(1, running.token());
    if (!connection) return;  // shutting down
    // ... use the connection; the permit goes back at the end of the scope ...
  }

  // The bug: this path takes a connection and never gives it back.
  void query_and_forget() { (void)connections.acquire(1, running.token()); }

  std::future<void> handle(int request) {
    return handlers.submit([this, request] {
      if (request % 7 == 3) {
        query_and_forget();
      } else {
        query();
      }
    });
  }
};

// Lets the leak build up: waits until the registry shows `count` tasks
// blocked.
void wait_for_blocked(std::size_t count) {
  for (;;) {
    std::size_t blocked = 0;
    for (const auto& task : weft::registry::snapshot()) blocked += task.state == weft::task_state::blocked ? 1 : 0;
    if (blocked >= count) return;
    std::this_thread::yield();
  }
}

}  // namespace

int main() {
  if (!weft::registry::enabled()) {
    // Nothing would be listed, and wait_for_blocked() would wait for good.
    std::cout << "the task registry is compiled out (WEFT_NO_REGISTRY) or switched off\n";
    return 0;
  }
  service app;
  // The two requests that take the buggy path come first, so that exactly
  // the four handlers get stuck below, whatever the threads' timing.
  for (int request : {3, 10}) app.handle(request).wait();

  std::string report;
  {
    weft::leak_check check{{.grace = 100ms, .on_leak = [&](const std::string& text) { report = text; }}};
    // No connection is left: four requests block in the four handlers and
    // five wait in the queue behind them.
    for (int request = 11; request < 20; ++request) (void)app.handle(request);
    wait_for_blocked(4);

    std::cout << "--- weft::registry::dump ---\n";
    weft::registry::dump(std::cout);
  }
  std::cout << "\n--- weft::leak_check ---\n" << report;

  std::cout << "\n--- weft::registry::dump_json ---\n";
  weft::registry::dump_json(std::cout);

  // Shutdown: the stuck handlers give up, the queued ones return at once.
  app.running.cancel();
  app.handlers.shutdown();
  app.handlers.join();
  std::cout << "\nafter shutdown: " << weft::registry::live_count() << " live tasks\n";
  return report.empty() || weft::registry::live_count() != 0 ? 1 : 0;
}
