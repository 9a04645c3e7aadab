// SPDX-License-Identifier: BSL-1.0
// detail::task_tracking: the records that weft/registry.hpp reads, kept by
// the executors as they queue and run tasks.
//
// A live task is in one of two kinds of place, and its record lives there,
// so tracking allocates nothing and takes no shared lock per task:
//  - queued: beside the task in the queue that holds it. In a ring (a
//    pool's queue, a group's ring) that is an origin_cell in the task's
//    slot: the producer fills it between claiming the slot and publishing
//    it, and the consumer reads it between claiming the slot and freeing it.
//    A group's overflow vector keeps a task_origin beside each task, under
//    the vector's lock.
//  - running or blocked: in a frame of the running thread's own stack of
//    frames (thread_tasks), which only that thread writes.
// Queues register as sources and threads register their frames with the
// registry, under its mutex (once per queue or thread, not per task); a
// snapshot takes the mutex and reads every source, then every thread.
//
// Invariants, and why a snapshot never sees torn or stale records:
//  - Every field is an atomic, written with release stores and read with
//    acquire loads, so a reader racing a writer reads values, never torn
//    memory (ThreadSanitizer-clean by construction).
//  - A ring slot's sequence number is the version of its origin_cell: a
//    reader copies the cell only while the sequence says "holds p", and
//    keeps the copy only if it still says so afterwards. Every push stores
//    the cell's id (0 for an untracked task), and a tracked push leaves the
//    other fields equal to its record (storing those that differ), so a
//    copy kept is the record of the task at p. A writer of the next lap
//    fills the cell only after it has seen the slot freed, so a copy that
//    read any of its values sees the sequence changed.
//  - A frame's id versions its origin and start time. A push fills an empty
//    frame (id 0) and stores the id last; a pop stores 0 in the id and
//    changes nothing else; ids are never reused. A reader loads the id
//    first and again last, and keeps its copy only if both loads agree: a
//    value it read from a later push would order that push's pop before its
//    second load. So a reader that loaded the old depth reads either an
//    empty frame or, whole, the task that just ended (as if it had read
//    before the end). A blocked_scope rewrites the state, blocked-on and
//    time of a frame whose id stays, under the frame's own version, odd
//    while it writes. A reader that finds the frame mid-rewrite at each of
//    64 tries still lists the task (its origin is whole, by the id), as
//    running on nothing since the snapshot: a task is never left out
//    because its thread was preempted in a rewrite or busy blocking and
//    waking.
//  - A task moves from a queue to a frame before its slot is freed (or
//    before the overflow lock is released), and a snapshot reads the queues
//    before the threads: a task that moves while a snapshot runs may be seen
//    twice (the registry keeps one), never missed.
//
// Cost when tracking is on: at spawn, an id from a per-thread block, a read
// of the tick clock (a load: see tick_clock.hpp; the registry's times are
// up to its 4 ms tick early) and the record, made straight into the slot's
// cell (see origin_to_make): the id beside the task, the rest compared with
// what the slot held and stored only where it differs (see origin_cell); at
// start, a copy from the cell to a frame on the thread's own cache lines,
// again stored only where it differs, and a second clock read (see
// task_frame). Together about 6 ns of CPU time per pool task: 44 ns against
// 38 compiled out in registry_pool_one_cpu (benchmarks/registry_bench.cpp,
// on a 2.1 GHz KVM guest), and 10 ns (54 against 44) when that host ran
// slower and noisier, which suggests cache misses on the records' lines,
// not instructions, are what is left. When switched off at run time: one
// relaxed load per spawn, and an id of 0 stored beside the task. With
// WEFT_NO_REGISTRY defined, the cells are empty and every hook compiles to
// nothing.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/bounded_ring.hpp>
#include <weft/detail/tick_clock.hpp>
#include <weft/spawn_site.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft::detail {

#if defined(WEFT_NO_REGISTRY)
inline constexpr bool registry_compiled = false;
#else
inline constexpr bool registry_compiled = true;
#endif

