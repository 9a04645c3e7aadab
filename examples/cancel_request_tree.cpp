// Go's context for C++: a request with a deadline, a child of the server's
// token, fans out to three backend calls that watch its token; the first
// failure cancels the rest, and the request's deadline bounds everything.
#include <weft/cancel.hpp>
#include <weft/wait_group.hpp>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>

namespace {

// A backend call that works in small steps and checks its token between them,
// as a loop over rows or a chunked read would.
void call_backend(const std::string& name, int steps, bool fails, const weft::cancel_token& token,
                  weft::cancel_source& request) {
  for (int step = 0; step < steps; ++step) {
    if (token.cancelled()) {
      std::printf("  %s stopped early at step %d: %s\n", name.c_str(), step,
                  token.cause().code().message().c_str());
      return;
    }
    if (fails && step == 3) {
      std::printf("  %s failed; cancelling its siblings\n", name.c_str());
      request.cancel(std::make_exception_ptr(std::runtime_error(name + ": connection refused")));
      return;
    }
    std::this_thread::yield();
  }
  std::printf("  %s finished\n", name.c_str());
}

}  // namespace

int main() {
  weft::cancel_source server;  // cancelled at shutdown

  std::printf("request 1: everything succeeds\n");
  {
    weft::cancel_source request = weft::with_timeout(server.token(), std::chrono::seconds(5));
    weft::wait_group calls;
    calls.add(3);
    for (const char* name : {"users", "orders", "preferences"}) {
      std::thread([&, name] {
        call_backend(name, 10, false, request.token(), request);
        calls.done();
      }).detach();
    }
    calls.wait();
    std::printf("  cause: %s\n", request.token().cancelled() ? "cancelled" : "none");
  }

  std::printf("request 2: one backend fails, the others stop\n");
  {
    weft::cancel_source request = weft::with_timeout(server.token(), std::chrono::seconds(5));
    // Log the cancellation once, whoever triggers it.
    auto log = weft::on_cancel(request.token(), [] { std::printf("  (request cancelled)\n"); });
    weft::wait_group calls;
    calls.add(3);
    std::thread([&] { call_backend("users", 1'000'000, false, request.token(), request); calls.done(); }).detach();
    std::thread([&] { call_backend("orders", 1'000'000, false, request.token(), request); calls.done(); }).detach();
    std::thread([&] { call_backend("preferences", 10, true, request.token(), request); calls.done(); }).detach();
    calls.wait();
    try {
      request.token().cause().rethrow();
    } catch (const std::exception& failure) {
      std::printf("  the request failed with: %s\n", failure.what());
    }
  }

  std::printf("request 3: the deadline passes\n");
  {
    weft::cancel_source request = weft::with_timeout(server.token(), std::chrono::milliseconds(20));
    request.token().wait();  // nobody polls: the deadline wakes us
    std::printf("  cause: %s\n", request.token().cause().code().message().c_str());
    return request.token().cause().is_deadline() ? 0 : 1;
  }
}
