// SPDX-License-Identifier: BSL-1.0
// weft::channel<T> against the bounded queues a C++ service would otherwise
// pass values through between threads, on the same work, in the same binary
// and the same run.
//
// Benchmark names are `chan_spsc/<impl>/real_time` and
// `chan_mpmc/<impl>/pairs:P/real_time`; the report (scripts/bench_report.py)
// groups them by workload (`chan_spsc`, `chan_mpmc/pairs:P`) and compares
// impl `weft` with each other impl.
//
// Workloads (each iteration moves 1,000,000 std::int64_t values through a
// fresh queue of capacity 1024):
//   chan_spsc
//     One producer thread sends 1,000,000 values, one consumer thread
//     receives them. The plain pipeline stage.
//   chan_mpmc/pairs:P   (P = 1, 2, 4, 8)
//     P producer threads each send 1,000,000 / P values, P consumer threads
//     receive until the end of the stream. 2P threads on one queue: up to 16
//     threads whatever the core count, so a big machine shows the scaling
//     and a small one what oversubscription costs. pairs:1 is the same shape
//     as chan_spsc (kept so that the scaling series starts at 1).
//
// Contention model: no work per value, so nothing but queue traffic. With
// capacity 1024 and producers as fast as consumers, the queue swings between
// full and empty, and both sides block often: it measures the fast path and
// the wake-up path together, and is wake-up heavy, so noisy (±10-50%).
// Each iteration starts its 2P threads (and, for asio, their io_contexts)
// and joins them: that costs well under 1% of an iteration (tens of
// microseconds against tens of milliseconds or more) and is timed alike for
// every impl.
//
// Ending the stream: every consumer must stop exactly when the values run
// out, and no value may be lost or received twice.
//   - weft and mutex_condvar_deque have close(): the benchmark thread joins
//     the producers, closes the queue, and the consumers drain what is left
//     and stop at the end of the stream.
//   - The others have no close that keeps buffered values (tbb's abort()
//     and asio's close() drop them), so each producer sends one sentinel
//     (-1) after its share, and each consumer stops at the first sentinel it
//     receives. Every impl here keeps each producer's values in order (a
//     global FIFO, or moodycamel's per-producer FIFO), so a producer's
//     sentinel comes out after all of its values, and once the P consumers
//     have taken the P sentinels, every value has been taken.
// Values encode their producer (p * 2^32 + k, k = 0, 1, ...). After each
// iteration the benchmark checks that the consumers received exactly
// 1,000,000 values with the right sum, and that each consumer saw each
// producer's values in increasing order; if not, it reports an error
// (SkipWithError) instead of a number.
//
// Impls:
//   weft                          weft::channel<std::int64_t>{1024}: blocking
//                                 send() and recv(), close() at the end
//   tbb_concurrent_bounded_queue  tbb::concurrent_bounded_queue<std::int64_t>
//                                 with set_capacity(1024), blocking push()
//                                 and pop() (only with oneTBB: WEFT_HAVE_TBB)
//   mutex_condvar_deque           the hand-written bounded queue: std::mutex,
//                                 a std::deque, a not-full and a not-empty
//                                 std::condition_variable (notify_one on
//                                 every push and pop), and close()
//   moodycamel_semaphore_bounded  moodycamel::BlockingConcurrentQueue (itself
//                                 unbounded) bounded by a moodycamel::
//                                 LightweightSemaphore of 1024 free slots: a
//                                 producer waits for a slot then enqueues, a
//                                 consumer wait_dequeue()s then signals a
//                                 slot; a producer token per producer and a
//                                 consumer token per consumer (its fast form)
//   moodycamel_unbounded          the same queue without the semaphore:
//                                 nothing bounds it, so a fast producer
//                                 grows it instead of waiting. Not a queue a
//                                 pipeline could use; the reference the
//                                 channels issue measures against (chan_mpmc
//                                 only)
//   asio_concurrent_channel       boost::asio::experimental::concurrent_channel
//                                 <void(error_code, std::int64_t)> with a
//                                 buffer of 1024, driven by C++20 coroutines
//                                 (co_await async_send / async_receive with
//                                 use_awaitable): each producer and consumer
//                                 thread runs its own io_context with one
//                                 coroutine on it. Every completion is posted
//                                 to the coroutine's io_context, even when the
//                                 operation completed at once (asio 1.81 has
//                                 no immediate completion). The channel itself
//                                 is built on an io_context that no thread
//                                 runs: an operation only counts outstanding
//                                 work there.
#include <weft/channel.hpp>
#include <weft/detail/queue.hpp>  // finds moodycamel's headers the way weft does

