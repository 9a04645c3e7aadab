// SPDX-License-Identifier: BSL-1.0
// weft::object_pool: reuse temporary objects (buffers, encoders, request
// structs) so the hot path stops allocating.
//
// Go analogue: sync.Pool. Standard analogue: none (a hand-written free
// list, or std::pmr pools, which are not thread-safe or lock on every call).
//
//   weft::object_pool<std::vector<char>> buffers{
//       [] { std::vector<char> b; b.reserve(64 * 1024); return b; },  // make one
//       [](std::vector<char>& b) { b.clear(); }};                     // reset on return
//   auto buffer = buffers.get();   // a handle: returns the buffer when destroyed
//   buffer->insert(buffer->end(), data.begin(), data.end());
//
// Design: each thread keeps a small cache of objects per pool (at most
// max_cached_per_thread) in front of one shared stash (at most max_shared).
// get() takes the most recently returned object from the calling thread's
// cache; put() returns it there. Only when the cache is empty or full does a
// thread move half a cache's worth to or from the stash, under the stash's
// lock. (A spin-locked vector: moving 16 pointers in and out of it took 16
// ns at 1 thread and 22 ns at 2 on the 2-core VM, against 58 ns and 240 ns
// for moodycamel's ConcurrentQueue bulk operations plus the size bound.)
// Objects beyond both bounds are destroyed (counted as dropped); trim()
// drops what is retained.
//
// Guarantees:
//  - A handle's object is used by nobody else until it comes back.
//  - reset (optional) runs on every object put back, before it can be handed
//    out again; when it returns false the object is destroyed instead (do
//    not keep a buffer that grew to megabytes). It must not throw: puts
//    happen in destructors, so an exception escaping it terminates the
//    program, as from a destructor. A T's destructor may return handles of
//    the pool that destroys it (a node holding its children).
//  - A thread that exits gives its cache back to the stash.
//  - The pool may be destroyed while handles are out or while other threads
//    still have caches for it: nothing dangles and nothing leaks. The pool's
//    shared part lives until the last of them is gone. A handle returned
//    after the pool's destruction destroys its object (reset does not run
//    on it). The destroying thread's cache and the stash are freed at once;
//    another thread's cache is freed when that thread exits, makes a cache
//    for another object_pool, or returns a handle of the destroyed pool.
//  - trim() empties the stash and the calling thread's cache at once; other
//    threads empty theirs at their next get or put on this pool.
//
// Thread safety: get, put, trim and stats may be called concurrently from
// any thread. A handle is used by one thread at a time and may move between
// threads (the object moves with it). Calling members of a pool during or
// after its destruction is undefined, as for any object.
//
// Cost: an uncontended get or put touches only the calling thread's cache
// (a thread-local pointer, a handful of plain loads and stores, no atomic
// read-modify-write, no lock) and one read-mostly word of the pool. Every
// max_cached_per_thread / 2 operations in one direction, a thread locks the
// stash once to move objects in bulk. A miss calls the factory (and
// allocates the object). stats() takes a lock and visits every thread's cache.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/detail/task_tracking.hpp>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft {

struct object_pool_options {
  std::size_t max_cached_per_thread = 32;  // at least 1, at most 2^24
  std::size_t max_shared = 1024;           // 0: no shared stash
  std::string_view name = {};
};

struct object_pool_stats {
  std::string_view name;
  std::uint64_t gets = 0;
  std::uint64_t hits = 0;     // gets served by a retained object
  std::uint64_t misses = 0;   // gets that made a new object
  std::uint64_t puts = 0;
  std::uint64_t dropped = 0;  // objects destroyed: no room in the caches or the stash, trim(), or reset said no
  std::size_t retained = 0;   // objects in the caches and the stash now
};

namespace detail {

// One thread's cache of one pool, as the thread's table of caches sees it.
class object_cache_base {
 public:
  explicit object_cache_base(const void* owner) noexcept : core(owner) {}
  object_cache_base(const object_cache_base&) = delete;
  object_cache_base& operator=(const object_cache_base&) = delete;
  virtual ~object_cache_base() = default;

