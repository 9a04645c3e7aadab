// SPDX-License-Identifier: BSL-1.0
// weft::worker_pool against the thread pools a C++ service would otherwise
// use, on the same work, in the same binary and the same run.
//
// Benchmark names are `pool_tiny_tasks/<impl>/workers:N/real_time`; the
// report (scripts/bench_report.py) groups them by workload and worker count
// (`pool_tiny_tasks/workers:N`) and compares impl `weft` with each other impl.
//
// Workload pool_tiny_tasks: one producer (the benchmark thread) posts
// 1,000,000 tasks per iteration to a pool of N workers (N = 1, 2, 4, 8, 16;
// more workers than cores on purpose, so that a bigger machine shows the
// scaling and a small one shows what oversubscription costs), then waits
// until all of them have run. Each task increments one relaxed atomic
// counter that lives on its own cache line in static storage (a counter near
// the producer's stack data made one impl 2x slower through false sharing).
// The pool is created before the timed loop (thread start-up is not timed)
// and destroyed after it.
//
// Contention model: one producer against N consumers on one queue, with
// almost no work per task. Nothing but queue traffic and wake-ups: it
// measures what a pool costs per task, and rewards pools that do not wake a
// sleeping worker per post (PERFORMANCE.md, section 2: "adding workers
// should never make a pool slower").
// Wake-up heavy, so noisy (±10-50%); with N above the core count, the
// numbers also depend on the scheduler.
//
// Waiting for the end is the same for every impl except tbb: after posting,
// the producer polls the counter (a few hundred pause instructions, then
// std::this_thread::yield) until it reaches the target. tbb uses
// task_group::wait(), which runs queued tasks on the waiting thread: that is
// how tbb is used, and it is the "joining caller helps" advantage.
//
// Impls:
//   weft                 weft::worker_pool{{.workers = N, .queue_capacity = 1024}}:
//                        bounded (post waits while 1024 tasks are queued),
//                        move-only inline task, no allocation per post
//   asio_thread_pool     boost::asio::thread_pool(N) + boost::asio::post
//                        (unbounded)
//   tbb_task_group       tbb::task_group::run inside a tbb::task_arena of N + 1
//                        slots (N workers + the producer, which helps in
//                        wait()); tbb::global_control lifts tbb's worker
//                        limit (hardware threads - 1) so that N workers can
//                        really join on a small machine
//   mutex_condvar        the classic hand-written pool: std::mutex +
//                        std::condition_variable + std::deque<std::function>,
//                        notify_one per post (unbounded)
//   moodycamel_blocking  N workers on a moodycamel::BlockingConcurrentQueue<
//                        std::function<void()>>, with a producer token and a
//                        consumer token per worker (its fast form; unbounded)
//   std_thread_per_task  no pool: a std::thread per task, all joined at the
//                        end; 10,000 tasks per iteration instead of 1,000,000
//                        (items/s stays comparable); does not depend on N,
//                        listed under every N as the "no pool at all" floor
#include <weft/detail/futex.hpp>  // cpu_relax, the pause the pools spin on
#include <weft/detail/queue.hpp>  // finds moodycamel's headers the way weft does
#include <weft/worker_pool.hpp>

#if __has_include(<concurrentqueue/blockingconcurrentqueue.h>)
#include <concurrentqueue/blockingconcurrentqueue.h>
#elif __has_include(<concurrentqueue/moodycamel/blockingconcurrentqueue.h>)
#include <concurrentqueue/moodycamel/blockingconcurrentqueue.h>
#else
#include <blockingconcurrentqueue.h>
#endif

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#if defined(WEFT_HAVE_TBB)
#include <tbb/global_control.h>
#include <tbb/task_arena.h>
#include <tbb/task_group.h>
#endif

#include <benchmark/benchmark.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::int64_t pool_tasks = 1'000'000;
constexpr std::int64_t thread_per_task_tasks = 10'000;

// The only thing a task touches: static storage, its own cache line.
struct alignas(64) task_counter {
  std::atomic<std::uint64_t> value{0};
};
task_counter counter;

inline void tiny_task() noexcept { counter.value.fetch_add(1, std::memory_order_relaxed); }

