// SPDX-License-Identifier: BSL-1.0
// weft::resource_pool: a bounded pool of expensive, reusable resources
// (database connections, upstream clients), with limits on how many are
// open, how many idle, and how long each may live and idle.
//
// Go analogue: database/sql's connection pool: SetMaxOpenConns,
// SetMaxIdleConns, SetConnMaxLifetime, SetConnMaxIdleTime, and DB.Stats()
// (resource_pool_stats has DBStats's fields and meanings). There is no
// standard C++ analogue.
//
//   weft::resource_pool<pg_connection> db{
//       {.max_open = 20, .max_idle = 10, .max_lifetime = 30min, .max_idle_time = 5min, .name = "db"},
//       [] { return pg_connection{conninfo}; },       // open
//       [](pg_connection& c) { c.close(); },           // close
//       [](pg_connection& c) { return c.healthy(); }}; // validate, on checkout
//   auto conn = db.acquire(request_token);  // waits while 20 are in use
//   if (!conn) return reply_busy();         // cancelled or timed out
//   conn->query("...");                     // returned to the pool at scope exit
//
// Behaviour:
//  - At most max_open resources exist at once (in use, idle, or being
//    opened). An acquire takes a slot first: the slots are a
//    weft::semaphore, so waiters are served FIFO across threads and
//    coroutines, may give up by token, deadline or Asio cancellation, and
//    spin briefly before queueing, as every weft waiter does. A resource
//    closed as it comes back from a lease keeps its slot until its close()
//    returns; an idle one closed for its age or for max_idle stops counting
//    as it leaves the idle list, so its close() may overlap the open() of
//    its replacement (a server that counts connections may see one more).
//  - With a slot, an acquire takes the most recently returned idle resource
//    (so the least used ones age out through max_idle_time), or opens a new
//    one. open() runs outside the pool's lock, on the acquiring thread; if
//    it throws, the exception reaches that acquirer and the slot is freed at
//    once, so a failing server never leaks capacity.
//  - validate (optional) runs on each idle resource an acquire is about to
//    hand out; one that fails (returns false or throws) is closed and the
//    acquire tries the next idle one or opens a new one.
//  - reset (optional) runs on each returned resource; one for which it
//    returns false (when it returns bool) or throws is closed instead of
//    kept. lease.discard() closes a broken resource
//    instead of returning it.
//  - A returned resource stays idle unless it outlived max_lifetime, or
//    max_idle are already idle and nobody is waiting for it: then it is
//    closed. An idle resource past max_lifetime or max_idle_time is closed
//    by the next acquire that meets it, or by close_expired(); either way
//    the close runs outside the pool's lock, so other acquirers never wait
//    for it. Run close_expired() periodically (a timer) to keep idle
//    resources from outliving max_idle_time in a quiet service.
//  - set_max_open / set_max_idle apply at once to what is free and idle;
//    resources in use above a lowered max_open are closed as they come
//    back, so shrinking never interrupts work.
//
// A task that acquires while it already holds a lease can wait for itself:
// with max_open 1 (or every slot held by such tasks) it is a deadlock unless
// a token or deadline ends the wait. Take one lease per task, or pass the
// request's token (the usual way to acquire in a service anyway).
//
// Errors: max_open 0 throws std::invalid_argument (an unlimited pool is how
// a load spike exhausts a database; choose the limit), as do negative
// durations. open() may throw; close() must not (it runs from a lease's
// destructor).
//
// Thread safety: every member may be called concurrently. A lease is used
// by one thread at a time and may move between threads. Destroying the pool
// while a lease is out, a thread waits, or a granted async acquire's
// handler has not run is undefined (checked by WEFT_ASSERT: run or destroy
// such an io_context before the pool); the destructor closes the idle
// resources. A waiter may destroy the pool as soon as it has taken and
// returned its lease, even while the return that let it through is still
// returning (draining a pool by acquiring every slot is safe, unless
// max_open was lowered while leases were out: those above the new limit
// hold no slot a drain can take).
//
// Cost: an acquire or a return is a semaphore operation (one
// compare-and-swap when nobody waits) plus one critical section of a few
// instructions under the pool's spin lock (a sleeping mutex's futex calls
// cost more than the section when threads contend for the pool; no user
// function ever runs under it); waiting is the semaphore's (spin, yield,
// then park). The clock is read only when max_lifetime or max_idle_time is
// set. One allocation per resource opened, none per acquire.
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/semaphore.hpp>
#include <weft/wait_status.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
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

