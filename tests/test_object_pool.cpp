// SPDX-License-Identifier: BSL-1.0
// Tests for weft::object_pool (weft/object_pool.hpp): reuse, reset, bounds,
// trim, stats, bad input, thread exit, and the lifetimes the header promises:
// a pool destroyed while handles are out and while other threads still cache
// its objects neither crashes nor leaks. Every object counts itself, so a
// leak or a double destruction shows as a wrong count (and ASan sees both).
//
// Hand-offs between threads are latches and joins; nothing sleeps.
#include <weft/object_pool.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "support.hpp"

namespace {

// An object that counts how many of its kind exist and detects being handed
// to two users at once.
struct tracked {
  explicit tracked(std::atomic<int>& live_count) : live(&live_count) { live->fetch_add(1); }
  tracked(const tracked& other) : live(other.live) { live->fetch_add(1); }
  tracked& operator=(const tracked&) = delete;
  ~tracked() { live->fetch_sub(1); }

  std::atomic<int>* live;
  std::atomic<bool> in_use{false};
  int resets = 0;
  int value = 0;
};

using tracked_pool = weft::object_pool<tracked>;

tracked_pool make_tracked_pool(std::atomic<int>& live, weft::object_pool_options options = {}) {
  return tracked_pool{[&live] { return std::make_unique<tracked>(live); }, [](tracked& t) { ++t.resets; }, options};
}

}  // namespace

TEST_CASE("object_pool: a returned object is reused, reset first, and counted") {
  std::atomic<int> live{0};
  {
    tracked_pool pool{[&live] { return std::make_unique<tracked>(live); }, [](tracked& t) {
                        ++t.resets;
                        t.value = 0;
                      }, {.name = "buffers"}};
    CHECK(pool.name() == "buffers");
    tracked* first = nullptr;
    {
      auto h = pool.get();
      REQUIRE(h);
      first = h.get();
      h->value = 42;
    }
    auto again = pool.get();
    CHECK(again.get() == first);
    CHECK(again->value == 0);
    CHECK(again->resets == 1);

    auto other = pool.get();  // the cache is empty now: a new one
    CHECK(other.get() != first);
    CHECK(live == 2);

    const auto s = pool.stats();
    CHECK(s.name == "buffers");
    CHECK(s.gets == 3);
    CHECK(s.misses == 2);
    CHECK(s.hits == 1);
    CHECK(s.puts == 1);
    CHECK(s.dropped == 0);
    CHECK(s.retained == 0);
  }
  CHECK(live == 0);
}

TEST_CASE("object_pool: factories may return a T or a unique_ptr, and T{} is the default") {
  weft::object_pool<std::vector<int>> by_value{[] { return std::vector<int>(16, 7); }};
  CHECK(by_value.get()->size() == 16);

  weft::object_pool<std::vector<int>> by_pointer{[] { return std::make_unique<std::vector<int>>(3); }};
  CHECK(by_pointer.get()->size() == 3);

  weft::object_pool<std::vector<int>> defaulted;
  CHECK(defaulted.get()->empty());

  weft::object_pool<std::vector<int>> with_reset{[] { return std::vector<int>{}; },
                                                 [](std::vector<int>& v) { v.clear(); }};
  { with_reset.get()->push_back(1); }
  CHECK(with_reset.get()->empty());
}

TEST_CASE("object_pool: a reset that returns false keeps an oversized object out of the pool") {
  weft::object_pool<std::vector<char>> buffers{[] { return std::vector<char>(); }, [](std::vector<char>& b) {
                                                 b.clear();
                                                 return b.capacity() <= 4096;
                                               }};
  {
    auto small = buffers.get();
    auto big = buffers.get();
    small->resize(100);
    big->resize(1 << 20);
  }
  const auto s = buffers.stats();
  CHECK(s.puts == 2);
  CHECK(s.dropped == 1);
  CHECK(s.retained == 1);
  CHECK(buffers.get()->capacity() <= 4096);
}

TEST_CASE("object_pool: an object goes back when an exception unwinds its handle's scope") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live);
  CHECK_THROWS_AS(
      [&] {
        auto h = pool.get();
        throw std::runtime_error("request failed");
      }(),
      std::runtime_error);
  CHECK(pool.stats().puts == 1);
  CHECK(pool.stats().retained == 1);
}