// The common wait: poll, then yield, until every task has run.
void wait_for_count(std::uint64_t target) noexcept {
  for (int i = 0; counter.value.load(std::memory_order_acquire) < target; ++i) {
    if (i < 512) {
      weft::detail::cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

void check_count(benchmark::State& state, std::uint64_t expected) {
  if (counter.value.load(std::memory_order_acquire) != expected) state.SkipWithError("a task was lost or ran twice");
}

std::size_t workers_of(const benchmark::State& state) { return static_cast<std::size_t>(state.range(0)); }

// Runs `post` for every task, then waits with the common wait.
template <class Post>
void post_and_wait(benchmark::State& state, std::int64_t tasks, Post post) {
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    for (std::int64_t i = 0; i < tasks; ++i) post();
    wait_for_count(static_cast<std::uint64_t>(tasks));
  }
  check_count(state, static_cast<std::uint64_t>(tasks));
  state.SetItemsProcessed(state.iterations() * tasks);
}

// ---------------------------------------------------------------------------
// The pools.

void weft_pool(benchmark::State& state) {
  weft::worker_pool pool{{.workers = workers_of(state), .queue_capacity = 1024}};
  post_and_wait(state, pool_tasks, [&] { pool.post(&tiny_task); });
}

void asio_pool(benchmark::State& state) {
  boost::asio::thread_pool pool(workers_of(state));
  post_and_wait(state, pool_tasks, [&] { boost::asio::post(pool, &tiny_task); });
  pool.join();
}

#if defined(WEFT_HAVE_TBB)
void tbb_group(benchmark::State& state) {
  const auto slots = static_cast<int>(workers_of(state)) + 1;
  tbb::global_control limit(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(slots));
  tbb::task_arena arena(slots, 1);
  arena.initialize();
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    arena.execute([&] {
      tbb::task_group group;
      for (std::int64_t i = 0; i < pool_tasks; ++i) group.run(&tiny_task);
      group.wait();
    });
  }
  check_count(state, static_cast<std::uint64_t>(pool_tasks));
  state.SetItemsProcessed(state.iterations() * pool_tasks);
}
#endif

// The pool people write by hand: one lock, one deque, one condition
// variable, notify_one per post.
class mutex_condvar_pool {
 public:
  explicit mutex_condvar_pool(std::size_t workers) {
    threads_.reserve(workers);
    for (std::size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { run(); });
  }
  mutex_condvar_pool(const mutex_condvar_pool&) = delete;
  mutex_condvar_pool& operator=(const mutex_condvar_pool&) = delete;
  ~mutex_condvar_pool() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void post(std::function<void()> f) {
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(std::move(f));
    }
    ready_.notify_one();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping and drained
        f = std::move(queue_.front());
        queue_.pop_front();
      }
      f();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

void mutex_condvar(benchmark::State& state) {
  mutex_condvar_pool pool(workers_of(state));
  post_and_wait(state, pool_tasks, [&] { pool.post(&tiny_task); });
}

// N workers blocked in wait_dequeue; an empty std::function tells one to exit.
class moodycamel_pool {
 public:
  explicit moodycamel_pool(std::size_t workers) : producer_(queue_) {
    threads_.reserve(workers);
    for (std::size_t i = 0; i < workers; ++i) {
      threads_.emplace_back([this] {
        moodycamel::ConsumerToken token(queue_);
        for (;;) {
          std::function<void()> f;
          queue_.wait_dequeue(token, f);
          if (!f) return;
          f();
        }
      });
    }
  }
  moodycamel_pool(const moodycamel_pool&) = delete;
  moodycamel_pool& operator=(const moodycamel_pool&) = delete;
  ~moodycamel_pool() {
    for (std::size_t i = 0; i < threads_.size(); ++i) queue_.enqueue(std::function<void()>{});
    for (auto& t : threads_) t.join();
  }

  // Only from the thread that created the pool (the producer token's owner).
  void post(std::function<void()> f) { queue_.enqueue(producer_, std::move(f)); }

 private:
  moodycamel::BlockingConcurrentQueue<std::function<void()>> queue_;
  moodycamel::ProducerToken producer_;
  std::vector<std::thread> threads_;
};

void moodycamel_blocking(benchmark::State& state) {
  moodycamel_pool pool(workers_of(state));
  post_and_wait(state, pool_tasks, [&] { pool.post(&tiny_task); });
}

void std_thread_per_task(benchmark::State& state) {
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(thread_per_task_tasks));
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    for (std::int64_t i = 0; i < thread_per_task_tasks; ++i) threads.emplace_back(&tiny_task);
    for (auto& t : threads) t.join();
    threads.clear();
    wait_for_count(static_cast<std::uint64_t>(thread_per_task_tasks));  // already there: join synchronises
  }
  check_count(state, static_cast<std::uint64_t>(thread_per_task_tasks));
  state.SetItemsProcessed(state.iterations() * thread_per_task_tasks);
}

// ---------------------------------------------------------------------------
// Registration: `pool_tiny_tasks/<impl>/workers:N/real_time`.

void register_pool(const char* impl, void (*body)(benchmark::State&)) {
  benchmark::RegisterBenchmark((std::string("pool_tiny_tasks/") + impl).c_str(), body)
      ->ArgName("workers")
      ->Arg(1)
      ->Arg(2)
      ->Arg(4)
      ->Arg(8)
      ->Arg(16)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      // One iteration is 1,000,000 tasks (0.05-3 s): a short minimum keeps
      // the slow impls at one iteration per repetition.
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  register_pool("weft", &weft_pool);
  register_pool("asio_thread_pool", &asio_pool);
#if defined(WEFT_HAVE_TBB)
  register_pool("tbb_task_group", &tbb_group);
#endif
  register_pool("mutex_condvar", &mutex_condvar);
  register_pool("moodycamel_blocking", &moodycamel_blocking);
  register_pool("std_thread_per_task", &std_thread_per_task);

  return weft_bench::run_benchmarks(argc, argv);
}
