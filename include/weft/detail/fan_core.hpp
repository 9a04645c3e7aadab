// SPDX-License-Identifier: BSL-1.0
// detail::fan_core: what the thread that calls gather, parallel_map or
// for_each shares with the helpers it posts to the pool: the indices not yet claimed,
// split into lanes; a gate that turns helpers away once the call is over;
// and the outcome (the first exception, the token the calls see).
//
// Why lanes. A fan-out of a few short calls is decided by cache-line
// transfers: on the 2-core VM one costs about 200 ns, as much as a call.
// With one shared counter of claimed indices every claim moved that line,
// and at the end of a run, where claims are single indices, the tasks took
// turns on it (16 calls of 180 ns took 4.4 us on 2 tasks, with the tasks'
// other costs). Each task owns a lane here (a
// range of unclaimed indices on its own line) and claims from its front, a
// compare-and-swap on a line no other task touches; a task whose lane is
// empty steals the back half of the fullest lane. So lines move once per
// steal, and a handful of steals balance a run. The calling thread's lane
// starts with every index, and helpers begin by stealing: a helper that the
// pool starts late takes only what is left.
//
// Invariants (lanes):
//  - An index is unclaimed in exactly one lane, or claimed by exactly one
//    task, or, for an instant, held by a thief between the compare-and-swap
//    that takes it from its victim and the store that puts it in the
//    thief's own lane. A claim or a steal is a compare-and-swap on the whole
//    lane, so no index is claimed twice. A thief stores into its own lane
//    only while that lane is empty, and nobody else writes an empty lane
//    (thieves skip them), so that store loses no update. A compare-and-swap
//    that expects a lane value seen earlier can succeed after the lane went
//    empty and was given the same range again (ABA); it then takes indices
//    that are unclaimed in that lane, which is all it ever means.
//  - A task leaves only after a scan that found every lane empty with no
//    thief in between: the steal word did not change across the scan, and
//    counted no thief between its compare-and-swap and its store.
//    So an index is never left unclaimed while every task is gone, and an
//    element blocked on another element still unclaimed is never left
//    without a task that can run it, as long as a task is free.
//
// Invariants (gate): a helper runs only after it enters the gate, and the
// calling thread returns only after it has closed the gate and the count of
// helpers inside has dropped to zero; a helper that finds the gate closed
// leaves without touching the caller's frame or the gate. So once closed,
// the count only falls, and the last helper to leave completes the
// caller's parker exactly once (none does when none was inside). The core
// itself lives until
// the caller and every posted helper (run or dropped unrun by the pool) have
// let go of it.
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/parker.hpp>
#include <weft/detail/reusable_source.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <thread>
#include <utility>

namespace weft::detail {

class fan_core {
 public:
  // A claimed run of units. A unit is one element, or, for a range with
  // more elements than 32 bits can count (a lane is one 64-bit word), as
  // many as it takes to count them in 32 bits.
  struct unit_range {
    std::size_t first;
    std::size_t last;
  };

  // A core for a run of `count` indices on up to `lanes` tasks, each claim
  // taking 1/(2 x claim_divisor) of its lane; one of this thread's spares
  // when a spare is free. The caller holds one reference.
  static fan_core* make(std::size_t count, std::size_t lanes, std::size_t claim_divisor,
                        const cancel_token& parent) {
    fan_core* core = nullptr;
    // A spare is taken only once nobody else holds it: its count is 1, ours.
    if (spare_list* spares = thread_spares()) core = spares->take_free();
    if (core == nullptr) core = new fan_core;
    try {
      core->reset(count, lanes, claim_divisor, parent);
    } catch (...) {
      delete core;
      throw;
    }
    return core;
  }

  fan_core(const fan_core&) = delete;
  fan_core& operator=(const fan_core&) = delete;

  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }

  // The caller's release: the core is kept, with the caller's reference,
  // as one of this thread's spares, even while a helper the pool has not
  // run yet still holds it; it is reused once that helper has been turned
  // away.
  void release_by_caller() noexcept {
    // Freed here, on the thread that read it (see task_group's release_outcome).
    first_error_ = nullptr;
    cancellation_.release();
    spare_list* spares = thread_spares();
    if (spares == nullptr || !spares->keep(this)) unref();
  }

  void unref() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  const cancel_token& token() const noexcept { return cancellation_.token(); }

  // Helpers: true if this one may run (the call is not over); leave()
  // after, or unref() when it may not.
  // Once the gate is closed its count only falls, so it reaches zero once.
  bool enter() noexcept {
    auto word = gate_.load(std::memory_order_relaxed);
    do {
      if ((word & gate_closed) != 0) return false;
    } while (!gate_.compare_exchange_weak(word, word + gate_helper, std::memory_order_acquire,
                                          std::memory_order_relaxed));
    return true;
  }