// Switched by weft::registry::set_enabled; on by default.
inline std::atomic<bool> tracking_enabled{true};

inline bool tracking() noexcept { return registry_compiled && tracking_enabled.load(std::memory_order_relaxed); }

enum class tracked_state : std::uint8_t { queued, running, blocked };

// What is known about a task from its spawn on. id 0: not tracked.
struct task_origin {
  std::uint64_t id = 0;
  std::uint64_t parent = 0;
  const char* file = "";
  const char* function = "";
  const char* name = nullptr;  // the pool's or group's name, interned
  std::uint32_t line = 0;
  std::int64_t spawned_ns = 0;
};

// A task_origin in atomics, for places a snapshot reads while others write.
//
// In a ring slot the cell follows a 48-byte value (a task), so `id` shares
// the value's cache line and the other fields sit on the next line. The id
// is written for every value (0: untracked), and the other fields only
// when they differ from what the slot held before: a slot reused by the
// same spawn site, parent and clock tick is not written there at all. A
// line that the producer writes and the consumer reads on every task moves
// between their cores twice per task, which cost more than all the rest of
// tracking together (a do-nothing pool task at one worker, 2 cores: 85 ns
// when every field was stored on every push, 55 ns now); a line that both
// only read stays put.
struct origin_cell {
  std::atomic<std::uint64_t> id{0};
  std::atomic<std::uint64_t> parent{0};
  std::atomic<const char*> file{""};
  std::atomic<const char*> function{""};
  std::atomic<const char*> name{nullptr};
  std::atomic<std::uint32_t> line{0};
  std::atomic<std::int64_t> spawned_ns{0};

  void store(const task_origin& origin) noexcept {
    id.store(origin.id, std::memory_order_release);
    if (origin.id == 0) return;  // an untracked task: the other fields are not read
    store_all_but_id(origin);
  }

  // Every field but the id, from a task_origin or from another cell (read
  // field by field, building no record), each only where it differs.
  template <class Origin>
  void store_all_but_id(const Origin& origin) noexcept {
    update(parent, value_of(origin.parent));
    update(file, value_of(origin.file));
    update(function, value_of(origin.function));
    update(name, value_of(origin.name));
    update(line, value_of(origin.line));
    update(spawned_ns, value_of(origin.spawned_ns));
  }

  task_origin load() const noexcept {
    task_origin origin;
    load_into(origin);
    return origin;
  }

  // load(), written into `out` field by field; for an untracked task only
  // the id (0), as nothing reads the rest of an untracked record. A pool
  // worker that copied load()'s result into the task it holds paid for it:
  // the compiler read the returned record back 16 bytes at a time, over
  // stores of 4 and 8 bytes, which stalls store-to-load forwarding
  // (registry_pool_one_cpu, tracking off: 0.87x of compiled out, 0.99x
  // with this).
  void load_into(task_origin& out) const noexcept {
    out.id = id.load(std::memory_order_acquire);
    if (out.id == 0) return;
    out.parent = parent.load(std::memory_order_acquire);
    out.file = file.load(std::memory_order_acquire);
    out.function = function.load(std::memory_order_acquire);
    out.name = name.load(std::memory_order_acquire);
    out.line = line.load(std::memory_order_acquire);
    out.spawned_ns = spawned_ns.load(std::memory_order_acquire);
  }

 private:
  template <class V>
  static void update(std::atomic<V>& field, V value) noexcept {
    if (field.load(std::memory_order_relaxed) != value) field.store(value, std::memory_order_release);
  }

  template <class V>
  static V value_of(const std::atomic<V>& field) noexcept {
    return field.load(std::memory_order_acquire);
  }
  template <class V>
  static V value_of(V value) noexcept {
    return value;
  }
};

// The cell a ring slot carries: an origin_cell, or nothing when the
// registry is compiled out.
#if defined(WEFT_NO_REGISTRY)
using slot_cell = no_cell;
#else
using slot_cell = origin_cell;
#endif