TEST_CASE("object_pool: bad input is reported at once") {
  CHECK_THROWS_AS((weft::object_pool<int>{{.max_cached_per_thread = 0}}), std::invalid_argument);
  // Its cache's size in bytes wrapped: a 96-byte cache, written past its end.
  CHECK_THROWS_AS((weft::object_pool<int>{{.max_cached_per_thread = SIZE_MAX / 8 + 1}}),
                  std::invalid_argument);
  CHECK_THROWS_AS((weft::object_pool<int>{{.max_cached_per_thread = (std::size_t{1} << 24) + 1}}),
                  std::invalid_argument);
  CHECK_NOTHROW((weft::object_pool<int>{{.max_cached_per_thread = std::size_t{1} << 24}}));
  weft::object_pool<int> null_factory{[] { return std::unique_ptr<int>{}; }};
  CHECK_THROWS_AS((void)null_factory.get(), std::logic_error);
  weft::object_pool<int> throwing_factory{[]() -> int { throw std::runtime_error("no memory for you"); }};
  CHECK_THROWS_WITH_AS((void)throwing_factory.get(), "no memory for you", std::runtime_error);
  CHECK(throwing_factory.stats().gets == 0);
}

TEST_CASE("object_pool: at most max_cached_per_thread + max_shared are retained, the rest are destroyed") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live, {.max_cached_per_thread = 4, .max_shared = 6});
  {
    std::vector<tracked_pool::handle> out;
    for (int i = 0; i < 20; ++i) out.push_back(pool.get());
    CHECK(live == 20);
  }
  const auto s = pool.stats();
  CHECK(s.retained == 10);
  CHECK(s.dropped == 10);
  CHECK(s.puts == 20);
  CHECK(live == 10);

  // Everything retained comes back without the factory.
  std::vector<tracked_pool::handle> again;
  for (int i = 0; i < 10; ++i) again.push_back(pool.get());
  CHECK(pool.stats().misses == 20);
  CHECK(live == 10);
}

TEST_CASE("object_pool: max_shared 0 keeps only the per-thread cache") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live, {.max_cached_per_thread = 2, .max_shared = 0});
  {
    std::vector<tracked_pool::handle> out;
    for (int i = 0; i < 5; ++i) out.push_back(pool.get());
  }
  CHECK(pool.stats().retained == 2);
  CHECK(live == 2);
}

TEST_CASE("object_pool: trim drops the stash and the caller's cache at once") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live, {.max_cached_per_thread = 4, .max_shared = 16});
  {
    std::vector<tracked_pool::handle> out;
    for (int i = 0; i < 8; ++i) out.push_back(pool.get());
  }
  REQUIRE(pool.stats().retained == 8);
  pool.trim();
  CHECK(live == 0);
  CHECK(pool.stats().retained == 0);
  CHECK(pool.stats().dropped == 8);
}

TEST_CASE("object_pool: another thread empties its cache at its next use after a trim") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live, {.max_cached_per_thread = 4, .max_shared = 0});
  { auto here = pool.get(); }  // cached by this thread
  std::latch cached{1};
  std::latch trimmed{1};
  std::latch used{1};
  std::latch checked{1};
  std::thread other{[&] {
    { auto h = pool.get(); }  // a new object, cached by this thread
    cached.count_down();
    trimmed.wait();
    { auto h = pool.get(); }  // sees the trim: the cached object is destroyed first
    used.count_down();
    checked.wait();
  }};
  cached.wait();
  CHECK(live == 2);
  pool.trim();
  CHECK(live == 1);  // the other thread's cached object is left until it looks
  trimmed.count_down();
  used.wait();
  CHECK(live == 1);  // it was destroyed; the one it got since is cached again
  CHECK(pool.stats().misses == 3);
  checked.count_down();
  other.join();
  CHECK(live == 0);  // with no stash, the exiting thread's cache is destroyed
}

TEST_CASE("object_pool: a thread that exits gives its cache back") {
  std::atomic<int> live{0};
  auto pool = make_tracked_pool(live, {.max_cached_per_thread = 8, .max_shared = 64});
  std::thread worker{[&] {
    std::vector<tracked_pool::handle> out;
    for (int i = 0; i < 6; ++i) out.push_back(pool.get());
  }};
  worker.join();
  CHECK(pool.stats().retained == 6);
  std::vector<tracked_pool::handle> here;
  for (int i = 0; i < 6; ++i) here.push_back(pool.get());
  CHECK(pool.stats().misses == 6);  // all six came from the exited thread
  CHECK(live == 6);
}

TEST_CASE("object_pool: handles may outlive the pool, on this thread and on others") {
  std::atomic<int> live{0};
  std::latch holding{1};
  std::latch pool_gone{1};
  std::thread other;
  {
    std::unique_ptr<tracked_pool> pool{new tracked_pool(make_tracked_pool(live))};
    auto kept_here = pool->get();
    other = std::thread{[&, h = pool->get()]() mutable {
      holding.count_down();
      pool_gone.wait();
      h->value = 1;  // still ours
    }};  // h is destroyed at the end of the thread, after the pool
    holding.wait();
    { auto cached = pool->get(); }  // one object retained in this thread's cache
    CHECK(live == 3);
    pool.reset();
    CHECK(live == 2);  // the cached one went with the pool; two handles remain
    pool_gone.count_down();
  }
  other.join();
  CHECK(live == 0);
}

