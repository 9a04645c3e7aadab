// SPDX-License-Identifier: BSL-1.0
// weft::object_pool<T> against the ways a C++ service would otherwise get a
// 4 KiB scratch buffer for a moment and give it back, on the same work, in
// the same binary and the same run.
//
// Benchmark names are `object_pool_get_put/<impl>/real_time/threads:T`; the
// report (scripts/bench_report.py) groups them by workload and thread count
// (`object_pool_get_put/threads:T`) and compares impl `weft` with each other
// impl.
//
// Workload object_pool_get_put: T threads (1, 2, 4, 8, 16, up to the larger
// of 4 and the hardware threads: a 16-core machine shows the scaling, a
// 2-core one stops at 4, where oversubscription already shows) each loop:
// get a 4 KiB buffer, write its first byte, give it back. One item is one
// get + put pair; items/s is the total for all threads. Every impl is one
// object shared by all T threads (created by thread 0 before the timed loop,
// destroyed after it), as a pool in a service is shared by its threads.
//
// Contention model: every thread gets and puts as fast as it can and never
// holds more than one buffer, so each thread puts back what it just got. This
// is the pool's best case (a per-thread cache always hits) and the shared
// free list's worst (all T threads on one lock with no work in between). It
// says what the fast paths cost; it says nothing about a producer/consumer
// pattern where objects are got on one thread and put on another. Lock-free
// single-thread work is steady (about ±1-2%); the mutex free list at T > 1
// is lock ping-pong and noisy.
//
// Impls (each an adapter with get(), data(handle) and put(handle), so every
// impl runs exactly the same benchmark body):
//   weft                    weft::object_pool<buffer> with default options
//                           (32 cached per thread, 1024 in the shared stash,
//                           no reset); a handle is put back explicitly
//   malloc_free             std::malloc(4096) / std::free: no pool at all.
//                           glibc's tcache stops at 1032 bytes, so a 4 KiB
//                           block goes through the arena (and its lock)
//   new_delete              new buffer / delete (default-initialised: no
//                           zeroing, the same bytes as malloc_free)
//   std_vector              std::vector<char>(4096), destroyed on put: the
//                           idiomatic temporary buffer; it zero-fills 4 KiB on
//                           every get, which is part of what that idiom costs
//   mutex_free_list         the pool people write by hand: std::mutex +
//                           std::vector<std::unique_ptr<buffer>> of free
//                           buffers (reserved, at most 1024 kept), shared by
//                           all threads; new buffer when empty
//   thread_local_free_list  a thread_local std::vector<std::unique_ptr<
//                           buffer>> (at most 32 kept): no sharing, no lock.
//                           Not a shared pool (a buffer put on another thread
//                           stays there, and nothing can trim it), but the
//                           fastest thing a user can write for this pattern
//
// Multi-threaded timing: every thread waits at a start gate until all have
// started timing, and at an end gate until all have finished their
// iterations, so each thread's timed window spans the whole concurrent phase
// and items/s is total items / wall time (see bench_support.hpp for why:
// without the gates, oversubscribed runs overstate throughput by up to T x).
#include <weft/object_pool.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench_support.hpp"

namespace {

constexpr std::size_t buffer_size = 4096;

// The pooled object: 4 KiB of bytes, nothing else.
struct buffer {
  char bytes[buffer_size];
};
static_assert(sizeof(buffer) == buffer_size);

// The free lists keep at most as many buffers as weft's defaults do.
constexpr std::size_t shared_keep = 1024;      // object_pool_options::max_shared
constexpr std::size_t per_thread_keep = 32;    // object_pool_options::max_cached_per_thread

// ---------------------------------------------------------------------------
// Adapters: default-constructible; `handle get()`, `static char* data(handle&)`
// and `void put(handle&&)`.

struct weft_impl {
  static constexpr const char* name = "weft";
  using handle = weft::object_pool<buffer>::handle;
  handle get() { return pool.get(); }
  static char* data(handle& h) { return h->bytes; }
  void put(handle&& h) { pool.put(std::move(h)); }
  weft::object_pool<buffer> pool;
};

struct malloc_free_impl {
  static constexpr const char* name = "malloc_free";
  using handle = char*;
  handle get() {
    void* p = std::malloc(buffer_size);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<char*>(p);
  }
  static char* data(handle& h) { return h; }
  void put(handle&& h) { std::free(h); }
};

struct new_delete_impl {
  static constexpr const char* name = "new_delete";
  using handle = buffer*;
  handle get() { return new buffer; }
  static char* data(handle& h) { return h->bytes; }
  void put(handle&& h) { delete h; }
};

struct std_vector_impl {
  static constexpr const char* name = "std_vector";
  using handle = std::vector<char>;
  handle get() { return std::vector<char>(buffer_size); }
  static char* data(handle& h) { return h.data(); }
  void put(handle&& h) { std::vector<char> gone(std::move(h)); }
};

// The hand-written shared pool: one lock around a vector of free buffers.
// A buffer that does not fit is deleted after the lock is released.
class mutex_free_list {
 public:
  mutex_free_list() { free_.reserve(shared_keep); }