namespace weft {

struct resource_pool_options {
  std::size_t max_open = 0;  // required: at least 1
  std::size_t max_idle = 2;  // Go's default; lowered to max_open if above it
  std::chrono::nanoseconds max_lifetime{0};   // 0: a resource may live forever
  std::chrono::nanoseconds max_idle_time{0};  // 0: a resource may idle forever
  std::string_view name = {};  // shown in stats() and, for a blocked acquire, in the registry
};

// The fields and meanings of Go's sql.DBStats, plus failures.
struct resource_pool_stats {
  std::string_view name;
  std::size_t max_open = 0;
  std::size_t open = 0;    // in use + idle + being opened
  std::size_t in_use = 0;  // leased out, being opened for an acquirer, or closed as it comes back
  std::size_t idle = 0;
  std::size_t waiting = 0;                    // acquirers queued for a slot now
  std::uint64_t wait_count = 0;               // acquires that had to wait for a slot
  std::chrono::nanoseconds wait_duration{0};  // total time they waited
  std::uint64_t max_idle_closed = 0;       // closed on return: max_idle were idle already
  std::uint64_t max_idle_time_closed = 0;  // closed after idling max_idle_time
  std::uint64_t max_lifetime_closed = 0;   // closed after living max_lifetime
  std::uint64_t open_failures = 0;         // open() threw
  std::uint64_t validation_failures = 0;   // validate() said no (or threw); closed
};

namespace detail {
struct resource_pool_access;
}

template <class R, class Clock = std::chrono::steady_clock>
class basic_resource_pool {
  struct entry;

 public:
  using resource_type = R;
  using clock = Clock;
  using open_function = std::function<R()>;
  using close_function = std::function<void(R&)>;
  using validate_function = std::function<bool(R&)>;
  // Returns whether the resource may be kept (false: it is closed).
  using reset_function = std::function<bool(R&)>;

  // A resource on loan: returned to the pool when destroyed, released, or
  // assigned over. Empty when the acquire that made it did not succeed;
  // status() then says why.
  class [[nodiscard]] lease {
   public:
    lease() noexcept = default;
    lease(lease&& other) noexcept
        : pool_(std::exchange(other.pool_, nullptr)), entry_(std::move(other.entry_)), status_(other.status_) {}
    lease& operator=(lease&& other) noexcept {
      if (this != &other) {
        release();
        pool_ = std::exchange(other.pool_, nullptr);
        entry_ = std::move(other.entry_);
        status_ = other.status_;
      }
      return *this;
    }
    ~lease() { release(); }

    explicit operator bool() const noexcept { return entry_ != nullptr; }
    // ok while it holds a resource; cancelled or timeout when the acquire
    // gave up (try_acquire reports timeout: it would have had to wait).
    wait_status status() const noexcept { return status_; }

    R& get() const noexcept {
      WEFT_ASSERT(entry_ != nullptr && "weft::resource_pool::lease: empty lease");
      return entry_->resource;
    }
    R& operator*() const noexcept { return get(); }
    R* operator->() const noexcept { return &get(); }

    // Returns the resource now.
    void release() noexcept {
      if (entry_ != nullptr) std::exchange(pool_, nullptr)->give_back(std::move(entry_), false);
    }

    // Closes the resource instead of returning it (it is broken) and frees
    // its slot.
    void discard() noexcept {
      if (entry_ != nullptr) std::exchange(pool_, nullptr)->give_back(std::move(entry_), true);
    }

   private:
    friend class basic_resource_pool;
    lease(basic_resource_pool* pool, std::unique_ptr<entry> held) noexcept : pool_(pool), entry_(std::move(held)) {}
    explicit lease(wait_status why) noexcept : status_(why) {}

    basic_resource_pool* pool_ = nullptr;
    std::unique_ptr<entry> entry_;
    wait_status status_ = wait_status::ok;
  };