  // Lets go of the helper's reference too, before the helper leaves: the
  // caller holds its own until no helper is inside, so this frees nothing,
  // and a caller that finds the gate empty finds the count back at its own
  // (plus those of helpers not run yet), so its next call can reuse the
  // core at once (see spare_list).
  void leave() noexcept {
    refs_.fetch_sub(1, std::memory_order_release);
    if (gate_.fetch_sub(gate_helper, std::memory_order_acq_rel) == (gate_closed | gate_helper)) {
      drained_.complete();
    }
  }

  // The caller: turns away helpers that have not entered, and waits for
  // the last of those inside to leave. They have no calls left to start,
  // so it polls as long as an idle worker does before it yields.
  void close_and_wait() noexcept {
    if (gate_.fetch_or(gate_closed, std::memory_order_acq_rel) != 0) {
      drained_.wait_completed(WEFT_WORKER_SPIN_LIMIT);
    }
  }

  // The next units for the task on `lane`: from its own lane, else stolen.
  // False once no lane holds any.
  bool claim(std::size_t lane, unit_range& claimed) noexcept {
    for (;;) {
      if (take_front(lanes_[lane].unclaimed, claimed)) return true;
      if (!steal_into(lane)) return false;
    }
  }

  // Element indices [first, last) of a claimed unit range.
  unit_range elements_of(const unit_range& units) const noexcept {
    return {units.first * unit_, std::min(units.last * unit_, count_)};
  }

  // Calls run by the task on `lane`; read once every task has left.
  void add_run(std::size_t lane, std::size_t calls) noexcept { lanes_[lane].calls += calls; }
  std::size_t calls_run() const noexcept {
    std::size_t total = 0;
    for (std::size_t k = 0; k < lane_count_; ++k) total += lanes_[k].calls;
    return total;
  }

  // Keeps the first failure, and cancels the token with it so that the
  // other tasks stop. Later failures are dropped: one that cancelled first
  // made the token's cause differ from the exception the caller rethrows.
  void fail(std::exception_ptr error) noexcept {
    if (failed_.exchange(true, std::memory_order_acq_rel)) return;
    first_error_ = error;
    cancellation_.cancel(std::move(error));
  }

  // Once every task has left.
  const std::exception_ptr& first_error() const noexcept { return first_error_; }

 private:
  static constexpr std::uint32_t gate_closed = 1;
  static constexpr std::uint32_t gate_helper = 2;
  // The steal word: thieves between their start and finish in the low half,
  // finished steals in the high half.
  static constexpr std::uint64_t steal_started = 1;
  static constexpr std::uint64_t steal_finished = (std::uint64_t{1} << 32) - 1;
  static constexpr std::uint64_t thieves_of(std::uint64_t steals) noexcept {
    return steals & 0xffff'ffffU;
  }

  struct alignas(64) lane_state {
    std::atomic<std::uint64_t> unclaimed{0};  // [first, last) in units: first low, last high
    std::size_t calls = 0;                    // written by the lane's task only
  };

  static constexpr std::uint64_t pack(std::uint64_t first, std::uint64_t last) noexcept {
    return first | (last << 32);
  }
  static constexpr std::uint64_t first_of(std::uint64_t range) noexcept {
    return range & 0xffff'ffffU;
  }
  static constexpr std::uint64_t last_of(std::uint64_t range) noexcept { return range >> 32; }
  static constexpr std::uint64_t size_of(std::uint64_t range) noexcept {
    return last_of(range) > first_of(range) ? last_of(range) - first_of(range) : 0;
  }

  fan_core() = default;
  ~fan_core() = default;

  // A thread's spare cores. A helper that the pool starts after its call
  // has returned (its worker was parked or busy when the call began) still
  // holds the core, and often runs only after the caller's next call has
  // begun. With one spare and no reuse until the helper let go, the caller
  // allocated a core in those calls, and the helper freed the old one on
  // its worker: a free of a block that another thread allocated takes the
  // malloc arena's lock, and those locks made three quarters of the futex
  // calls of fan_bench's 16-call fan-out on 2 cores (perf). Kept here, a
  // core a helper still holds waits for it; the helper's unref never frees
  // it.
  //
  // Freed when the thread exits (each core by its last holder); null from
  // then on, for a fan-out made by a destructor that runs later in the
  // thread's exit (or, on the main thread, by a static object's), which
  // used to take a freed core again. One exception: on the main thread, if
  // the first fan-out comes from a static object's destructor, the list is
  // made after exit() has run the thread's thread_local destructors, and
  // the cores it keeps (four at most) stay allocated until the process
  // ends (still reachable, to a leak checker).
  class spare_list {
   public:
    spare_list() = default;
    spare_list(const spare_list&) = delete;
    spare_list& operator=(const spare_list&) = delete;
    ~spare_list() {
      for (fan_core*& core : cores_) {
        if (core != nullptr) std::exchange(core, nullptr)->unref();
      }
      spares_gone = true;
    }