#if __has_include(<concurrentqueue/blockingconcurrentqueue.h>)
#include <concurrentqueue/blockingconcurrentqueue.h>
#elif __has_include(<concurrentqueue/moodycamel/blockingconcurrentqueue.h>)
#include <concurrentqueue/moodycamel/blockingconcurrentqueue.h>
#else
#include <blockingconcurrentqueue.h>
#endif

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/error_code.hpp>

#if defined(WEFT_HAVE_TBB)
#include <tbb/concurrent_queue.h>
#endif

#include <benchmark/benchmark.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::int64_t total_items = 1'000'000;
constexpr std::size_t capacity = 1024;
constexpr int max_pairs = 8;
constexpr std::int64_t sentinel = -1;
constexpr int producer_shift = 32;

constexpr std::int64_t value_of(int producer, std::int64_t k) noexcept {
  return (static_cast<std::int64_t>(producer) << producer_shift) + k;
}

// What one consumer received. Its own cache lines: consumers never share one.
struct alignas(64) tally {
  std::int64_t count = 0;
  std::int64_t sum = 0;
  std::array<std::int64_t, max_pairs> last{};  // last k seen from each producer, + 1
  bool in_order = true;
  bool failed = false;  // an impl-specific failure (a send refused, an exception)

  void take(std::int64_t v) noexcept {
    ++count;
    sum += v;
    const auto producer = static_cast<std::size_t>(v >> producer_shift);
    const std::int64_t k = v & ((std::int64_t{1} << producer_shift) - 1);
    if (producer >= last.size() || k < last[producer]) {
      in_order = false;
    } else {
      last[producer] = k + 1;
    }
  }
};

// Producer p sends value_of(p, 0 .. share - 1); calls send(v) for each.
template <class Send>
void produce_share(int producer, std::int64_t share, Send send) {
  for (std::int64_t k = 0; k < share; ++k) send(value_of(producer, k));
}

std::int64_t expected_sum(int pairs, std::int64_t share) noexcept {
  std::int64_t sum = 0;
  for (int p = 0; p < pairs; ++p) sum += value_of(p, 0) * share + share * (share - 1) / 2;
  return sum;
}

// Empty if the consumers' tallies add up, else what went wrong.
std::optional<std::string> verify(const std::vector<tally>& tallies, int pairs,
                                  std::int64_t share) {
  std::int64_t count = 0;
  std::int64_t sum = 0;
  for (const tally& t : tallies) {
    if (t.failed) return "an operation failed (send refused or exception)";
    if (!t.in_order) return "a consumer received a producer's values out of order";
    count += t.count;
    sum += t.sum;
  }
  if (count != total_items) {
    return "received " + std::to_string(count) + " values, expected " + std::to_string(total_items);
  }
  if (sum != expected_sum(pairs, share))
    return "the values received do not sum up: lost or duplicated values";
  return std::nullopt;
}