  // `reset` returns void, or bool: false closes the resource instead of
  // keeping it (a connection left in a broken state).
  template <class Reset = std::nullptr_t>
    requires std::is_null_pointer_v<Reset> || std::invocable<Reset&, R&>
  basic_resource_pool(const resource_pool_options& options, open_function open, close_function close,
                      validate_function validate = {}, Reset reset = nullptr)
      : name_(detail::intern(options.name)),
        open_function_(checked(std::move(open), "open")),
        close_function_(checked(std::move(close), "close")),
        validate_function_(std::move(validate)),
        reset_function_(wrap_reset(std::move(reset))),
        max_open_(checked_max_open(options.max_open)),
        max_idle_(std::min(options.max_idle, options.max_open)),
        max_lifetime_(checked_duration(options.max_lifetime, "max_lifetime")),
        max_idle_time_(checked_duration(options.max_idle_time, "max_idle_time")),
        withheld_(slot_capacity - max_open_),
        slots_(static_cast<std::ptrdiff_t>(slot_capacity), options.name, detail::blocked_kind{"resource_pool"}) {
    // The semaphore's capacity is fixed, so it is made as large as a pool
    // can be and the slots beyond max_open are held by the pool itself;
    // set_max_open moves slots between the pool and the semaphore.
    if (withheld_ != 0 && !slots_.try_acquire(static_cast<std::ptrdiff_t>(withheld_))) {
      throw std::logic_error("weft::resource_pool: a new semaphore refused its own permits");
    }
  }

  basic_resource_pool(const basic_resource_pool&) = delete;
  basic_resource_pool& operator=(const basic_resource_pool&) = delete;

  ~basic_resource_pool() {
    detail::spin_until([this] { return returning_.load(std::memory_order_acquire) == 0; });
    entry_list idle;
    {
      std::lock_guard lock(mutex_);
      WEFT_ASSERT(in_use_ == 0 && "weft::resource_pool destroyed while a lease is out");
      WEFT_ASSERT(
          static_cast<std::size_t>(slots_.available()) + withheld_ == slot_capacity &&
          "weft::resource_pool destroyed while a granted async acquire's handler has not run");
      idle.splice(idle_);
    }
    close_all(idle);
  }

  std::string_view name() const noexcept { return name_ != nullptr ? std::string_view{name_} : std::string_view{}; }

  // Waits for a slot as long as it takes. Throws what open() throws.
  lease acquire() {
    if (slots_.try_acquire(1)) return lease_for_slot();
    const auto start = begin_wait();
    slots_.acquire(1);
    end_wait(start);
    return lease_for_slot();
  }

  // Gives up, returning an empty lease, when the token is cancelled
  // (status cancelled, or timeout when its own deadline did it).
  lease acquire(const cancel_token& token) {
    if (token.cancelled()) return lease{slots_.acquire(1, token)};
    if (slots_.try_acquire(1)) return lease_for_slot();
    const auto start = begin_wait();
    const auto status = slots_.acquire(1, token);
    end_wait(start);
    return status == wait_status::ok ? lease_for_slot() : lease{status};
  }

  template <class Rep, class Period>
  lease acquire_for(std::chrono::duration<Rep, Period> timeout) {
    return acquire_until(detail::deadline_after<Clock>(timeout));
  }

  template <class Duration>
  lease acquire_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    if (slots_.try_acquire(1)) return lease_for_slot();
    const auto due = detail::clock_deadline(deadline);
    // A deadline already past waits for nothing, so no wait is counted.
    if (Clock::now() >= due) return lease{wait_status::timeout};
    const auto start = begin_wait();
    const auto status = slots_.acquire_until(1, due);
    end_wait(start);
    return status == wait_status::ok ? lease_for_slot() : lease{status};
  }

  // Never waits for another lease to come back; opens a resource when none
  // is idle and max_open allows. Empty (status timeout) when all are in use.
  lease try_acquire() { return slots_.try_acquire(1) ? lease_for_slot() : lease{wait_status::timeout}; }