    // A spare that no helper holds any more, or null.
    fan_core* take_free() noexcept {
      for (fan_core*& core : cores_) {
        // Acquire: the last helper to let go is done with the core.
        if (core != nullptr && core->refs_.load(std::memory_order_acquire) == 1) {
          return std::exchange(core, nullptr);
        }
      }
      return nullptr;
    }

    // False when every place is taken (by cores that helpers still hold).
    bool keep(fan_core* core) noexcept {
      for (fan_core*& place : cores_) {
        if (place == nullptr) {
          place = core;
          return true;
        }
      }
      return false;
    }

   private:
    std::array<fan_core*, 4> cores_{};
  };

  static spare_list* thread_spares() noexcept {
    if (spares_gone) return nullptr;
    thread_local spare_list spares;
    return &spares;
  }
  static inline thread_local constinit bool spares_gone = false;

  void reset(std::size_t count, std::size_t lanes, std::size_t claim_divisor,
             const cancel_token& parent) {
    if (lanes > lane_capacity_) {
      lanes_ = std::make_unique<lane_state[]>(lanes);
      lane_capacity_ = lanes;
    }
    cancellation_.renew(parent);
    constexpr std::size_t max_units = std::numeric_limits<std::uint32_t>::max();
    count_ = count;
    unit_ = count <= max_units ? 1 : (count + max_units - 1) / max_units;
    lane_count_ = lanes;
    claim_divisor_ = 2 * claim_divisor;
    for (std::size_t k = 0; k < lanes; ++k) {
      lanes_[k].unclaimed.store(0, std::memory_order_relaxed);
      lanes_[k].calls = 0;
    }
    lanes_[0].unclaimed.store(pack(0, (count + unit_ - 1) / unit_), std::memory_order_relaxed);
    gate_.store(0, std::memory_order_relaxed);
    drained_.reset();
    steals_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
  }

  bool take_front(std::atomic<std::uint64_t>& lane, unit_range& claimed) const noexcept {
    auto range = lane.load(std::memory_order_relaxed);
    for (;;) {
      const auto size = size_of(range);
      if (size == 0) return false;
      const auto first = first_of(range);
      const auto taken = std::max<std::uint64_t>(1, size / claim_divisor_);
      if (lane.compare_exchange_weak(range, pack(first + taken, last_of(range)),
                                     std::memory_order_relaxed)) {
        claimed = {static_cast<std::size_t>(first), static_cast<std::size_t>(first + taken)};
        return true;
      }
    }
  }

  // Moves the back half of the fullest other lane into `lane` (empty).
  // False once a scan found every lane empty and no steal in between.
  bool steal_into(std::size_t lane) noexcept {
    for (backoff pause;;) {
      const auto steals_before = steals_.load(std::memory_order_acquire);
      std::size_t victim = lane;
      std::uint64_t victim_range = 0;
      for (std::size_t k = 0; k < lane_count_; ++k) {
        const auto range = lanes_[k].unclaimed.load(std::memory_order_acquire);
        if (k != lane && size_of(range) > size_of(victim_range)) {
          victim = k;
          victim_range = range;
        }
      }
      if (victim == lane) {
        const auto steals_after = steals_.load(std::memory_order_acquire);
        if (steals_after == steals_before && thieves_of(steals_after) == 0) return false;
        // A thief holds indices in neither lane, or moved some meanwhile.
        if (!pause.wait()) std::this_thread::yield();
        continue;
      }
      steals_.fetch_add(steal_started, std::memory_order_acq_rel);
      const auto last = last_of(victim_range);
      const auto stolen = (size_of(victim_range) + 1) / 2;
      const bool won = lanes_[victim].unclaimed.compare_exchange_strong(
          victim_range, pack(first_of(victim_range), last - stolen), std::memory_order_acq_rel);
      if (won) lanes_[lane].unclaimed.store(pack(last - stolen, last), std::memory_order_release);
      steals_.fetch_add(steal_finished, std::memory_order_acq_rel);
      if (won) return true;
    }
  }

  std::unique_ptr<lane_state[]> lanes_;
  std::size_t lane_capacity_ = 0;
  std::size_t lane_count_ = 0;
  std::size_t count_ = 0;
  std::size_t unit_ = 1;
  std::uint64_t claim_divisor_ = 2;

  reusable_source cancellation_;

  // Helpers touch these together as they enter and steal.
  alignas(64) std::atomic<std::uint32_t> gate_{0};
  parker drained_;  // completed by the last helper to leave a closed gate
  std::atomic<std::uint64_t> steals_{0};
  std::atomic<std::uint32_t> refs_{1};
  std::atomic<bool> failed_{false};
  std::exception_ptr first_error_;
};

}  // namespace weft::detail