  // Gives the objects back, detaches from the pool, and deletes this.
  virtual void retire() noexcept = 0;
  // True once the pool is destroyed.
  virtual bool orphaned() const noexcept = 0;

  const void* const core;
};

// The calling thread's most recently used cache: the fast paths read only
// this (a trivially destructible thread_local, so no guard).
inline thread_local constinit object_cache_base* last_object_cache = nullptr;
// Set when the thread's table has been destroyed at thread exit; a handle
// destroyed later on that thread (a thread_local of the user's) bypasses
// the caches.
inline thread_local constinit bool object_caches_gone = false;

class object_cache_table {
 public:
  object_cache_table() = default;
  object_cache_table(const object_cache_table&) = delete;
  object_cache_table& operator=(const object_cache_table&) = delete;

  ~object_cache_table() {
    object_caches_gone = true;
    last_object_cache = nullptr;
    for (auto* cache : std::exchange(caches_, {})) cache->retire();
  }

  object_cache_base* find(const void* core) const noexcept {
    for (auto* cache : caches_) {
      if (cache->core == core) return cache;
    }
    return nullptr;
  }

  void add(object_cache_base& cache) { caches_.push_back(&cache); }

  // Removes and retires one cache.
  void retire(object_cache_base& cache) noexcept {
    caches_.erase(std::find(caches_.begin(), caches_.end(), &cache));
    if (last_object_cache == &cache) last_object_cache = nullptr;
    cache.retire();
  }

  // Retires the caches of pools destroyed since.
  void retire_orphans() noexcept {
    for (std::size_t i = 0; i < caches_.size();) {
      if (caches_[i]->orphaned()) {
        retire(*caches_[i]);
      } else {
        ++i;
      }
    }
  }

 private:
  std::vector<object_cache_base*> caches_;
};

// The calling thread's table, or null once it has been destroyed.
inline object_cache_table* this_thread_object_caches() {
  if (object_caches_gone) return nullptr;
  thread_local object_cache_table table;
  return &table;
}

// A pool's shared part. It lives as long as the pool, any thread's cache of
// it, and any handle out: the pool and each cache hold an anchor, and the
// handles are counted, cheaply, by the caches that give them out and take
// them back (a handle may return on another thread than it left).
template <class T>
class object_pool_core {
 public:
  using factory_type = std::function<std::unique_ptr<T>()>;
  // Returns whether the object may be kept (false: it is destroyed).
  using reset_type = std::function<bool(T&)>;

  object_pool_core(factory_type factory, reset_type reset, const object_pool_options& options)
      : factory_(std::move(factory)),
        reset_(std::move(reset)),
        max_cached_(options.max_cached_per_thread),
        max_shared_(options.max_shared),
        name_(intern(options.name)) {}

  object_pool_core(const object_pool_core&) = delete;
  object_pool_core& operator=(const object_pool_core&) = delete;

  ~object_pool_core() {
    for (T* object : stash_) delete object;
  }

  std::string_view name() const noexcept { return name_ != nullptr ? std::string_view{name_} : std::string_view{}; }

  // A handle's object; the handle is counted until it comes back.
  T* get() {
    if (auto* mine = current_cache(); mine != nullptr && mine->count_now() != 0 && current(*mine)) {
      return mine->take();
    }
    return get_slow();
  }

  // `from_handle`: the object was given out by get() (not adopted).
  void put(T* object, bool from_handle) noexcept {
    // One read of the epoch serves both checks. Returned after the pool's
    // destruction, the object is destroyed unreset (reset may refer to what
    // owned the pool, gone with it). A trim() during reset leaves the cache
    // on a newer epoch than this one, so the object takes the slow path.
    const auto epoch = epoch_.load(std::memory_order_acquire);
    if ((epoch & dead_bit) != 0) return put_slow(object, from_handle);
    if (reset_ && !reset_(*object)) {
      delete object;
      drop_refused(from_handle);
      return;
    }
    if (auto* mine = current_cache();
        mine != nullptr && mine->count_now() < max_cached_ && mine->seen_epoch == epoch) {
      mine->give(object, from_handle);
      return;
    }
    put_slow(object, from_handle);
  }

