// Fan-out with a deadline: each request calls three backends at once (users,
// orders, recommendations) and must answer within 200 ms.
//
//   request 1  every backend answers in time.
//   request 2  recommendations is slow and required: the deadline cancels it,
//              and the whole request fails with errc::deadline_exceeded.
//   request 3  recommendations is slow but optional: it gets its own 40 ms
//              budget inside the request and falls back to an empty list, so
//              the request still answers.
#include <weft/cancel.hpp>
#include <weft/fan.hpp>
#include <weft/worker_pool.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using milliseconds = std::chrono::milliseconds;

// A simulated remote call: it takes `latency` to answer, unless its token is
// cancelled first; then it gives up at once and throws the token's cause
// (std::system_error with errc::deadline_exceeded for a deadline), as an RPC
// client would. A real client would pass the token to its socket instead.
void simulate_call(milliseconds latency, const weft::cancel_token& token) {
  if (token.wait_for(latency) == weft::wait_status::ok) token.cause().rethrow();  // ok: cancelled
}

struct backends {
  milliseconds recommendations_latency;

  std::string user(int id, const weft::cancel_token& token) const {
    simulate_call(5ms, token);
    return "user-" + std::to_string(id);
  }
  std::vector<std::string> orders(int id, const weft::cancel_token& token) const {
    simulate_call(10ms, token);
    return {"order-" + std::to_string(id * 100), "order-" + std::to_string(id * 100 + 1)};
  }
  std::vector<std::string> recommendations(int, const weft::cancel_token& token) const {
    simulate_call(recommendations_latency, token);
    return {"lamp", "kettle"};
  }
};

struct page {
  std::string user;
  std::vector<std::string> orders;
  std::vector<std::string> recommendations;
};

// All three answers are required: the deadline, or the first backend that
// fails, cancels the others and fails the request.
page handle(const backends& backend, int id, weft::worker_pool& calls, const weft::cancel_token& server) {
  weft::cancel_source request = weft::with_timeout(server, 200ms);  // context.WithTimeout
  auto [user, orders, recommendations] = weft::gather(
      calls.executor(), request.token(),
      [&](const weft::cancel_token& token) { return backend.user(id, token); },
      [&](const weft::cancel_token& token) { return backend.orders(id, token); },
      [&](const weft::cancel_token& token) { return backend.recommendations(id, token); });
  return {std::move(user), std::move(orders), std::move(recommendations)};
}

// Recommendations are optional: they get a shorter budget of their own, and
// when it runs out the page goes out without them.
page handle_degraded(const backends& backend, int id, weft::worker_pool& calls, const weft::cancel_token& server) {
  weft::cancel_source request = weft::with_timeout(server, 200ms);
  auto [user, orders, recommendations] = weft::gather(
      calls.executor(), request.token(),
      [&](const weft::cancel_token& token) { return backend.user(id, token); },
      [&](const weft::cancel_token& token) { return backend.orders(id, token); },
      [&](const weft::cancel_token& token) {
        weft::cancel_source budget = weft::with_timeout(token, 40ms);  // a child: the request still bounds it
        try {
          return backend.recommendations(id, budget.token());
        } catch (const std::system_error&) {
          // Hidden only when our budget ran out: not when the request itself
          // is over, nor when the backend failed for a reason of its own.
          if (token.cancelled() || !budget.token().cause().is_deadline()) throw;
          return std::vector<std::string>{};  // answer without them
        }
      });
  return {std::move(user), std::move(orders), std::move(recommendations)};
}

long long elapsed_ms(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start).count();
}

void print(const page& answer, std::chrono::steady_clock::time_point start) {
  std::printf("  200 after %lld ms: %s, %zu orders, %zu recommendations%s\n", elapsed_ms(start),
              answer.user.c_str(), answer.orders.size(), answer.recommendations.size(),
              answer.recommendations.empty() ? " (fallback)" : "");
}

}  // namespace

int main() {
  // Backend calls spend their time waiting on the network, so they get a pool
  // of their own instead of the CPU-sized default one (weft::gather_for uses
  // that one: weft::gather_for(200ms, token, calls...)).
  weft::worker_pool calls{{.workers = 8, .queue_capacity = 256, .name = "backend-calls"}};
  weft::cancel_source server;  // cancelled at shutdown; every request is its child

  const backends healthy{.recommendations_latency = 15ms};
  const backends slow{.recommendations_latency = 2000ms};

  std::printf("request 1: every backend answers in time\n");
  auto start = std::chrono::steady_clock::now();
  print(handle(healthy, 1, calls, server.token()), start);

  std::printf("request 2: recommendations is slow and required\n");
  start = std::chrono::steady_clock::now();
  try {
    print(handle(slow, 2, calls, server.token()), start);
    std::printf("  unexpected: the deadline should have failed the request\n");
    return 1;
  } catch (const std::system_error& failure) {
    const bool deadline = failure.code() == weft::errc::deadline_exceeded;
    std::printf("  %s after %lld ms: %s\n", deadline ? "504" : "500", elapsed_ms(start), failure.what());
    if (!deadline) return 1;
  }

  std::printf("request 3: recommendations is slow but optional\n");
  start = std::chrono::steady_clock::now();
  const page degraded = handle_degraded(slow, 3, calls, server.token());
  print(degraded, start);
  return degraded.recommendations.empty() ? 0 : 1;
}