  // Raising the limit frees slots at once. Lowering it takes the free slots
  // at once and the rest as leases come back (those resources are closed);
  // idle resources above the new limit are closed now. max_idle follows it
  // down, as in Go.
  void set_max_open(std::size_t max_open) {
    checked_max_open(max_open);
    entry_list closing;
    std::size_t freed = 0;
    bool lowered = false;
    {
      std::lock_guard lock(mutex_);
      const auto debt = debt_.load(std::memory_order_relaxed);
      if (max_open >= max_open_) {
        auto grow = max_open - max_open_;
        const auto forgiven = std::min(debt, grow);
        debt_.store(debt - forgiven, std::memory_order_relaxed);
        grow -= forgiven;
        withheld_ -= grow;
        freed = grow;
        if (freed != 0) returning_.fetch_add(1, std::memory_order_relaxed);
      } else {
        // Owed in full first, so that every slot coming back from now on
        // pays it; collect_debt then takes the free ones.
        debt_.store(debt + (max_open_ - max_open), std::memory_order_relaxed);
        lowered = true;
        max_idle_ = std::min(max_idle_, max_open);
        trim_idle_locked(closing);
      }
      max_open_ = max_open;
    }
    if (freed != 0) release_slots(freed);
    if (lowered) {
      // Slots whose return was decided before the debt was recorded are
      // released, maybe to a waiter, before this returns (see collect_debt).
      detail::spin_until([this] { return returning_.load(std::memory_order_acquire) == 0; });
      std::atomic_thread_fence(std::memory_order_seq_cst);
      collect_debt();
    }
    close_all(closing);
  }

  // Closes idle resources above the new limit now.
  void set_max_idle(std::size_t max_idle) {
    entry_list closing;
    {
      std::lock_guard lock(mutex_);
      max_idle_ = std::min(max_idle, max_open_);
      trim_idle_locked(closing);
    }
    close_all(closing);
  }

  // Closes the idle resources past max_lifetime or max_idle_time; returns
  // how many.
  std::size_t close_expired() {
    entry_list closing;
    {
      std::lock_guard lock(mutex_);
      const auto now = Clock::now();
      idle_.remove_if([&](const entry& resource) { return expired_locked(resource, now); }, closing);
      open_ -= closing.size();
    }
    const auto closed = closing.size();
    close_all(closing);
    return closed;
  }

  resource_pool_stats stats() const {
    resource_pool_stats s;
    s.name = name();
    {
      std::lock_guard lock(mutex_);
      s.max_open = max_open_;
      s.open = open_;
      s.in_use = in_use_;
      s.idle = idle_.size();
      s.max_idle_closed = max_idle_closed_;
      s.max_idle_time_closed = max_idle_time_closed_;
      s.max_lifetime_closed = max_lifetime_closed_;
      s.open_failures = open_failures_;
      s.validation_failures = validation_failures_;
    }
    s.waiting = slots_.waiters();
    s.wait_count = wait_count_.load(std::memory_order_relaxed);
    s.wait_duration = std::chrono::nanoseconds{wait_nanoseconds_.load(std::memory_order_relaxed)};
    return s;
  }

 private:
  friend struct detail::resource_pool_access;

  // A slot taken for a lease not made yet: an async acquire's, from its
  // grant until its handler runs on its executor. If it never runs (the
  // executor's context is destroyed first), the slot goes back through
  // return_slot(), so a max_open lowered meanwhile keeps it.
  class held_slot {
   public:
    held_slot() noexcept = default;
    explicit held_slot(basic_resource_pool& pool) noexcept : pool_(&pool) {}
    held_slot(held_slot&& other) noexcept : pool_(std::exchange(other.pool_, nullptr)) {}
    held_slot& operator=(held_slot&& other) noexcept {
      if (this != &other) {
        give_back();
        pool_ = std::exchange(other.pool_, nullptr);
      }
      return *this;
    }
    ~held_slot() { give_back(); }

    explicit operator bool() const noexcept { return pool_ != nullptr; }

    // The lease made for the slot owns it from here.
    void hand_over() noexcept { pool_ = nullptr; }

   private:
    void give_back() noexcept {
      if (pool_ != nullptr) std::exchange(pool_, nullptr)->return_slot();
    }

    basic_resource_pool* pool_ = nullptr;
  };