// The common driver. Queue: default-constructible, with
//   void produce(int producer, std::int64_t share, tally& t)
//   void consume(tally& t)      until the end of the stream
//   void producers_done()       after every producer returned
// One fresh queue and 2P fresh threads per iteration.
template <class Queue>
void run_pairs(benchmark::State& state, int pairs) {
  const std::int64_t share = total_items / pairs;
  for (auto _ : state) {
    Queue queue;
    std::vector<tally> consumed(static_cast<std::size_t>(pairs));
    std::vector<tally> produced(static_cast<std::size_t>(pairs));  // only `failed` is used
    std::vector<std::thread> consumers;
    std::vector<std::thread> producers;
    consumers.reserve(static_cast<std::size_t>(pairs));
    producers.reserve(static_cast<std::size_t>(pairs));
    for (int c = 0; c < pairs; ++c) {
      consumers.emplace_back(
          [&queue, &consumed, c] { queue.consume(consumed[static_cast<std::size_t>(c)]); });
    }
    for (int p = 0; p < pairs; ++p) {
      producers.emplace_back([&queue, &produced, p, share] {
        queue.produce(p, share, produced[static_cast<std::size_t>(p)]);
      });
    }
    for (auto& t : producers) t.join();
    queue.producers_done();
    for (auto& t : consumers) t.join();

    for (const tally& t : produced) {
      if (t.failed) consumed.front().failed = true;
    }
    if (auto error = verify(consumed, pairs, share)) {
      state.SkipWithError(error->c_str());
      break;
    }
  }
  state.SetItemsProcessed(state.iterations() * total_items);
}

int pairs_of(const benchmark::State& state) { return static_cast<int>(state.range(0)); }

// ---------------------------------------------------------------------------
// The queues.

struct weft_queue {
  weft::channel<std::int64_t> channel{capacity};

  void produce(int producer, std::int64_t share, tally& t) {
    produce_share(producer, share, [&](std::int64_t v) {
      if (channel.send(v) != weft::wait_status::ok) t.failed = true;
    });
  }
  void consume(tally& t) {
    while (std::optional<std::int64_t> v = channel.recv()) t.take(*v);
  }
  void producers_done() { channel.close(); }
};

#if defined(WEFT_HAVE_TBB)
struct tbb_queue {
  tbb::concurrent_bounded_queue<std::int64_t> queue;
  tbb_queue() { queue.set_capacity(static_cast<std::ptrdiff_t>(capacity)); }

  void produce(int producer, std::int64_t share, tally&) {
    produce_share(producer, share, [&](std::int64_t v) { queue.push(v); });
    queue.push(sentinel);
  }
  void consume(tally& t) {
    for (;;) {
      std::int64_t v = 0;
      queue.pop(v);
      if (v == sentinel) return;
      t.take(v);
    }
  }
  void producers_done() {}
};
#endif


struct mutex_condvar_deque {
  weft_bench::mutex_condvar_queue<std::int64_t> queue{capacity};

  void produce(int producer, std::int64_t share, tally& t) {
    produce_share(producer, share, [&](std::int64_t v) {
      if (!queue.push(v)) t.failed = true;
    });
  }
  void consume(tally& t) {
    while (std::optional<std::int64_t> v = queue.pop()) t.take(*v);
  }
  void producers_done() { queue.close(); }
};

// moodycamel's queue with a token per thread; Bounded adds the semaphore of
// free slots.
template <bool Bounded>
struct moodycamel_blocking {
  moodycamel::BlockingConcurrentQueue<std::int64_t> queue{capacity};
  moodycamel::LightweightSemaphore free_slots{
      static_cast<moodycamel::LightweightSemaphore::ssize_t>(capacity)};

  void produce(int producer, std::int64_t share, tally&) {
    moodycamel::ProducerToken token(queue);
    auto send = [&](std::int64_t v) {
      if constexpr (Bounded) free_slots.wait();
      queue.enqueue(token, v);
    };
    produce_share(producer, share, send);
    send(sentinel);
  }
  void consume(tally& t) {
    moodycamel::ConsumerToken token(queue);
    for (;;) {
      std::int64_t v = 0;
      queue.wait_dequeue(token, v);
      if constexpr (Bounded) free_slots.signal();
      if (v == sentinel) return;
      t.take(v);
    }
  }
  void producers_done() {}
};
using moodycamel_semaphore_bounded = moodycamel_blocking<true>;
using moodycamel_unbounded = moodycamel_blocking<false>;

