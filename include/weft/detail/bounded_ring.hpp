// SPDX-License-Identifier: BSL-1.0
// detail::bounded_ring: a fixed ring of slots, multi-producer
// multi-consumer, lock-free, that never allocates after construction.
//
// The design is the bounded MPMC queue widely published since 2010: each
// slot carries a sequence number that says whose turn it is. A producer
// claims position p with one compare-and-swap on the tail when slot p's
// sequence says "free for p" (2p), writes the value, and publishes it by
// storing "holds p" (2p + 1); a consumer claims position p on the head when
// the sequence holds p, takes the value, and frees the slot for the next
// lap by storing 2(p + capacity). (The usual encoding, p + 1 and
// p + capacity, cannot tell "holds p" from "free for p + 1" in a ring of
// one slot.)
// Producers and consumers meet only in the slot they hand over, and the head
// and the tail live on separate cache lines.
//
// try_pop fails both when the ring is empty and when the producer that
// claimed the next position has not published it yet, and try_push fails
// while the consumer that claimed a slot's last value is still taking it.
// Neither failure means empty (or full): another producer may have
// published a later value, another consumer may have freed a later slot,
// and both may have returned. A caller that reports empty or full, or
// sleeps on it, must decide by the claim counters (claimed_unpopped, full),
// which move first, and spin while a claim is in flight: pop_unless_empty
// and push_unless_full do.
//
// The capacity is exact and may be any positive number; a power of two
// finds its slots fastest (see slot_at).
//
// close() makes every later try_push fail, atomically with respect to
// claims: it sets a bit in the tail, so a producer's claim either came
// before it (and its value will be published and can be popped) or fails.
// Values already pushed stay poppable.
//
// Cell: an optional record kept in each slot right after the value (the
// task registry's origin_cell, see task_tracking.hpp, and a pool's queue
// time). A slot is (at least) 64-byte aligned and its sequence takes the
// first 8 bytes, so with a 48-byte value the cell's first 8 bytes share the
// value's cache line and the rest of it starts the next line. The producer
// may fill it while it owns the slot, the consumer reads it while it owns
// the slot, and visit_cells lets a third thread copy the cells of the values
// queued now, using the slot's sequence as a seqlock version. Fill and take
// are told the value's position.
//
// SlotAlignment: 64 by default. A ring whose producers and consumers run on
// different cores back to back, a slot each per few tens of nanoseconds (a
// worker pool's queue, a task group's), asks for 128
// (handoff_slot_alignment): the L2 prefetchers of x86 cores fetch a line's
// neighbour along with it (Intel's completes the 128-byte aligned pair;
// AMD's fetches the next or previous line), so with 64-byte slots a consumer
// reading slot k pulls in a slot a producer may be writing, and that line
// moves between the cores once more per task. A pool of one worker ran
// 18.5-18.8M tiny tasks/s with 64-byte slots and 22-23M/s with 128
// (WEFT_NO_REGISTRY, producer and worker pinned to the two cores of a 2-vCPU
// VM, runs interleaved); channels showed no difference in chan_bench and
// keep 64.
#pragma once

#include <weft/detail/backoff.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <utility>

namespace weft::detail {

// The default Cell: nothing beside the value.
struct no_cell {};

// The SlotAlignment of rings whose producers and consumers hand values
// between cores back to back (see SlotAlignment above).
inline constexpr std::size_t handoff_slot_alignment = 128;

template <class T, class Cell = no_cell, std::size_t SlotAlignment = 64>
class bounded_ring {
  static_assert(SlotAlignment >= 64 && (SlotAlignment & (SlotAlignment - 1)) == 0,
                "weft::detail::bounded_ring: SlotAlignment is a power of two, at least a cache line");

 public:
  explicit bounded_ring(std::size_t capacity) : capacity_(capacity), slots_(new slot[capacity]) {
    for (std::size_t i = 0; i < capacity; ++i) slots_[i].sequence.store(free_for(i), std::memory_order_relaxed);
  }