  // A handle stops counting: its object left the pool (handle::release).
  void forget(bool from_handle) noexcept {
    if (!from_handle) return;
    if (!dead() && !object_caches_gone) {
      if (auto* cache = find_cache()) {
        cache->uncount_handle();
        return;
      }
    }
    forget_after_caches();
  }

  // reset refused an object (too big to keep, say): count it and the
  // handle that brought it.
  void drop_refused(bool from_handle) noexcept {
    if (!dead() && !object_caches_gone) {
      if (auto* cache = find_cache()) {
        cache::bump(cache->dropped);
        cache::bump(cache->puts);
        if (from_handle) cache->uncount_handle();
        return;
      }
    }
    dropped_shared_.fetch_add(1, std::memory_order_relaxed);
    uncached_.puts.fetch_add(1, std::memory_order_relaxed);
    forget_after_caches_if(from_handle);
  }

  void trim() {
    epoch_.fetch_add(trim_step, std::memory_order_acq_rel);
    if (auto* cache = find_cache()) cache->catch_up();
    drop_stash();
  }

  object_pool_stats stats() const {
    object_pool_stats s;
    s.name = name();
    {
      std::lock_guard lock(caches_mutex_);
      s.gets = retired_.gets + uncached_.gets.load(std::memory_order_relaxed);
      s.misses = retired_.misses + uncached_.misses.load(std::memory_order_relaxed);
      s.puts = retired_.puts + uncached_.puts.load(std::memory_order_relaxed);
      s.dropped = retired_.dropped + dropped_shared_.load(std::memory_order_relaxed);
      for (const cache* c = caches_; c != nullptr; c = c->next) {
        s.gets += c->gets.load(std::memory_order_relaxed);
        s.misses += c->misses.load(std::memory_order_relaxed);
        s.puts += c->puts.load(std::memory_order_relaxed);
        s.dropped += c->dropped.load(std::memory_order_relaxed);
        s.retained += c->count_now();
      }
    }
    s.retained += stash_size_.load(std::memory_order_relaxed);
    // Each count is read at its own moment, and a get that missed between
    // the reads of `gets` and `misses` is in the second only: leave it out,
    // as of a moment before it, so that hits + misses == gets.
    s.misses = std::min(s.misses, s.gets);
    s.hits = s.gets - s.misses;
    return s;
  }

  // The pool is being destroyed: free what can be freed now.
  void abandon() noexcept {
    epoch_.fetch_or(dead_bit, std::memory_order_acq_rel);
    if (auto* cache = find_cache()) this_thread_object_caches()->retire(*cache);
    drop_stash();
    drop_references(-anchor);
  }

 private:
  // The epoch: bit 0 is set when the pool is destroyed; every trim() adds
  // 2. A cache that saw another epoch empties itself before its next use.
  static constexpr std::uint64_t dead_bit = 1;
  static constexpr std::uint64_t trim_step = 2;

  // references_ = anchor * (1 + caches attached) + handles counted so far.
  // A cache's own count of the handles it gave out minus those it took
  // back is added when it detaches, or when it grows past flush_threshold;
  // so the total reaches zero exactly when the pool is gone, no cache is
  // attached and no handle is out (the handle count cannot fall to -anchor
  // while some cache is attached, given fewer than 2^19 threads).
  static constexpr std::int64_t anchor = std::int64_t{1} << 40;
  static constexpr std::int64_t flush_threshold = std::int64_t{1} << 20;

  struct counters {
    std::uint64_t gets = 0, misses = 0, puts = 0, dropped = 0;
  };

  class cache final : public object_cache_base {
   public:
    // The object slots follow the cache in one allocation, so reaching
    // them costs no load.
    static cache* make(object_pool_core& owner, std::uint64_t epoch) {
      void* memory = ::operator new(sizeof(cache) + owner.max_cached_ * sizeof(T*));
      return ::new (memory) cache(owner, epoch);
    }

    static void destroy(cache* self) noexcept {
      self->~cache();
      ::operator delete(static_cast<void*>(self));
    }

    void retire() noexcept override {
      pool.detach(*this);
      destroy(this);
    }

    T** objects() noexcept { return reinterpret_cast<T**>(this + 1); }
    bool orphaned() const noexcept override { return pool.dead(); }