  struct entry {
    R resource;
    typename Clock::time_point opened;
    typename Clock::time_point returned;
    entry* older = nullptr;  // in an entry_list
  };

  // Resources linked through their entries, the most recently pushed first.
  // The idle list is one: pushing and popping touch only the list head and
  // the entry itself, which the lease's user touches anyway, so no separate
  // buffer moves between cores with every acquire and return, and nothing
  // is allocated under the pool's lock.
  class entry_list {
   public:
    entry_list() = default;
    entry_list(const entry_list&) = delete;
    entry_list& operator=(const entry_list&) = delete;
    ~entry_list() {
      while (!empty()) pop();
    }

    bool empty() const noexcept { return newest_ == nullptr; }
    std::size_t size() const noexcept { return size_; }

    void push(std::unique_ptr<entry> resource) noexcept {
      resource->older = newest_;
      newest_ = resource.release();
      ++size_;
    }

    std::unique_ptr<entry> pop() noexcept {
      entry* newest = newest_;
      newest_ = newest->older;
      --size_;
      return std::unique_ptr<entry>(newest);
    }

    // Moves every entry for which `remove` is true (called newest first)
    // to `out`; the others keep their order.
    template <class Predicate>
    void remove_if(Predicate remove, entry_list& out) noexcept {
      for (entry** link = &newest_; *link != nullptr;) {
        entry* resource = *link;
        if (remove(std::as_const(*resource))) {
          *link = resource->older;
          --size_;
          out.push(std::unique_ptr<entry>(resource));
        } else {
          link = &resource->older;
        }
      }
    }

    void splice(entry_list& from) noexcept {
      while (!from.empty()) push(from.pop());
    }

   private:
    entry* newest_ = nullptr;
    std::size_t size_ = 0;
  };

  template <class Reset>
  static reset_function wrap_reset(Reset reset) {
    if constexpr (std::is_null_pointer_v<Reset>) {
      return {};
    } else if constexpr (std::is_convertible_v<std::invoke_result_t<Reset&, R&>, bool>) {
      return reset;
    } else {
      if constexpr (std::is_same_v<Reset, std::function<void(R&)>>) {
        if (!reset) return {};
      }
      return [reset = std::move(reset)](R& resource) mutable {
        reset(resource);
        return true;
      };
    }
  }

  // As large as the semaphore's state word allows.
  static constexpr std::size_t slot_capacity = (std::size_t{1} << 40) - 1;

  template <class Function>
  static Function checked(Function function, const char* what) {
    if (!function) {
      throw std::invalid_argument(std::string("weft::resource_pool: the ") + what + " function is empty");
    }
    return function;
  }

  static std::size_t checked_max_open(std::size_t max_open) {
    if (max_open == 0) {
      throw std::invalid_argument(
          "weft::resource_pool: max_open must be at least 1 (there is no unlimited pool: under load it "
          "would open connections until the server refuses them)");
    }
    if (max_open > slot_capacity) {
      throw std::invalid_argument("weft::resource_pool: max_open must be at most 2^40 - 1, got " +
                                  std::to_string(max_open));
    }
    return max_open;
  }

  static std::chrono::nanoseconds checked_duration(std::chrono::nanoseconds duration, const char* what) {
    if (duration < std::chrono::nanoseconds::zero()) {
      throw std::invalid_argument(std::string("weft::resource_pool: ") + what + " must not be negative");
    }
    return duration;
  }

  // As in Go, a wait is counted when it begins and timed when it ends.
  typename Clock::time_point begin_wait() noexcept {
    wait_count_.fetch_add(1, std::memory_order_relaxed);
    return Clock::now();
  }

  void end_wait(typename Clock::time_point start) noexcept {
    wait_nanoseconds_.fetch_add(static_cast<std::uint64_t>(detail::waited_ns(Clock::now() - start)),
                                std::memory_order_relaxed);
  }

  // The time, where a limit needs it: reading the clock costs more than the
  // rest of an uncontended acquire, so a pool without time limits skips it.
  typename Clock::time_point stamp() const noexcept {
    if (max_lifetime_ == std::chrono::nanoseconds::zero() && max_idle_time_ == std::chrono::nanoseconds::zero()) {
      return {};
    }
    return Clock::now();
  }

