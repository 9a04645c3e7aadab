// Bound how many requests may use a scarce backend at once, Go's
// `sem := make(chan struct{}, N)` pattern, with a per-request deadline:
// a request that cannot get a slot in time gives up instead of queueing
// forever.
#include <weft/cancel.hpp>
#include <weft/semaphore.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

weft::semaphore backend_slots{4};  // the backend copes with 4 queries at a time
std::atomic<int> in_flight{0};
std::atomic<int> peak{0};

long query_backend(int request) {
  const int now = in_flight.fetch_add(1) + 1;
  int seen = peak.load();
  while (now > seen && !peak.compare_exchange_weak(seen, now)) {
  }
  long checksum = 0;
  for (int i = 0; i < 200'000; ++i) checksum += (i ^ request) % 7;
  in_flight.fetch_sub(1);
  return checksum;
}

bool handle(int request, const weft::cancel_token& server) {
  // Each request gets two seconds, and stops early if the server shuts down.
  const weft::cancel_source deadline = weft::with_timeout(server, std::chrono::seconds(2));
  auto slot = backend_slots.acquire_permit(1, deadline.token());
  if (!slot) return false;  // timed out or cancelled: answer 503, don't pile up
  query_backend(request);
  return true;  // the permit goes back here
}

}  // namespace

int main() {
  weft::cancel_source server;
  std::atomic<int> served{0};
  std::vector<std::thread> clients;
  for (int client = 0; client < 16; ++client) {
    clients.emplace_back([&, client] {
      for (int request = 0; request < 8; ++request) {
        if (handle(client * 100 + request, server.token())) served.fetch_add(1);
      }
    });
  }
  for (auto& client : clients) client.join();

  const auto stats = backend_slots.stats();
  std::printf("served %d of 128 requests; at most %d queries ran at once (limit %td)\n", served.load(), peak.load(),
              stats.capacity);
  std::printf("acquisitions %llu, timeouts %llu, longest wait %.3f ms\n",
              static_cast<unsigned long long>(stats.acquisitions), static_cast<unsigned long long>(stats.timeouts),
              std::chrono::duration<double, std::milli>(stats.max_wait).count());
  return peak.load() <= 4 && stats.available == stats.capacity ? 0 : 1;
}