    std::size_t count_now() const noexcept { return count.load(std::memory_order_relaxed); }

    T* take() noexcept {
      const auto n = count_now() - 1;
      count.store(n, std::memory_order_relaxed);
      bump(gets);
      ++handles;
      return objects()[n];
    }

    void give(T* object, bool from_handle) noexcept {
      const auto n = count_now();
      objects()[n] = object;
      count.store(n + 1, std::memory_order_relaxed);
      bump(puts);
      if (from_handle) --handles;
    }

    void uncount_handle() noexcept { --handles; }

    // Empties the cache if a trim came since it last looked.
    void catch_up() noexcept {
      const auto epoch = pool.epoch_.load(std::memory_order_acquire);
      if (seen_epoch == epoch) return;
      seen_epoch = epoch;
      while (count_now() != 0) {
        delete pop();
        bump(dropped);
      }
    }

    // Takes the newest object out, leaving the cache whole before the
    // caller destroys it: a T's destructor may put a handle of this pool
    // back, into this very cache.
    T* pop() noexcept {
      const auto n = count_now() - 1;
      count.store(n, std::memory_order_relaxed);
      return objects()[n];
    }

    // Adds the handle count to the pool's when it has grown large.
    void flush_handles_if_large() noexcept {
      if (handles > flush_threshold || handles < -flush_threshold) {
        pool.references_.fetch_add(std::exchange(handles, 0), std::memory_order_relaxed);
      }
    }

    static void bump(std::atomic<std::uint64_t>& counter, std::uint64_t by = 1) noexcept {
      counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
    }

    object_pool_core& pool;
    // objects()[0, count): oldest first; the owner thread's only.
    std::atomic<std::size_t> count{0};
    std::uint64_t seen_epoch;
    std::int64_t handles = 0;  // given out minus taken back, not yet added to references_
    // Written by the owner thread only; atomic so stats() may read them.
    std::atomic<std::uint64_t> gets{0}, misses{0}, puts{0}, dropped{0};
    // The pool's list of attached caches, under caches_mutex_.
    cache* next = nullptr;
    cache* previous = nullptr;

   private:
    cache(object_pool_core& owner, std::uint64_t epoch) : object_cache_base(&owner), pool(owner), seen_epoch(epoch) {}
    ~cache() override = default;
  };

  bool current(const cache& mine) const noexcept {
    return mine.seen_epoch == epoch_.load(std::memory_order_relaxed);
  }

  bool dead() const noexcept { return (epoch_.load(std::memory_order_acquire) & dead_bit) != 0; }

  cache* current_cache() const noexcept {
    auto* last = last_object_cache;
    return last != nullptr && last->core == this ? static_cast<cache*>(last) : nullptr;
  }

  // The calling thread's cache of this pool, if it has one.
  cache* find_cache() noexcept {
    if (auto* last = current_cache()) return last;
    auto* table = object_caches_gone ? nullptr : this_thread_object_caches();
    auto* found = table != nullptr ? table->find(this) : nullptr;
    if (found != nullptr) last_object_cache = found;
    return static_cast<cache*>(found);
  }

  // The calling thread's cache, made if missing; null once the thread's
  // table is gone (thread exit) or if the pool is gone.
  cache* find_or_attach_cache() {
    if (auto* found = find_cache()) return found;
    auto* table = this_thread_object_caches();
    if (table == nullptr) return nullptr;
    table->retire_orphans();
    if (dead()) return nullptr;
    auto* fresh = cache::make(*this, epoch_.load(std::memory_order_acquire));
    try {
      table->add(*fresh);
    } catch (...) {
      cache::destroy(fresh);
      throw;
    }
    {
      std::lock_guard lock(caches_mutex_);
      fresh->next = caches_;
      if (caches_ != nullptr) caches_->previous = fresh;
      caches_ = fresh;
    }
    references_.fetch_add(anchor, std::memory_order_relaxed);
    last_object_cache = fresh;
    return fresh;
  }