namespace {

// A pooled object that holds a handle of its own pool: destroying it puts
// that handle back, into the cache being emptied.
struct tree_node {
  explicit tree_node(std::atomic<int>& live_count) : live(&live_count) { live->fetch_add(1); }
  ~tree_node() { live->fetch_sub(1); }
  std::atomic<int>* live;
  weft::object_pool<tree_node>::handle child;
};

}  // namespace

// The cache was emptied by destroying its objects before it forgot them: a
// child returned meanwhile was destroyed twice (a spill) or lost (a trim).
TEST_CASE(
    "object_pool: an object whose destructor returns a handle of its pool is destroyed once") {
  std::atomic<int> live{0};
  {
    weft::object_pool<tree_node> pool{[&live] { return std::make_unique<tree_node>(live); },
                                      {.max_cached_per_thread = 2, .max_shared = 0}};
    SUBCASE("as a full cache spills") {
      auto parent = pool.get();
      parent->child = pool.get();
      auto second = pool.get();
      auto third = pool.get();
      parent = {};
      second = {};  // the cache is full
      third = {};   // spills the parent, whose child comes back
      CHECK(live == 2);
    }
    SUBCASE("as a trim empties the cache") {
      {
        auto parent = pool.get();
        parent->child = pool.get();
      }
      pool.trim();
      CHECK(live == 0);
      CHECK(pool.stats().retained == 0);
    }
    SUBCASE("as the pool goes") {
      auto parent = pool.get();
      parent->child = pool.get();
      parent = {};
    }
  }
  CHECK(live == 0);
}

// reset ran on a handle returned after the pool's destruction, and a reset
// that refers to the pool's owner read freed memory.
TEST_CASE("object_pool: reset does not run on an object returned after the pool is gone") {
  std::atomic<int> live{0};
  int resets = 0;
  tracked_pool::handle late;
  {
    tracked_pool pool{[&live] { return std::make_unique<tracked>(live); },
                      [&resets](tracked&) { ++resets; }};
    late = pool.get();
    { auto once = pool.get(); }
    CHECK(resets == 1);
  }
  late = {};
  CHECK(resets == 1);
  CHECK(live == 0);
}

TEST_CASE("object_pool: another thread's cache of a destroyed pool is freed when it exits or uses a pool again") {
  std::atomic<int> live{0};
  SUBCASE("at thread exit") {
    std::latch cached{1};
    std::latch pool_gone{1};
    std::thread other;
    {
      auto pool = make_tracked_pool(live);
      other = std::thread{[&] {
        { auto a = pool.get(), b = pool.get(); }  // both cached by this thread
        cached.count_down();
        pool_gone.wait();
      }};
      cached.wait();
      CHECK(live == 2);
    }
    CHECK(live == 2);  // still in the other thread's cache
    pool_gone.count_down();
    other.join();
    CHECK(live == 0);
  }
  SUBCASE("when the thread next makes a cache for another pool") {
    std::latch cached{1};
    std::latch pool_gone{1};
    std::latch swept{1};
    std::latch checked{1};
    std::thread other;
    auto second = make_tracked_pool(live);
    {
      auto pool = make_tracked_pool(live);
      other = std::thread{[&] {
        { auto a = pool.get(); }
        cached.count_down();
        pool_gone.wait();
        { auto b = second.get(); }  // this thread's first use of `second`
        swept.count_down();
        checked.wait();
      }};
      cached.wait();
    }
    pool_gone.count_down();
    swept.wait();
    CHECK(live == 1);  // only `second`'s object, cached by the other thread
    checked.count_down();
    other.join();
  }
  SUBCASE("when a handle of the destroyed pool comes back on that thread") {
    std::latch cached{1};
    std::latch pool_gone{1};
    std::latch returned{1};
    std::latch checked{1};
    std::thread other;
    {
      auto pool = make_tracked_pool(live);
      other = std::thread{[&, late = pool.get()]() mutable {
        { auto a = pool.get(); }
        cached.count_down();
        pool_gone.wait();
        late.reset();
        returned.count_down();
        checked.wait();
      }};
      cached.wait();
    }
    pool_gone.count_down();
    returned.wait();
    CHECK(live == 0);
    checked.count_down();
    other.join();
  }
}