  bounded_ring(const bounded_ring&) = delete;
  bounded_ring& operator=(const bounded_ring&) = delete;

  ~bounded_ring() {
    T discarded;
    while (try_pop(discarded)) {
    }
  }

  // Moves `value` in and returns true, or returns false (leaving `value`
  // untouched) when the ring is full. `position`, when given, receives the
  // value's position: how many values were pushed before it.
  bool try_push(T& value, std::uint64_t* position = nullptr) noexcept {
    return try_push(value, [](Cell&, std::uint64_t) noexcept {}, position);
  }

  // try_push that fails only when the ring is full or closed: a push that
  // finds its slot still held by a consumer that claimed its value (and is
  // moving it out, a noexcept move) waits for that instead, polling, then
  // yielding.
  template <class Fill>
  bool push_unless_full(T& value, Fill&& fill, std::uint64_t* position = nullptr) noexcept {
    for (backoff pause; !try_push(value, fill, position);) {
      if (closed() || full()) return false;
      if (!pause.wait()) std::this_thread::yield();
    }
    return true;
  }

  // try_push that calls fill(cell, position) once it owns the slot, before
  // the value is published.
  template <class Fill>
  bool try_push(T& value, Fill&& fill, std::uint64_t* position = nullptr) noexcept {
    auto pos = tail_.load(std::memory_order_relaxed);
    for (;;) {
      if ((pos & closed_bit) != 0) return false;
      slot& s = slot_at(pos);
      const auto sequence = s.sequence.load(std::memory_order_acquire);
      const auto lag = static_cast<std::int64_t>(sequence - free_for(pos));
      if (lag == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_seq_cst, std::memory_order_relaxed)) {
          fill(s.cell, pos);
          ::new (static_cast<void*>(s.storage)) T(std::move(value));
          s.sequence.store(holds(pos), std::memory_order_release);
          if (position != nullptr) *position = pos;
          return true;
        }
      } else if (lag < 0) {
        return false;  // the slot still holds the value from one lap ago
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
  }

  // Moves the oldest value into `out` and returns true, or returns false.
  bool try_pop(T& out) noexcept {
    return try_pop(out, [](const Cell&, std::uint64_t) noexcept {});
  }

  // try_pop that fails only when no value is pushed or being pushed: a pop
  // that finds the oldest value's slot claimed by a producer still moving
  // the value in (a noexcept move) waits for that instead, polling, then
  // yielding.
  template <class Take>
  bool pop_unless_empty(T& out, Take&& take) noexcept {
    for (backoff pause; !try_pop(out, take);) {
      if (!claimed_unpopped()) return false;
      if (!pause.wait()) std::this_thread::yield();
    }
    return true;
  }