  WEFT_NOINLINE T* get_slow() {
    cache* mine = find_or_attach_cache();
    if (mine == nullptr) {
      T* object = take_one_from_stash();
      if (object == nullptr) {
        object = make();
        uncached_.misses.fetch_add(1, std::memory_order_relaxed);
      }
      uncached_.gets.fetch_add(1, std::memory_order_relaxed);
      references_.fetch_add(1, std::memory_order_relaxed);
      return object;
    }
    mine->catch_up();
    if (mine->count_now() == 0) refill(*mine);
    if (mine->count_now() != 0) {
      // A thread that only gets (a producer handing objects on) comes here
      // once per refill: the handle count it keeps stays bounded.
      T* object = mine->take();
      mine->flush_handles_if_large();
      return object;
    }
    T* object = make();
    cache::bump(mine->gets);
    cache::bump(mine->misses);
    ++mine->handles;
    mine->flush_handles_if_large();
    return object;
  }

  WEFT_NOINLINE void put_slow(T* object, bool from_handle) noexcept {
    cache* mine = nullptr;
    if (!dead()) {
      try {
        mine = find_or_attach_cache();
      } catch (...) {  // no memory for a cache: use the stash
      }
      if (mine != nullptr) mine->catch_up();
    }
    // Asked again once the cache has caught up: a pool destroyed while this
    // thread found or attached its cache left that cache holding the dead
    // epoch as current, and the fast path would then keep every handle of
    // the dead pool returned on this thread.
    if (dead()) {  // a handle came back after the pool was destroyed
      delete object;
      // This thread's cache of the dead pool goes too. The handle is still
      // counted, so the pool's shared part outlives the retirement.
      if (auto* cache = object_caches_gone ? nullptr : find_cache())
        this_thread_object_caches()->retire(*cache);
      forget_after_caches_if(from_handle);
      return;
    }
    if (mine == nullptr) {
      put_into_stash(object);
      uncached_.puts.fetch_add(1, std::memory_order_relaxed);
      forget_after_caches_if(from_handle);
      return;
    }
    // A spill destroys objects, whose destructors may refill the cache.
    while (mine->count_now() == max_cached_) spill(*mine);
    mine->give(object, from_handle);
    mine->flush_handles_if_large();
  }

  T* make() {
    auto made = factory_();
    if (made == nullptr) throw std::logic_error("weft::object_pool: the factory returned a null pointer");
    return made.release();
  }

  std::size_t batch() const noexcept { return std::max<std::size_t>(1, max_cached_ / 2); }

  void refill(cache& mine) noexcept {
    std::lock_guard lock(stash_mutex_);
    const auto n = std::min(batch(), stash_.size());
    std::copy(stash_.end() - static_cast<std::ptrdiff_t>(n), stash_.end(), mine.objects());
    stash_.resize(stash_.size() - n);
    stash_size_.store(stash_.size(), std::memory_order_relaxed);
    mine.count.store(n, std::memory_order_relaxed);
  }

  // Moves the older half of a full cache to the stash; what the stash has
  // no room for is destroyed, once the cache is whole again (see pop()).
  void spill(cache& mine) noexcept {
    const auto n = batch();
    std::size_t kept = 0;
    {
      std::lock_guard lock(stash_mutex_);
      kept = std::min(n, max_shared_ - std::min(max_shared_, stash_.size()));
      try {
        stash_.insert(stash_.end(), mine.objects(), mine.objects() + kept);
      } catch (...) {
        kept = 0;
      }
      stash_size_.store(stash_.size(), std::memory_order_relaxed);
    }
    // [0, kept) went to the stash; [kept, n) are to go. Kept: the newer
    // ones, first, and then those to go, on top, to be popped.
    T** objects = mine.objects();
    const auto count = mine.count_now();
    std::rotate(objects + kept, objects + n, objects + count);
    if (kept != 0) std::copy(objects + kept, objects + count, objects);
    mine.count.store(count - kept, std::memory_order_relaxed);
    for (std::size_t doomed = n - kept; doomed != 0; --doomed) {
      delete mine.pop();
      cache::bump(mine.dropped);
    }
  }

  T* take_one_from_stash() noexcept {
    std::lock_guard lock(stash_mutex_);
    if (stash_.empty()) return nullptr;
    T* object = stash_.back();
    stash_.pop_back();
    stash_size_.store(stash_.size(), std::memory_order_relaxed);
    return object;
  }

