// What a bounded worker_pool does when its queue is full, under each overflow
// policy, and what shutdown_now() and the error handler do. Each part first
// occupies both workers with a task that waits at a gate, so the queue fills
// the same way every run.
#include <weft/cancel.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

namespace {

// Parks every worker of `pool` at `gate` and returns once they all wait there.
void occupy_workers(weft::worker_pool& pool, const weft::cancel_token& gate) {
  weft::wait_group parked;
  parked.add(static_cast<std::ptrdiff_t>(pool.size()));
  for (std::size_t i = 0; i < pool.size(); ++i) {
    pool.post([&parked, gate] {
      parked.done();
      gate.wait();
    });
  }
  parked.wait();
}

void print_stats(const weft::worker_pool& pool) {
  const weft::worker_pool_stats s = pool.stats();
  std::printf("  stats: submitted %llu, completed %llu, failed %llu, rejected %llu, dropped %llu\n",
              static_cast<unsigned long long>(s.submitted), static_cast<unsigned long long>(s.completed),
              static_cast<unsigned long long>(s.failed), static_cast<unsigned long long>(s.rejected),
              static_cast<unsigned long long>(s.dropped));
}

}  // namespace

int main() {
  std::atomic<int> ran{0};
  auto job = [&ran] { ran.fetch_add(1, std::memory_order_relaxed); };

  std::printf("overflow::reject, queue of 4: try_post says no, post throws\n");
  {
    weft::worker_pool pool{{.workers = 2, .queue_capacity = 4, .on_full = weft::overflow::reject, .name = "reject"}};
    weft::cancel_source gate;
    occupy_workers(pool, gate.token());
    int accepted = 0;
    for (int i = 0; i < 6; ++i) accepted += pool.try_post(job) ? 1 : 0;
    std::printf("  try_post accepted %d of 6\n", accepted);
    try {
      pool.post(job);
    } catch (const weft::rejected& e) {
      std::printf("  post threw weft::rejected: %s\n", e.what());
    }
    gate.cancel();
    pool.shutdown();
    pool.join();
    print_stats(pool);
  }

  std::printf("overflow::caller_runs, queue of 4: the producer runs the overflow itself\n");
  {
    // Declared before the pool: its destructor runs the tasks still queued,
    // which use them.
    const auto producer = std::this_thread::get_id();
    std::atomic<int> on_producer{0};
    weft::worker_pool pool{
        {.workers = 2, .queue_capacity = 4, .on_full = weft::overflow::caller_runs, .name = "caller_runs"}};
    weft::cancel_source gate;
    occupy_workers(pool, gate.token());
    for (int i = 0; i < 6; ++i) {
      pool.post([&] {
        if (std::this_thread::get_id() == producer) on_producer.fetch_add(1, std::memory_order_relaxed);
      });
    }
    std::printf("  %d of 6 ran on the producer's thread\n", on_producer.load());
    gate.cancel();
  }  // the destructor is shutdown() + join()

  std::printf("overflow::block, queue of 4: post waits until a worker makes room\n");
  {
    weft::worker_pool pool{{.workers = 2, .queue_capacity = 4, .on_full = weft::overflow::block, .name = "block"}};
    weft::cancel_source gate;
    occupy_workers(pool, gate.token());
    ran = 0;
    for (int i = 0; i < 4; ++i) pool.post(job);  // fills the queue
    std::thread opener([&] { gate.cancel(); });   // lets the workers go, soon
    pool.post(job);                               // waits here until a worker takes a task
    opener.join();
    pool.shutdown();
    pool.join();
    std::printf("  all %d queued tasks ran\n", ran.load());
    print_stats(pool);
  }

  std::printf("shutdown_now(): queued tasks are destroyed unrun\n");
  {
    weft::worker_pool pool{{.workers = 2, .queue_capacity = 16, .name = "shutdown_now"}};
    weft::cancel_source gate;
    occupy_workers(pool, gate.token());
    for (int i = 0; i < 10; ++i) pool.post(job);
    std::printf("  shutdown_now() dropped %zu tasks\n", pool.shutdown_now());
    gate.cancel();
    pool.join();
    print_stats(pool);
  }

  std::printf("a posted task that throws goes to the error handler; its worker lives on\n");
  {
    std::string reported;  // written on the worker, read after join(); outlives the pool
    weft::worker_pool pool{{.workers = 2, .queue_capacity = 16, .name = "errors"}};
    pool.set_error_handler([&reported](std::exception_ptr error) {
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        reported = e.what();
      }
    });
    pool.post([] { throw std::runtime_error("disk full"); });
    auto answer = pool.submit([] { return 42; });  // submit's exceptions go to the future instead
    std::printf("  submit() still works: %d\n", answer.get());
    pool.shutdown();
    pool.join();
    std::printf("  the error handler got: %s\n", reported.c_str());
    print_stats(pool);
    return reported == "disk full" ? 0 : 1;
  }
}