  // try_pop that calls take(cell, position) once it owns the slot and `out`
  // holds the value, before the slot is freed.
  template <class Take>
  bool try_pop(T& out, Take&& take) noexcept {
    auto pos = head_.load(std::memory_order_relaxed);
    for (;;) {
      slot& s = slot_at(pos);
      const auto sequence = s.sequence.load(std::memory_order_acquire);
      const auto lag = static_cast<std::int64_t>(sequence - holds(pos));
      if (lag == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_seq_cst, std::memory_order_relaxed)) {
          take_claimed(pos, out, std::forward<Take>(take));
          return true;
        }
      } else if (lag < 0) {
        return false;
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  // Claims up to `max` (>= 1) values published at the head with one
  // compare-and-swap and returns how many, the first at position `first`;
  // 0 when none is published there. Each claimed position must then be
  // taken, once, with take_claimed, and soon: a producer a lap ahead waits
  // for those slots. One claim instead of one per value is what lets
  // several consumers share a busy ring: each claim moves the head's cache
  // line to the claimer's core.
  std::size_t try_claim(std::size_t max, std::uint64_t& first) noexcept {
    auto pos = head_.load(std::memory_order_relaxed);
    for (;;) {
      std::size_t count = 0;
      while (count < max &&
             slot_at(pos + count).sequence.load(std::memory_order_acquire) == holds(pos + count)) {
        ++count;
      }
      if (count == 0) {
        const auto sequence = slot_at(pos).sequence.load(std::memory_order_acquire);
        if (static_cast<std::int64_t>(sequence - holds(pos)) < 0) return 0;
        pos = head_.load(std::memory_order_relaxed);  // another consumer took it
        continue;
      }
      if (head_.compare_exchange_weak(pos, pos + count, std::memory_order_seq_cst, std::memory_order_relaxed)) {
        first = pos;
        return count;
      }
    }
  }

  // Moves the value at a position this thread claimed (try_claim) into
  // `out`, calls take(cell, position), and frees the slot.
  template <class Take>
  void take_claimed(std::uint64_t position, T& out, Take&& take) noexcept {
    slot& s = slot_at(position);
    T* value = std::launder(reinterpret_cast<T*>(s.storage));
    out = std::move(*value);
    value->~T();
    take(s.cell, position);
    s.sequence.store(free_for(position + capacity_), std::memory_order_release);
  }

  std::size_t capacity() const noexcept { return capacity_; }

  // Refuses every later push; returns false if already closed.
  bool close() noexcept { return (tail_.fetch_or(closed_bit, std::memory_order_seq_cst) & closed_bit) == 0; }
  bool closed() const noexcept { return (tail_.load(std::memory_order_seq_cst) & closed_bit) != 0; }

  // Calls accept(read(cell)) for the cells of values queued now,
  // from any thread: read copies a cell, and the copy is accepted only if
  // the slot held the same value before and after the read. Values pushed or
  // popped meanwhile may be left out, except one whose consumer has claimed
  // it but not yet freed its slot: that one is still visited. So every slot
  // of the last lap is looked at, not only those from the head on (the head
  // moves at the claim, before the consumer has taken the value anywhere a
  // reader could find it).
  template <class Read, class Accept>
  void visit_cells(Read&& read, Accept&& accept) const {
    const auto last = tail_.load(std::memory_order_acquire) & ~closed_bit;
    const auto first = last > capacity_ ? last - capacity_ : 0;
    for (auto pos = first; pos < last; ++pos) {
      const slot& s = slot_at(pos);
      if (s.sequence.load(std::memory_order_acquire) != holds(pos)) continue;
      auto copy = read(s.cell);
      if (s.sequence.load(std::memory_order_acquire) != holds(pos)) continue;
      accept(copy);
    }
  }

  // Counts since construction; each may be stale as soon as it is read.
  std::uint64_t pushed() const noexcept { return tail_.load(std::memory_order_relaxed) & ~closed_bit; }
  std::uint64_t popped() const noexcept { return head_.load(std::memory_order_relaxed); }

  // Values pushed and not yet popped, from the two counts read as of one
  // moment: the pushed count is read again after the popped one, and the
  // pair is kept when it had not moved. Read once each, a reader delayed
  // between the two reads (preempted, say) subtracted counts thousands of
  // operations apart: a channel of capacity 2 reported a size of 30,000.
  // Against a steady stream of pushes, after a few tries, the difference is
  // clamped to the capacity instead.
  std::size_t size() const noexcept {
    auto pushed_count = tail_.load(std::memory_order_acquire) & ~closed_bit;
    for (int tries = 1;; ++tries) {
      const auto popped_count = head_.load(std::memory_order_acquire);
      const auto pushed_again = tail_.load(std::memory_order_acquire) & ~closed_bit;
      if (pushed_again == pushed_count || tries == 4) {
        if (pushed_again <= popped_count) return 0;
        return static_cast<std::size_t>(
            std::min<std::uint64_t>(pushed_again - popped_count, capacity_));
      }
      pushed_count = pushed_again;
    }
  }

  // Seq_cst reads of the claim counters, for wake-up protocols without a
  // fence: the compare-and-swap that claims a position is seq_cst (on x86
  // it is a full barrier either way), so a thread that registers as a
  // sleeper with a seq_cst write and then makes one of these reads either
  // sees the claim or is seen by the claimer's seq_cst read of its mark.
  //   claimed_unpopped: a value is pushed, or being pushed, and not popped.
  //   full: every slot holds, or is about to hold, a value.
  //
  // Each reads the two counters in the order that makes its one exact
  // answer (empty for claimed_unpopped, full for full) hold at one moment:
  // a move of the counter read second can only turn it to the safe answer.
  // claimed_unpopped reads the head first: the head never passes the tail,
  // so a tail equal to the head read before it means the ring was empty
  // when the tail was read. Read the other way round, a push and a pop in
  // between made a ring that always held a value look empty (and full,
  // reading the head first, a ring that always had room look full).
  bool claimed_unpopped() const noexcept {
    const auto popped_count = head_.load(std::memory_order_seq_cst);
    return (tail_.load(std::memory_order_seq_cst) & ~closed_bit) != popped_count;
  }
  bool full() const noexcept {
    const auto pushed_count = tail_.load(std::memory_order_seq_cst) & ~closed_bit;
    // Popped past what this thread saw pushed: room was made meanwhile.
    const auto popped_count = head_.load(std::memory_order_seq_cst);
    return pushed_count >= popped_count && pushed_count - popped_count >= capacity_;
  }

  // True when the `count` (1 to the capacity) positions from the tail on
  // are free, judged by the last one's slot alone: for a producer waiting
  // for room, which polls a line it is about to write anyway. size() reads
  // the head, and each consumer's claim then has to take the head's line
  // back. Several consumers free their slots in any order, so a slot before
  // the last may still be held: a push waits for it (push_unless_full).
  bool has_room_for(std::size_t count) const noexcept {
    const auto last = (tail_.load(std::memory_order_relaxed) & ~closed_bit) + count - 1;
    const auto sequence = slot_at(last).sequence.load(std::memory_order_acquire);
    return static_cast<std::int64_t>(sequence - free_for(last)) >= 0;
  }

  // True when a value is published at the head; a value being pushed right
  // now may not show yet.
  bool has_ready() const noexcept {
    const auto pos = head_.load(std::memory_order_relaxed);
    return slot_at(pos).sequence.load(std::memory_order_acquire) == holds(pos);
  }

 private:
  // Set in the tail by close(); positions never reach it.
  static constexpr std::uint64_t closed_bit = std::uint64_t{1} << 63;

  static constexpr std::uint64_t free_for(std::uint64_t position) noexcept { return 2 * position; }
  static constexpr std::uint64_t holds(std::uint64_t position) noexcept { return 2 * position + 1; }

  struct alignas(SlotAlignment) slot {
    std::atomic<std::uint64_t> sequence;
    alignas(T) unsigned char storage[sizeof(T)];
    [[no_unique_address]] Cell cell;
  };

  // Every push and pop finds its slot by its position modulo the
  // capacity: a mask for a power of two, else a 64-bit division, which
  // costs tens of cycles (pool_tiny_tasks at 1 and 2 workers, queue
  // capacity 1024, ran 2-9% faster with the mask, four interleaved pairs
  // on 2 cores).
  slot& slot_at(std::uint64_t position) const noexcept {
    return slots_[index_mask_ != 0 ? position & index_mask_ : position % capacity_];
  }

  const std::size_t capacity_;
  // capacity_ - 1 for a power of two above 1, else 0 (a capacity of 1
  // divides, cheaply).
  const std::uint64_t index_mask_ = (capacity_ & (capacity_ - 1)) == 0 ? capacity_ - 1 : 0;
  std::unique_ptr<slot[]> slots_;
  alignas(64) std::atomic<std::uint64_t> tail_{0};
  alignas(64) std::atomic<std::uint64_t> head_{0};
};

}  // namespace weft::detail