TEST_CASE("object_pool: release takes an object out for good, put adopts one") {
  std::atomic<int> live{0};
  std::unique_ptr<tracked> taken;
  {
    auto pool = make_tracked_pool(live);
    taken = pool.get().release();
    REQUIRE(taken != nullptr);
    CHECK(pool.stats().retained == 0);
    CHECK(pool.stats().gets == 1);

    pool.put(std::make_unique<tracked>(live));
    CHECK(pool.stats().retained == 1);
    auto h = pool.get();
    CHECK(h->resets == 1);  // reset ran on the adopted object
    pool.put(std::move(h));
    CHECK_FALSE(h);
    CHECK(pool.stats().retained == 1);
  }
  CHECK(live == 1);  // only the released object
  taken.reset();
  CHECK(live == 0);
}

TEST_CASE("object_pool: a handle released after the pool is gone is still the caller's") {
  std::atomic<int> live{0};
  tracked_pool::handle outliving;
  {
    auto pool = make_tracked_pool(live);
    outliving = pool.get();
  }
  auto mine = outliving.release();
  CHECK(live == 1);
  mine.reset();
  CHECK(live == 0);
}

TEST_CASE("object_pool: under concurrent use no object is handed to two users, and none is lost") {
  constexpr int threads = 6;
  const int rounds = weft_test::under_sanitizer ? 3'000 : 30'000;
  std::atomic<int> live{0};
  std::atomic<int> double_use{0};
  {
    auto pool = make_tracked_pool(live, {.max_cached_per_thread = 4, .max_shared = 8});
    // Handles cross threads through this exchange, so puts happen on other
    // threads than the gets.
    std::mutex exchange_mutex;
    std::vector<tracked_pool::handle> exchange;
    std::latch start{threads};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, seed = static_cast<unsigned>(t)] {
        std::minstd_rand random{seed + 1};
        std::vector<tracked_pool::handle> held;
        start.arrive_and_wait();
        for (int i = 0; i < rounds; ++i) {
          switch (random() % 8) {
            case 0:
            case 1:
            case 2: {
              auto h = pool.get();
              if (h->in_use.exchange(true)) double_use.fetch_add(1);
              held.push_back(std::move(h));
              break;
            }
            case 3:
            case 4:
              if (!held.empty()) {
                held.back()->in_use = false;
                held.pop_back();
              }
              break;
            case 5:
              if (!held.empty()) {
                held.back()->in_use = false;
                std::lock_guard lock(exchange_mutex);
                exchange.push_back(std::move(held.back()));
                held.pop_back();
              }
              break;
            case 6: {
              std::lock_guard lock(exchange_mutex);
              exchange.clear();
              break;
            }
            case 7:
              if (random() % 64 == 0) pool.trim();
              if (random() % 16 == 0) (void)pool.stats();
              break;
          }
        }
        for (auto& h : held) h->in_use = false;
      });
    }
    for (auto& worker : workers) worker.join();
    exchange.clear();
    const auto s = pool.stats();
    CHECK(s.gets == s.puts);
    CHECK(s.hits + s.misses == s.gets);
    CHECK(static_cast<int>(s.retained) == live);
    CHECK(s.misses - s.dropped == s.retained);  // made = destroyed + retained
  }
  CHECK(double_use == 0);
  CHECK(live == 0);
}

// stats() reads each count at its own moment: a get that missed between the
// reads of `gets` and `misses` made misses exceed gets, and hits (their
// difference) wrap around.
TEST_CASE("object_pool: stats read while other threads miss never count more misses than gets") {
  constexpr int threads = 2;
  const int gets_per_thread = weft_test::under_sanitizer ? 20'000 : 200'000;
  weft::object_pool<int> pool{[] { return 0; }};
  std::atomic<int> getting{threads};
  std::latch counted{threads + 1};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      // Nothing goes back until every get is counted, so every get misses.
      std::vector<weft::object_pool<int>::handle> held;
      held.reserve(static_cast<std::size_t>(gets_per_thread));
      for (int i = 0; i < gets_per_thread; ++i) held.push_back(pool.get());
      getting.fetch_sub(1);
      counted.arrive_and_wait();
    });
  }
  std::uint64_t inconsistent = 0;
  while (getting.load() != 0) {
    const auto s = pool.stats();
    inconsistent += s.misses > s.gets || s.hits > s.gets ? 1 : 0;
  }
  const auto s = pool.stats();
  counted.arrive_and_wait();
  for (auto& worker : workers) worker.join();
  CHECK(inconsistent == 0);
  CHECK(s.gets == static_cast<std::uint64_t>(threads * gets_per_thread));
  CHECK(s.hits == 0);
}