  void put_into_stash(T* object) noexcept {
    {
      std::lock_guard lock(stash_mutex_);
      if (stash_.size() < max_shared_) {
        try {
          stash_.push_back(object);
          stash_size_.store(stash_.size(), std::memory_order_relaxed);
          return;
        } catch (...) {  // no memory: drop it below
        }
      }
    }
    delete object;
    dropped_shared_.fetch_add(1, std::memory_order_relaxed);
  }

  void drop_stash() noexcept {
    std::vector<T*> dropped;
    {
      std::lock_guard lock(stash_mutex_);
      dropped.swap(stash_);
      stash_size_.store(0, std::memory_order_relaxed);
    }
    for (T* object : dropped) delete object;
    dropped_shared_.fetch_add(dropped.size(), std::memory_order_relaxed);
  }

  // With no cache to count it in, a handle is counted in references_.
  void forget_after_caches() noexcept { drop_references(-1); }
  void forget_after_caches_if(bool from_handle) noexcept {
    if (from_handle) forget_after_caches();
  }

  // Called by the cache's owner thread (at its exit, or when it finds the
  // pool gone), never concurrently with that thread's other uses of it.
  void detach(cache& leaving) noexcept {
    const bool keep = current(leaving) && !dead();
    while (leaving.count_now() != 0) {
      T* object = leaving.pop();
      if (keep) {
        put_into_stash(object);
      } else {
        delete object;
        cache::bump(leaving.dropped);
      }
    }
    {
      std::lock_guard lock(caches_mutex_);
      retired_.gets += leaving.gets.load(std::memory_order_relaxed);
      retired_.misses += leaving.misses.load(std::memory_order_relaxed);
      retired_.puts += leaving.puts.load(std::memory_order_relaxed);
      retired_.dropped += leaving.dropped.load(std::memory_order_relaxed);
      (leaving.previous != nullptr ? leaving.previous->next : caches_) = leaving.next;
      if (leaving.next != nullptr) leaving.next->previous = leaving.previous;
    }
    drop_references(leaving.handles - anchor);
  }

  void drop_references(std::int64_t delta) noexcept {
    if (references_.fetch_add(delta, std::memory_order_acq_rel) + delta == 0) delete this;
  }

  // Read on every get and put; written only by trim() and the destructor.
  const factory_type factory_;
  const reset_type reset_;
  const std::size_t max_cached_;
  const std::size_t max_shared_;
  const char* const name_;
  std::atomic<std::uint64_t> epoch_{0};

  alignas(64) std::atomic<std::int64_t> references_{anchor};  // the pool's own anchor

  alignas(64) detail::spin_mutex stash_mutex_;
  std::vector<T*> stash_;  // under stash_mutex_
  std::atomic<std::size_t> stash_size_{0};
  std::atomic<std::uint64_t> dropped_shared_{0};
  // What threads without a cache (exiting ones) did.
  struct {
    std::atomic<std::uint64_t> gets{0}, misses{0}, puts{0};
  } uncached_;

  mutable std::mutex caches_mutex_;
  cache* caches_ = nullptr;  // under caches_mutex_
  counters retired_;         // under caches_mutex_: what detached caches counted
};

}  // namespace detail

template <class T>
class object_pool {
  using core_type = detail::object_pool_core<T>;

 public:
  using value_type = T;

  // An object on loan: put back into the pool when destroyed or assigned
  // over, unless release() took it out.
  class [[nodiscard]] handle {
   public:
    handle() noexcept = default;
    handle(handle&& other) noexcept
        : core_(std::exchange(other.core_, nullptr)), object_(std::exchange(other.object_, nullptr)) {}
    handle& operator=(handle&& other) noexcept {
      if (this != &other) {
        reset();
        core_ = std::exchange(other.core_, nullptr);
        object_ = std::exchange(other.object_, nullptr);
      }
      return *this;
    }
    ~handle() { reset(); }

    explicit operator bool() const noexcept { return object_ != nullptr; }
    T* get() const noexcept { return object_; }
    T& operator*() const noexcept {
      WEFT_ASSERT(object_ != nullptr && "weft::object_pool::handle: empty handle");
      return *object_;
    }
    T* operator->() const noexcept { return &**this; }