namespace asio = boost::asio;
using asio_channel =
    asio::experimental::concurrent_channel<void(boost::system::error_code, std::int64_t)>;

asio::awaitable<void> asio_producer(asio_channel& channel, int producer, std::int64_t share) {
  for (std::int64_t k = 0; k < share; ++k) {
    co_await channel.async_send(boost::system::error_code{}, value_of(producer, k),
                                asio::use_awaitable);
  }
  co_await channel.async_send(boost::system::error_code{}, sentinel, asio::use_awaitable);
}

asio::awaitable<void> asio_consumer(asio_channel& channel, tally& t) {
  for (;;) {
    const std::int64_t v = co_await channel.async_receive(asio::use_awaitable);
    if (v == sentinel) co_return;
    t.take(v);
  }
}

// Runs `coroutine` alone on a fresh io_context on the calling thread.
void run_alone(asio::awaitable<void> coroutine, tally& t) {
  asio::io_context context{1};
  asio::co_spawn(context, std::move(coroutine), [&t](const std::exception_ptr& e) {
    if (e) t.failed = true;
  });
  context.run();
}

struct asio_concurrent_channel {
  asio::io_context home{1};  // never run: the channel's executor
  asio_channel channel{home.get_executor(), capacity};

  void produce(int producer, std::int64_t share, tally& t) {
    run_alone(asio_producer(channel, producer, share), t);
  }
  void consume(tally& t) { run_alone(asio_consumer(channel, t), t); }
  void producers_done() {}
};

// ---------------------------------------------------------------------------
// Registration: `chan_spsc/<impl>/real_time`, `chan_mpmc/<impl>/pairs:P/real_time`.

template <class Queue>
void spsc(benchmark::State& state) {
  run_pairs<Queue>(state, 1);
}

template <class Queue>
void mpmc(benchmark::State& state) {
  run_pairs<Queue>(state, pairs_of(state));
}

template <class Queue>
void register_spsc(const char* impl) {
  benchmark::RegisterBenchmark((std::string("chan_spsc/") + impl).c_str(), &spsc<Queue>)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      // One iteration is 1,000,000 values (tens to hundreds of ms): a short
      // minimum keeps the slow cases at one or two iterations per repetition.
      ->MinTime(0.2);
}

template <class Queue>
void register_mpmc(const char* impl) {
  benchmark::RegisterBenchmark((std::string("chan_mpmc/") + impl).c_str(), &mpmc<Queue>)
      ->ArgName("pairs")
      ->Arg(1)
      ->Arg(2)
      ->Arg(4)
      ->Arg(8)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.2);
}

}  // namespace

int main(int argc, char** argv) {
  register_spsc<weft_queue>("weft");
#if defined(WEFT_HAVE_TBB)
  register_spsc<tbb_queue>("tbb_concurrent_bounded_queue");
#endif
  register_spsc<mutex_condvar_deque>("mutex_condvar_deque");
  register_spsc<moodycamel_semaphore_bounded>("moodycamel_semaphore_bounded");
  register_spsc<asio_concurrent_channel>("asio_concurrent_channel");

  register_mpmc<weft_queue>("weft");
#if defined(WEFT_HAVE_TBB)
  register_mpmc<tbb_queue>("tbb_concurrent_bounded_queue");
#endif
  register_mpmc<mutex_condvar_deque>("mutex_condvar_deque");
  register_mpmc<moodycamel_semaphore_bounded>("moodycamel_semaphore_bounded");
  register_mpmc<moodycamel_unbounded>("moodycamel_unbounded");
  register_mpmc<asio_concurrent_channel>("asio_concurrent_channel");

  return weft_bench::run_benchmarks(argc, argv);
}