  // With the mutex held. Counts the cause when the resource has expired.
  bool expired_locked(const entry& resource, typename Clock::time_point now) noexcept {
    if (max_lifetime_ != std::chrono::nanoseconds::zero() && now - resource.opened >= max_lifetime_) {
      ++max_lifetime_closed_;
      return true;
    }
    if (max_idle_time_ != std::chrono::nanoseconds::zero() && now - resource.returned >= max_idle_time_) {
      ++max_idle_time_closed_;
      return true;
    }
    return false;
  }

  // With the mutex held: moves the oldest idle resources above max_idle_
  // into `closing`.
  void trim_idle_locked(entry_list& closing) noexcept {
    if (idle_.size() <= max_idle_) return;
    std::size_t newer = 0;
    const auto before = closing.size();
    idle_.remove_if([&](const entry&) { return newer++ >= max_idle_; }, closing);
    const auto excess = closing.size() - before;
    open_ -= excess;
    max_idle_closed_ += excess;
  }

  // close() must not throw: noexcept here, a close() that does ends the
  // program rather than leave the pool's counts and slots half updated.
  void close_one(R& resource) noexcept { close_function_(resource); }

  void close_all(entry_list& closing) noexcept {
    while (!closing.empty()) close_one(closing.pop()->resource);
  }