    // Puts the object back now.
    void reset() noexcept {
      if (object_ != nullptr) std::exchange(core_, nullptr)->put(std::exchange(object_, nullptr), true);
    }

    // Takes the object out of the pool for good.
    std::unique_ptr<T> release() noexcept {
      if (object_ == nullptr) return nullptr;
      std::exchange(core_, nullptr)->forget(true);
      return std::unique_ptr<T>(std::exchange(object_, nullptr));
    }

   private:
    friend class object_pool;
    handle(core_type* core, T* object) noexcept : core_(core), object_(object) {}

    core_type* core_ = nullptr;
    T* object_ = nullptr;
  };

  // `factory` makes an object: it returns a T, or a std::unique_ptr<T>.
  // `reset`, if given, is called with each object put back; it returns
  // void, or bool: false destroys the object instead of keeping it (a
  // buffer that grew too large, say).
  template <class Factory>
    requires std::invocable<Factory&>
  explicit object_pool(Factory factory, object_pool_options options = {})
      : core_(new core_type(wrap_factory(std::move(factory)), {}, checked(options))) {}

  template <class Factory, class Reset>
    requires std::invocable<Factory&> && std::invocable<Reset&, T&>
  object_pool(Factory factory, Reset reset, object_pool_options options = {})
      : core_(new core_type(wrap_factory(std::move(factory)), wrap_reset(std::move(reset)), checked(options))) {}

  // Objects made by value-initialising T.
  explicit object_pool(object_pool_options options = {})
    requires std::default_initializable<T>
      : object_pool([] { return std::make_unique<T>(); }, options) {}

  object_pool(const object_pool&) = delete;
  object_pool& operator=(const object_pool&) = delete;

  ~object_pool() { core_->abandon(); }

  std::string_view name() const noexcept { return core_->name(); }

  // A retained object, or a new one from the factory (whose exceptions
  // propagate).
  handle get() { return handle{core_, core_->get()}; }

  // Same as destroying the handle.
  void put(handle&& object) noexcept { handle{std::move(object)}.reset(); }

  // Adopts an object made elsewhere (or released from a handle).
  void put(std::unique_ptr<T> object) noexcept {
    if (object != nullptr) core_->put(object.release(), false);
  }

  // Destroys the retained objects: the stash's and the calling thread's
  // cache's now, other threads' caches at their next get or put.
  void trim() { core_->trim(); }

  object_pool_stats stats() const { return core_->stats(); }

 private:
  static const object_pool_options& checked(const object_pool_options& options) {
    if (options.max_cached_per_thread == 0) {
      throw std::invalid_argument("weft::object_pool: max_cached_per_thread must be at least 1");
    }
    // Each thread's cache is one allocation of this many pointers; a count
    // whose size in bytes overflows would allocate too little.
    if (options.max_cached_per_thread > max_cached_per_thread_limit) {
      throw std::invalid_argument(
          "weft::object_pool: max_cached_per_thread must be at most 2^24, got " +
          std::to_string(options.max_cached_per_thread));
    }
    return options;
  }

  static constexpr std::size_t max_cached_per_thread_limit = std::size_t{1} << 24;

  template <class Factory>
  static typename core_type::factory_type wrap_factory(Factory factory) {
    using made = std::invoke_result_t<Factory&>;
    if constexpr (std::is_same_v<made, std::unique_ptr<T>>) {
      return factory;
    } else {
      static_assert(std::is_convertible_v<made, T>, "weft::object_pool: the factory must return a T or a std::unique_ptr<T>");
      return [factory = std::move(factory)]() mutable { return std::make_unique<T>(factory()); };
    }
  }

  template <class Reset>
  static typename core_type::reset_type wrap_reset(Reset reset) {
    if constexpr (std::is_convertible_v<std::invoke_result_t<Reset&, T&>, bool>) {
      return reset;
    } else {
      return [reset = std::move(reset)](T& object) mutable {
        reset(object);
        return true;
      };
    }
  }

  core_type* core_;
};

}  // namespace weft