  std::unique_ptr<buffer> get() {
    {
      std::lock_guard lock(mutex_);
      if (!free_.empty()) {
        std::unique_ptr<buffer> b = std::move(free_.back());
        free_.pop_back();
        return b;
      }
    }
    return std::unique_ptr<buffer>(new buffer);
  }

  void put(std::unique_ptr<buffer> b) {
    std::lock_guard lock(mutex_);
    if (free_.size() < shared_keep) free_.push_back(std::move(b));
  }  // `b`, if still owned, is deleted here, after the unlock

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<buffer>> free_;
};

struct mutex_free_list_impl {
  static constexpr const char* name = "mutex_free_list";
  using handle = std::unique_ptr<buffer>;
  handle get() { return list.get(); }
  static char* data(handle& h) { return h->bytes; }
  void put(handle&& h) { list.put(std::move(h)); }
  mutex_free_list list;
};

// One free list per thread; lives until the thread exits.
struct thread_local_free_list_impl {
  static constexpr const char* name = "thread_local_free_list";
  using handle = std::unique_ptr<buffer>;

  static std::vector<std::unique_ptr<buffer>>& cache() {
    thread_local std::vector<std::unique_ptr<buffer>> free;
    return free;
  }

  handle get() {
    auto& free = cache();
    if (free.empty()) return std::unique_ptr<buffer>(new buffer);
    std::unique_ptr<buffer> b = std::move(free.back());
    free.pop_back();
    return b;
  }
  static char* data(handle& h) { return h->bytes; }
  void put(handle&& h) {
    auto& free = cache();
    if (free.size() < per_thread_keep) free.push_back(std::move(h));
    else h.reset();
  }
};

using weft_bench::gated_loop;

// Shared by the threads of one run: thread 0 creates it before the timed loop
// and destroys it after; Google Benchmark's barriers at the start and the end
// of the loop order that against the other threads.
template <class Impl>
struct shared_impl {
  static inline std::optional<Impl> instance;
};

template <class Impl>
void object_pool_get_put(benchmark::State& state) {
  auto& shared = shared_impl<Impl>::instance;
  if (state.thread_index() == 0) shared.emplace();
  gated_loop(state, [&] {
    typename Impl::handle h = shared->get();
    char* bytes = Impl::data(h);
    bytes[0] = 1;  // touch it: the buffer must really exist
    benchmark::DoNotOptimize(bytes);
    shared->put(std::move(h));
  });
  if (state.thread_index() == 0) shared.reset();
}

// ---------------------------------------------------------------------------
// Registration: `object_pool_get_put/<impl>`, then /real_time/threads:T.

template <class Impl>
void register_impl() {
  const int max_threads = std::max(4, static_cast<int>(std::thread::hardware_concurrency()));
  auto* b = benchmark::RegisterBenchmark((std::string("object_pool_get_put/") + Impl::name).c_str(),
                                         &object_pool_get_put<Impl>);
  for (int threads : {1, 2, 4, 8, 16}) {
    if (threads <= max_threads) b->Threads(threads);
  }
  b->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_impl<weft_impl>();
  register_impl<malloc_free_impl>();
  register_impl<new_delete_impl>();
  register_impl<std_vector_impl>();
  register_impl<mutex_free_list_impl>();
  register_impl<thread_local_free_list_impl>();

  return weft_bench::run_benchmarks(argc, argv);
}