  // With the mutex held, for a slot that is no longer used: true if it goes
  // back to the semaphore (release_slots(1) after the mutex, which this
  // counts in returning_), false if a lowered max_open keeps it.
  bool slot_returns_locked() noexcept {
    const auto debt = debt_.load(std::memory_order_relaxed);
    if (debt == 0) {
      returning_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    debt_.store(debt - 1, std::memory_order_relaxed);
    ++withheld_;
    return false;
  }

  // Pays the debt of a lowered max_open with slots free in the semaphore.
  //
  // A slot comes back in two steps: whether it returns is decided under
  // mutex_ (slot_returns_locked), where returning_ counts it, and it is
  // released after. A lowering between the two would miss that slot, which
  // then lands in the semaphore with the debt unpaid: one lease more than
  // max_open could be granted, for as long as nothing else came back (the
  // stress suite saw 2 free slots under a max_open of 1 once every lease
  // was back). So both sides look at the other after a seq_cst fence:
  // set_max_open records the debt, waits for the releases already decided
  // (one may go straight to a waiter: a grant that comes before the
  // lowering returns, as the leases still out do), fences, and takes free
  // slots here; a returned slot is released, fenced, and the debt read, and
  // taken here if any is owed. Of the two fences, the second sees what came
  // before the first.
  void collect_debt() noexcept {
    std::lock_guard lock(mutex_);
    auto debt = debt_.load(std::memory_order_relaxed);
    while (debt != 0 && slots_.try_acquire(1)) {
      --debt;
      ++withheld_;
    }
    debt_.store(debt, std::memory_order_relaxed);
  }

  // Gives back a slot no longer used: to the semaphore, or to the debt of
  // a lowered max_open.
  void return_slot() noexcept {
    bool slot_returns = false;
    {
      std::lock_guard lock(mutex_);
      slot_returns = slot_returns_locked();
    }
    if (slot_returns) release_slots(1);
  }

  // For slots whose return was decided, and counted in returning_, under
  // mutex_ (see collect_debt). The release may let a waiter take a slot,
  // return it and destroy the pool while this still reads the debt: the
  // destructor waits for returning_ to be zero.
  void release_slots(std::size_t count) noexcept {
    slots_.release(static_cast<std::ptrdiff_t>(count));
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (debt_.load(std::memory_order_relaxed) != 0) collect_debt();
    returning_.fetch_sub(1, std::memory_order_release);
  }

  // The caller holds a slot: hand it an idle resource or a new one.
  lease lease_for_slot() {
    entry_list closing;
    for (;;) {
      std::unique_ptr<entry> candidate;
      {
        std::lock_guard lock(mutex_);
        const auto now = stamp();
        while (!idle_.empty()) {
          auto newest = idle_.pop();
          if (!expired_locked(*newest, now)) {
            candidate = std::move(newest);
            break;
          }
          --open_;
          closing.push(std::move(newest));
        }
        ++in_use_;
        if (candidate == nullptr) ++open_;  // reserved for the open below
      }
      close_all(closing);
      if (candidate == nullptr) return lease{this, open_new()};
      if (valid(candidate->resource)) return lease{this, std::move(candidate)};
      close_one(candidate->resource);
      std::lock_guard lock(mutex_);
      ++validation_failures_;
      --in_use_;
      --open_;
    }
  }

  bool valid(R& resource) noexcept {
    if (!validate_function_) return true;
    try {
      return validate_function_(resource);
    } catch (...) {
      return false;
    }
  }

  // The caller holds a slot, counted in open_ and in_use_.
  std::unique_ptr<entry> open_new() {
    try {
      const auto opened = stamp();
      return std::unique_ptr<entry>(new entry{open_function_(), opened, opened});
    } catch (...) {
      bool slot_returns = false;
      {
        std::lock_guard lock(mutex_);
        ++open_failures_;
        --in_use_;
        --open_;
        slot_returns = slot_returns_locked();
      }
      if (slot_returns) release_slots(1);
      throw;
    }
  }

  // A resource that is not kept is closed while its lease still counts in
  // in_use_ and holds its slot, and the slot's return is decided after the
  // close: a max_open lowered during the close keeps the slot, and the
  // pool's destructor finds the lease out (a drain that acquired every slot
  // of a lowered max_open may not destroy the pool while a lease above it
  // is still coming back).
  void give_back(std::unique_ptr<entry> resource, bool discard) noexcept {
    if (!discard && reset_function_) {
      try {
        discard = !reset_function_(resource->resource);
      } catch (...) {
        discard = true;
      }
    }
    {
      std::lock_guard lock(mutex_);
      const auto now = stamp();
      if (discard || debt_.load(std::memory_order_relaxed) != 0) {
        // Closed below: broken, or above a lowered max_open.
      } else if (max_lifetime_ != std::chrono::nanoseconds::zero() &&
                 now - resource->opened >= max_lifetime_) {
        ++max_lifetime_closed_;
      } else if (idle_.size() >= max_idle_ && slots_.waiters() == 0) {
        ++max_idle_closed_;
      } else {
        // Kept; nothing is owed, so its slot returns.
        --in_use_;
        resource->returned = now;
        idle_.push(std::move(resource));
        slot_returns_locked();  // true, and counted: nothing is owed
      }
    }
    if (resource == nullptr) {
      release_slots(1);
      return;
    }
    close_one(resource->resource);
    bool slot_returns = false;
    {
      std::lock_guard lock(mutex_);
      --in_use_;
      --open_;
      slot_returns = slot_returns_locked();
    }
    if (slot_returns) release_slots(1);
  }

  const char* name_;
  open_function open_function_;
  close_function close_function_;
  validate_function validate_function_;
  reset_function reset_function_;

  // On a cache line of its own: every acquire and return writes it, while
  // the functions above are only read.
  alignas(64) mutable detail::spin_mutex mutex_;
  // Guarded by mutex_:
  entry_list idle_;
  std::size_t open_ = 0;
  std::size_t in_use_ = 0;
  std::size_t max_open_;
  std::size_t max_idle_;
  std::chrono::nanoseconds max_lifetime_;
  std::chrono::nanoseconds max_idle_time_;
  std::size_t withheld_;  // slots the pool holds back from the semaphore
  // Slots to hold back as they come free (max_open was lowered); written
  // under mutex_, read without it by release_slots.
  std::atomic<std::size_t> debt_{0};
  // Slot releases decided under mutex_ and not yet done (release_slots).
  std::atomic<std::uint32_t> returning_{0};
  std::uint64_t max_idle_closed_ = 0;
  std::uint64_t max_idle_time_closed_ = 0;
  std::uint64_t max_lifetime_closed_ = 0;
  std::uint64_t open_failures_ = 0;
  std::uint64_t validation_failures_ = 0;

  std::atomic<std::uint64_t> wait_count_{0};
  std::atomic<std::uint64_t> wait_nanoseconds_{0};

  basic_semaphore<Clock> slots_;
};

template <class R>
using resource_pool = basic_resource_pool<R>;

}  // namespace weft
