// Threads and Asio coroutines sharing one weft::semaphore: a pool of
// blocking worker threads and an event loop of coroutines draw from the same
// budget of 3 connections, in one FIFO order. A coroutine that waits too
// long is cancelled through Asio's per-operation cancellation.
#include <weft/asio.hpp>
#include <weft/semaphore.hpp>

#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace net = boost::asio;
using namespace net::experimental::awaitable_operators;

namespace {

weft::semaphore connections{3};
std::atomic<int> coroutine_queries{0};
std::atomic<int> thread_queries{0};

net::awaitable<void> handle_in_coroutine(int request) {
  // Wait for a connection, but no more than a second.
  net::steady_timer give_up{co_await net::this_coro::executor, std::chrono::seconds(1)};
  auto outcome = co_await (weft::async_acquire(connections, 1, net::use_awaitable) ||
                           give_up.async_wait(net::use_awaitable));
  if (outcome.index() == 1) {
    std::printf("request %d gave up waiting\n", request);
    co_return;
  }
  weft::permit connection = std::move(std::get<0>(outcome));
  coroutine_queries.fetch_add(1);
  co_return;  // the connection goes back when `connection` is destroyed
}

}  // namespace

int main() {
  net::io_context loop;
  for (int request = 0; request < 50; ++request) net::co_spawn(loop, handle_in_coroutine(request), net::detached);

  std::vector<std::thread> workers;
  for (int worker = 0; worker < 4; ++worker) {
    workers.emplace_back([] {
      for (int job = 0; job < 50; ++job) {
        auto connection = connections.acquire_permit();
        thread_queries.fetch_add(1);
      }
    });
  }
  loop.run();
  for (auto& worker : workers) worker.join();

  std::printf("coroutines ran %d queries, threads ran %d; %td of %td connections free\n", coroutine_queries.load(),
              thread_queries.load(), connections.available(), connections.capacity());
  return connections.available() == connections.capacity() ? 0 : 1;
}