// One task as a snapshot sees it; strings point to static storage.
struct task_record {
  task_origin origin;
  tracked_state state = tracked_state::queued;
  const char* blocked_kind = nullptr;
  const char* blocked_name = nullptr;
  std::int64_t since_ns = 0;
};

// A place that holds queued tasks. collect() runs under the registry's
// mutex and appends the tasks queued there now.
class task_source {
 public:
  virtual void collect(std::vector<task_record>& out) const = 0;

 protected:
  task_source() = default;
  task_source(const task_source&) = default;
  task_source& operator=(const task_source&) = default;
  ~task_source() = default;
};

// A running (or blocked) task on a thread; written by that thread only.
// Outside a blocked_scope a frame says running and blocked on nothing (the
// scope puts them back as it ends), so pushing a task rewrites only its
// origin and its time, published by the id (see the invariants above).
struct task_frame {
  std::atomic<std::uint32_t> version{0};  // odd while a blocked_scope rewrites the frame
  origin_cell origin;
  std::atomic<std::uint8_t> state{static_cast<std::uint8_t>(tracked_state::running)};
  std::atomic<const char*> blocked_kind{nullptr};
  std::atomic<const char*> blocked_name{nullptr};
  std::atomic<std::int64_t> since_ns{0};
};

// The tasks one thread is running, innermost last: a task that waits on
// its group runs the group's tasks on top of itself.
struct thread_tasks {
  static constexpr std::uint32_t max_depth = 32;

  std::atomic<std::uint32_t> depth{0};
  std::uint32_t untracked_depth = 0;  // frames past max_depth, not recorded
  task_frame frames[max_depth];
  // Counted by this thread only (load + store), read by anyone.
  std::atomic<std::uint64_t> spawned{0};
  std::atomic<std::uint64_t> finished{0};
  std::uint64_t next_id = 0;
  std::uint64_t id_limit = 0;
  thread_tasks* previous = nullptr;  // the registry's list, under its mutex
  thread_tasks* next = nullptr;
};

// The registry's shared state. Never destroyed: threads and pools may
// unregister during static destruction.
struct registry_core {
  static constexpr std::uint64_t id_block = 1024;

  std::mutex mutex;
  thread_tasks* threads = nullptr;
  std::vector<const task_source*> sources;
  std::set<std::string, std::less<>> names;
  // From threads that have exited.
  std::uint64_t spawned_by_exited = 0;
  std::uint64_t finished_by_exited = 0;
  std::atomic<std::uint64_t> next_id_block{1};

  static registry_core& get() {
    static registry_core* const core = new registry_core;
    return *core;
  }
};

inline void bump(std::atomic<std::uint64_t>& counter) noexcept {
  counter.store(counter.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

inline thread_local thread_tasks* this_thread_tasks_pointer = nullptr;
// Set once this thread's records are gone (its exit has begun): a task
// spawned later, from a thread_local's destructor, runs untracked. Were the
// thread registered again, nothing would ever unlist it.
inline thread_local constinit bool this_thread_records_gone = false;

// Unregisters this thread's frames when the thread exits.
struct thread_tasks_owner {
  thread_tasks* tasks = nullptr;
  thread_tasks_owner() = default;
  thread_tasks_owner(const thread_tasks_owner&) = delete;
  thread_tasks_owner& operator=(const thread_tasks_owner&) = delete;
  ~thread_tasks_owner() {
    if (tasks == nullptr) return;
    registry_core& core = registry_core::get();
    {
      std::lock_guard guard(core.mutex);
      (tasks->previous != nullptr ? tasks->previous->next : core.threads) = tasks->next;
      if (tasks->next != nullptr) tasks->next->previous = tasks->previous;
      core.spawned_by_exited += tasks->spawned.load(std::memory_order_relaxed);
      core.finished_by_exited += tasks->finished.load(std::memory_order_relaxed);
    }
    this_thread_tasks_pointer = nullptr;
    this_thread_records_gone = true;
    delete tasks;
  }
};

WEFT_NOINLINE inline thread_tasks& register_this_thread() {
  static thread_local thread_tasks_owner owner;
  auto* tasks = new thread_tasks;
  registry_core& core = registry_core::get();
  {
    std::lock_guard guard(core.mutex);
    tasks->next = core.threads;
    if (core.threads != nullptr) core.threads->previous = tasks;
    core.threads = tasks;
  }
  owner.tasks = tasks;
  this_thread_tasks_pointer = tasks;
  return *tasks;
}

// A name that lives as long as the process, for records that outlive the
// object they name. Takes the registry's mutex: for constructors, not for
// hot paths.
inline const char* intern(std::string_view name) {
  if (name.empty()) return nullptr;
  registry_core& core = registry_core::get();
  std::lock_guard guard(core.mutex);
  return core.names.emplace(name).first->c_str();
}

// This thread's records, registered on first use; null when out of memory
// or once the thread's exit has begun (the task then runs untracked).
inline thread_tasks* this_thread_tasks() noexcept {
  if (thread_tasks* tasks = this_thread_tasks_pointer) return tasks;
  if (this_thread_records_gone) return nullptr;
  try {
    return &register_this_thread();
  } catch (...) {
    return nullptr;
  }
}

// Registers this thread now, so that a later frame push needs no lock (for
// callers that push frames under a lock of their own, which the registry's
// mutex must never nest inside). False when out of memory.
inline bool register_this_thread_early() noexcept { return this_thread_tasks() != nullptr; }

// The id of the task `tasks`' thread is running (0: none).
inline std::uint64_t running_task_id(const thread_tasks& tasks) noexcept {
  const auto depth = tasks.depth.load(std::memory_order_relaxed);
  return depth != 0 ? tasks.frames[depth - 1].origin.id.load(std::memory_order_relaxed) : 0;
}

// The same for this thread, which it does not register.
inline std::uint64_t running_task_id() noexcept {
  const thread_tasks* tasks = this_thread_tasks_pointer;
  return tasks != nullptr ? running_task_id(*tasks) : 0;
}

// The record of a task being spawned now by this thread, whose records are
// `tasks` (null: untracked, id 0), whose site is `site`, which runs under
// `name` (interned) and was spawned at `spawned_ns` (registry_clock).
inline task_origin make_origin(thread_tasks* tasks, const spawn_site& site, const char* name,
                               std::int64_t spawned_ns) noexcept {
  task_origin origin;
  if (tasks == nullptr) return origin;
  if (tasks->next_id == tasks->id_limit) {
    tasks->next_id = registry_core::get().next_id_block.fetch_add(registry_core::id_block, std::memory_order_relaxed);
    tasks->id_limit = tasks->next_id + registry_core::id_block;
  }
  origin.id = tasks->next_id++;
  origin.parent = running_task_id(*tasks);
  origin.file = site.file();
  origin.function = site.function();
  origin.line = site.line();
  origin.name = name;
  origin.spawned_ns = spawned_ns;
  return origin;
}

// This thread's records when tracking is on, registered now; else null.
inline thread_tasks* tracking_tasks() noexcept {
  return tracking() ? this_thread_tasks() : nullptr;
}

// The same, spawned now; id 0 when tracking is off.
inline task_origin make_origin(const spawn_site& site, const char* name) noexcept {
  thread_tasks* tasks = tracking_tasks();
  return make_origin(tasks, site, name, tasks != nullptr ? registry_clock.now_ns() : 0);
}

// A task that this thread spawns at `site` under `name`, whose record is
// made only once a queue has taken it, straight into the queue's cell (see
// store_origin): a record made first and handed down by reference lives in
// memory, and its stores, drained before the queue's compare-and-swap,
// were most of what tracking cost a pool's producer (1.5-3 ns a task in a
// profile of registry_pool_one_cpu; 0.3 ns made in the cell). The thread's
// records are looked up (and the thread registered, under the registry's
// mutex) and the clock read (which may wake or start its ticker) as it is
// made, so that nothing inside the queue's claim can block.
struct origin_to_make {
  origin_to_make(const spawn_site& where, const char* under) noexcept
      : tasks(tracking_tasks()),
        spawned_ns(tasks != nullptr ? registry_clock.now_ns() : 0),
        site(where),
        name(under) {}

  thread_tasks* tasks;
  std::int64_t spawned_ns;
  spawn_site site;
  const char* name;
};

inline task_origin make_origin(const origin_to_make& origin) noexcept {
  return make_origin(origin.tasks, origin.site, origin.name, origin.spawned_ns);
}
inline const task_origin& make_origin(const task_origin& origin) noexcept { return origin; }

// Counts a task as spawned once a queue (or the caller) has taken it; a
// task refused by a full or closed queue was never spawned. id 0: an
// untracked task.
inline void accepted(std::uint64_t id) noexcept {
  if (id == 0) return;
  if (thread_tasks* tasks = this_thread_tasks_pointer) bump(tasks->spawned);
}
inline void accepted(const task_origin& origin) noexcept { accepted(origin.id); }

// Stores the record of a task in the cell of the slot that takes it, for a
// producer between claiming the slot and publishing it; returns the task's
// id (0: untracked, or no registry).
template <class Cell, class Origin>
std::uint64_t store_origin(Cell& cell, const Origin& origin) noexcept {
  if constexpr (std::is_same_v<Cell, origin_cell>) {
    const task_origin& made = make_origin(origin);
    cell.store(made);
    return made.id;
  } else {
    return 0;
  }
}

template <class Cell>
task_origin load_origin(const Cell& cell) noexcept {
  if constexpr (std::is_same_v<Cell, origin_cell>) {
    return cell.load();
  } else {
    return {};
  }
}

// out = load_origin(cell), as origin_cell::load_into writes it.
template <class Cell>
void copy_origin(const Cell& cell, task_origin& out) noexcept {
  if constexpr (std::is_same_v<Cell, origin_cell>) {
    cell.load_into(out);
  } else {
    out.id = 0;
  }
}

// Counts a tracked task that ends without running (dropped by
// shutdown_now): it was spawned, so it must be finished.
inline void finished_unrun(const task_origin& origin) noexcept {
  if (origin.id == 0) return;
  if (thread_tasks* tasks = this_thread_tasks()) bump(tasks->finished);
}

// Rewrites a frame under its version, as the seqlock readers expect.
template <class Write>
void rewrite(task_frame& frame, Write write) noexcept {
  const auto version = frame.version.load(std::memory_order_relaxed);
  frame.version.store(version + 1, std::memory_order_relaxed);
  write(frame);
  frame.version.store(version + 2, std::memory_order_release);
}

// While it lives, this thread runs the task of `origin` (nothing for an
// untracked task). Counts the task finished when it ends. A loop that runs
// one task after another keeps one scope and calls start() and stop() for
// each (GCC 12 warns, wrongly, of an uninitialised read when such a loop
// re-emplaces a std::optional<running_scope>). A scope belongs to the
// thread that created it, whose records it keeps at hand.
class running_scope {
 public:
  running_scope() noexcept = default;
  explicit running_scope(const task_origin& origin) noexcept { start(origin); }

  running_scope(const running_scope&) = delete;
  running_scope& operator=(const running_scope&) = delete;

  ~running_scope() { stop(); }

  // Begins the task of `origin`; the scope must not be running one.
  void start(const task_origin& origin) noexcept { push(origin, origin.id); }

  // start(load_origin(cell)), copying the cell into the frame field by
  // field, with no record built in between.
  template <class Cell>
  void start_from(const Cell& cell) noexcept {
    if constexpr (std::is_same_v<Cell, origin_cell>) {
      push(cell, cell.id.load(std::memory_order_acquire));
    }
  }

  // Ends the task begun by start(), if any.
  void stop() noexcept {
    if (!running_) return;
    running_ = false;
    bump(thread_->finished);
    if (thread_->untracked_depth != 0) {
      --thread_->untracked_depth;
      return;
    }
    const auto depth = thread_->depth.load(std::memory_order_relaxed) - 1;
    thread_->depth.store(depth, std::memory_order_release);
    thread_->frames[depth].origin.id.store(0, std::memory_order_release);
  }

 private:
  template <class Origin>
  void push(const Origin& origin, std::uint64_t id) noexcept {
    if (id == 0) return;
    if (thread_ == nullptr && (thread_ = this_thread_tasks()) == nullptr) return;
    running_ = true;
    const auto depth = thread_->depth.load(std::memory_order_relaxed);
    if (depth == thread_tasks::max_depth) {
      ++thread_->untracked_depth;
      return;
    }
    task_frame& frame = thread_->frames[depth];
    frame.origin.store_all_but_id(origin);
    frame.since_ns.store(registry_clock.now_ns(), std::memory_order_release);
    frame.origin.id.store(id, std::memory_order_release);
    thread_->depth.store(depth + 1, std::memory_order_release);
  }

  thread_tasks* thread_ = nullptr;
  bool running_ = false;
};

// While it lives, the task this thread runs (if any) is blocked on `kind`
// ("semaphore", "wait_group", ...) named `name` (interned, or null). Inside
// another blocked_scope, or with no kind, it does nothing.
class blocked_scope {
 public:
  blocked_scope(const char* kind, const char* name) noexcept {
    if constexpr (!registry_compiled) return;
    if (kind == nullptr) return;
    thread_tasks* tasks = this_thread_tasks_pointer;
    if (tasks == nullptr || tasks->untracked_depth != 0) return;
    const auto depth = tasks->depth.load(std::memory_order_relaxed);
    if (depth == 0) return;
    task_frame& top = tasks->frames[depth - 1];
    // The outermost wait names the blocking: task_group::wait, not the
    // wait_group it waits on.
    if (top.state.load(std::memory_order_relaxed) == static_cast<std::uint8_t>(tracked_state::blocked)) return;
    frame_ = &top;
    // The clock before the rewrite, not inside it: a read may wake or start
    // the ticker (a system call), and a snapshot that meets the frame
    // mid-rewrite at every try lists the task without its state (see
    // collect_running).
    const auto now = registry_clock.now_ns();
    rewrite(*frame_, [&](task_frame& frame) {
      frame.state.store(static_cast<std::uint8_t>(tracked_state::blocked), std::memory_order_release);
      frame.blocked_kind.store(kind, std::memory_order_release);
      frame.blocked_name.store(name, std::memory_order_release);
      frame.since_ns.store(now, std::memory_order_release);
    });
  }

  blocked_scope(const blocked_scope&) = delete;
  blocked_scope& operator=(const blocked_scope&) = delete;

  ~blocked_scope() {
    if (frame_ == nullptr) return;
    const auto now = registry_clock.now_ns();
    rewrite(*frame_, [&](task_frame& frame) {
      frame.state.store(static_cast<std::uint8_t>(tracked_state::running), std::memory_order_release);
      frame.blocked_kind.store(nullptr, std::memory_order_release);
      frame.blocked_name.store(nullptr, std::memory_order_release);
      frame.since_ns.store(now, std::memory_order_release);
    });
  }

 private:
  task_frame* frame_ = nullptr;
};

// Appends the record of a queued task (nothing for an untracked one).
inline void add_queued(std::vector<task_record>& out, const task_origin& origin) {
  if (origin.id == 0) return;
  task_record record;
  record.origin = origin;
  record.state = tracked_state::queued;
  record.since_ns = origin.spawned_ns;
  out.push_back(record);
}

// Appends the records of the tasks queued now in a ring whose cells are
// slot_cells, or hold one that `slot_cell_of` returns.
template <class Ring, class SlotCellOf = std::identity>
void collect_queued(const Ring& ring, std::vector<task_record>& out, SlotCellOf slot_cell_of = {}) {
  ring.visit_cells([&](const auto& cell) { return load_origin(slot_cell_of(cell)); },
                   [&](const task_origin& origin) { add_queued(out, origin); });
}

// Registers a source for as long as it lives. A source must unregister
// before anything collect() reads is destroyed.
inline void add_source(const task_source& source) {
  registry_core& core = registry_core::get();
  std::lock_guard guard(core.mutex);
  core.sources.push_back(&source);
}

inline void remove_source(const task_source& source) noexcept {
  registry_core& core = registry_core::get();
  std::lock_guard guard(core.mutex);
  std::erase(core.sources, &source);
}

// Appends the tasks running (or blocked) on the registered threads, read
// from their frames (see the invariants above). The caller holds
// core.mutex. Costs a few loads per live thread and per frame in use;
// collect_records() also walks every slot of every registered queue.
inline void collect_running(const registry_core& core, std::int64_t now_ns,
                            std::vector<task_record>& out) {
  for (const thread_tasks* tasks = core.threads; tasks != nullptr; tasks = tasks->next) {
    const auto depth = tasks->depth.load(std::memory_order_acquire);
    for (std::uint32_t i = 0; i < depth; ++i) {
      const task_frame& frame = tasks->frames[i];
      // A copy whose version held is exact. A thread preempted inside a
      // rewrite, or one that blocks and wakes back to back, can fail that
      // test at every try; after 64 the task is still listed, from the last
      // copy whose id held (a reader that dropped it could make a
      // leak_check report, later, a task live before it began). Its state
      // is then unknown: it is listed as running on nothing since the
      // snapshot, not with a time read mid-rewrite, which could be when it
      // blocked and would give a running task the age of its wait.
      task_record record;  // id 0 until a copy's id held
      bool whole = false;
      for (int attempt = 0; attempt < 64 && !whole; ++attempt) {
        const auto before = frame.version.load(std::memory_order_acquire);
        task_record copy;
        copy.origin = frame.origin.load();
        if (copy.origin.id == 0) break;
        copy.state = static_cast<tracked_state>(frame.state.load(std::memory_order_acquire));
        copy.blocked_kind = frame.blocked_kind.load(std::memory_order_acquire);
        copy.blocked_name = frame.blocked_name.load(std::memory_order_acquire);
        copy.since_ns = frame.since_ns.load(std::memory_order_acquire);
        if (frame.origin.id.load(std::memory_order_acquire) != copy.origin.id) continue;
        whole = before % 2 == 0 && frame.version.load(std::memory_order_acquire) == before;
        if (!whole) {
          copy.state = tracked_state::running;
          copy.blocked_kind = nullptr;
          copy.blocked_name = nullptr;
          copy.since_ns = now_ns;
        }
        record = copy;
      }
      if (record.origin.id != 0) out.push_back(record);
    }
  }
}

// Every live task: queued ones from the sources, then running ones from the
// threads (see the invariants above). A task may appear twice.
inline std::vector<task_record> collect_records() {
  std::vector<task_record> out;
  // Before the mutex: a read of the clock may start its ticker thread.
  const auto now_ns = registry_clock.now_ns();
  registry_core& core = registry_core::get();
  std::lock_guard guard(core.mutex);
  for (const task_source* source : core.sources) source->collect(out);
  collect_running(core, now_ns, out);
  return out;
}

// Spawned and finished counts over every thread, past and present.
inline std::pair<std::uint64_t, std::uint64_t> spawned_and_finished() {
  registry_core& core = registry_core::get();
  std::lock_guard guard(core.mutex);
  std::uint64_t spawned = core.spawned_by_exited;
  std::uint64_t finished = core.finished_by_exited;
  for (const thread_tasks* tasks = core.threads; tasks != nullptr; tasks = tasks->next) {
    spawned += tasks->spawned.load(std::memory_order_relaxed);
    finished += tasks->finished.load(std::memory_order_relaxed);
  }
  return {spawned, finished};
}

}  // namespace weft::detail
