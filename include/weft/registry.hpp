// SPDX-License-Identifier: BSL-1.0
// weft::registry: every task weft has started and not yet finished, with
// where it was started and what it waits for; leak checks for tests and a
// watchdog for stuck tasks.
//
// Go analogues: the goroutine dump (pprof's /debug/pprof/goroutine, or
// SIGQUIT), runtime.NumGoroutine, and go.uber.org/goleak's VerifyNone.
// C++ has nothing like it: a task blocked forever on a queue nobody closes
// is invisible until memory runs out.
//
// What is tracked: every task started through a worker_pool (post, try_post,
// submit, the executor; queued and running), a task_group or result_group
// (go, try_go), gather / parallel_map / for_each (their tasks once they run:
// a helper still queued holds no call yet), and coroutines added to a group
// with weft::co_spawn (weft/asio.hpp). Each has an id, a name (the pool's
// name, "task_group" or "coroutine"), the spawn site (the user's line, see
// spawn_site.hpp), the id of the task that spawned it, its state (queued,
// running, blocked), what it is blocked on when it waits inside a weft
// primitive (`semaphore "db-conns"`, `wait_group`, `task_group::wait`,
// `cancel_token`, `worker_pool "db" post`, `channel "jobs" recv`, `select`;
// a coroutine is always listed as blocked on `co_await`), and since when.
//
//   weft::registry::dump(std::cerr);          // a goroutine dump, for people
//   weft::registry::dump_json(out);           // the same, for tools
//   auto tasks = weft::registry::snapshot();  // as data
//
//   TEST_CASE("no leaks") {
//     weft::leak_check no_leaks;              // fails if a task started in
//     ...                                     // this scope outlives it
//   }
//
// Semantics:
//  - A snapshot is not atomic: it reads each queue and each thread in turn.
//    A task that starts or ends while it is taken may be left out; a task
//    that moves from its queue to a thread is listed once; a running task
//    whose thread was blocking or waking at each of the snapshot's reads of
//    its record (64) is listed as running on nothing, since the snapshot.
//  - Times are steady_clock's, read from a copy that a thread of weft's
//    refreshes every 4 ms while tasks are spawned (detail/tick_clock.hpp),
//    so a time may be up to a tick early (an age up to 4 ms long); ages
//    are measured against steady_clock::now().
//  - live_count() and spawned_total() are sums of per-thread counters, read
//    without stopping anyone: exact when nothing runs, close otherwise.
//  - A task spawned by a thread whose exit has begun (from a thread_local's
//    destructor) is not tracked: the thread's records are gone by then.
//  - A task that a coroutine spawns has as parent the pool task that ran
//    the coroutine's step (listed only while that step runs), not the
//    coroutine.
//
// Cost: see detail/task_tracking.hpp. Tracking is on by default;
// set_enabled(false) turns it off at run time (a task spawned while it is
// off is never listed), and defining WEFT_NO_REGISTRY before including any
// weft header compiles it out.
//
// Thread safety: every function may be called from any thread at any time,
// including from inside tasks. A snapshot takes the registry's mutex, which
// threads also take once when they first run a task and when they exit, and
// queues take when they are made and destroyed; spawning and running tasks
// never take it.
#pragma once

#include <weft/detail/task_tracking.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace weft {

enum class task_state { queued, running, blocked };

inline const char* to_string(task_state state) noexcept {
  switch (state) {
    case task_state::queued:
      return "queued";
    case task_state::running:
      return "running";
    case task_state::blocked:
      return "blocked";
  }
  return "unknown";
}

struct task_info {
  using clock = std::chrono::steady_clock;

  std::uint64_t id = 0;
  std::uint64_t parent = 0;  // the task that spawned this one; 0 if none did
  std::string name;          // the pool's name, or "task_group"
  std::string file;          // the spawn site
  std::string function;
  std::uint32_t line = 0;
  task_state state = task_state::queued;
  std::string blocked_on;  // e.g. `semaphore "db-conns"`; empty unless blocked
  clock::time_point started;  // when it was spawned
  clock::time_point since;    // when it entered its state
};

namespace registry {

namespace detail_registry {
inline task_info::clock::time_point from_ns(std::int64_t ns) {
  return task_info::clock::time_point{
      std::chrono::duration_cast<task_info::clock::duration>(std::chrono::nanoseconds{ns})};
}

// `semaphore "db-conns"`; a kind of two words names the object after the
// first: `channel "jobs" recv`.
inline std::string describe_blocking(const char* kind, const char* name) {
  if (kind == nullptr) return {};
  const std::string_view whole{kind};
  const auto space = whole.find(' ');
  std::string out{whole.substr(0, space)};
  if (name != nullptr) {
    out += " \"";
    out += name;
    out += '"';
  }
  if (space != std::string_view::npos) out += whole.substr(space);
  return out;
}

// "file:line in function (name)", the way every report names a spawn site.
inline std::string describe_site(const std::string& file, std::uint32_t line, const std::string& function,
                                 const std::string& name) {
  std::string out = line != 0 ? file + ':' + std::to_string(line) : std::string{"an unknown site"};
  if (!function.empty()) out += " in " + function;
  if (!name.empty()) out += " (" + name + ')';
  return out;
}

inline std::string format_age(std::chrono::nanoseconds age) {
  char text[32];
  const double seconds = std::chrono::duration<double>(age).count();
  if (seconds < 1) {
    std::snprintf(text, sizeof text, "%.0f ms", seconds * 1000);
  } else {
    std::snprintf(text, sizeof text, "%.1f s", seconds);
  }
  return text;
}

inline void write_json_string(std::ostream& out, const std::string& text) {
  out << '"';
  for (const char c : text) {
    switch (c) {
      case '"':
        out << "\\\"";
        break;
      case '\\':
        out << "\\\\";
        break;
      case '\n':
        out << "\\n";
        break;
      case '\t':
        out << "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out << escaped;
        } else {
          out << c;
        }
    }
  }
  out << '"';
}
}  // namespace detail_registry

// The live tasks, one entry each, in no particular order.
inline std::vector<task_info> snapshot() {
  const std::vector<detail::task_record> records = detail::collect_records();
  // A task seen in its queue and then on its thread is listed once, as
  // running (threads are read after queues).
  std::unordered_map<std::uint64_t, std::size_t> position;
  std::vector<task_info> tasks;
  tasks.reserve(records.size());
  for (const detail::task_record& record : records) {
    task_info info;
    info.id = record.origin.id;
    info.parent = record.origin.parent;
    if (record.origin.name != nullptr) info.name = record.origin.name;
    info.file = record.origin.file;
    info.function = record.origin.function;
    info.line = record.origin.line;
    info.state = static_cast<task_state>(record.state);
    info.blocked_on = detail_registry::describe_blocking(record.blocked_kind, record.blocked_name);
    info.started = detail_registry::from_ns(record.origin.spawned_ns);
    info.since = detail_registry::from_ns(record.since_ns);
    const auto [at, inserted] = position.try_emplace(info.id, tasks.size());
    if (inserted) {
      tasks.push_back(std::move(info));
    } else {
      tasks[at->second] = std::move(info);
    }
  }
  return tasks;
}

// Tasks spawned and not finished (tasks dropped by shutdown_now count as
// finished).
inline std::uint64_t live_count() {
  const auto [spawned, finished] = detail::spawned_and_finished();
  return spawned > finished ? spawned - finished : 0;
}

// Tasks spawned since the program started (while tracking was on).
inline std::uint64_t spawned_total() { return detail::spawned_and_finished().first; }

inline void set_enabled(bool on) noexcept { detail::tracking_enabled.store(on, std::memory_order_relaxed); }
inline bool enabled() noexcept { return detail::tracking(); }

// Writes the live tasks grouped by spawn site, name, state and what they
// are blocked on, the biggest group first, with a count and the age of the
// oldest; a goroutine dump for people.
inline void dump(std::ostream& out) {
  const auto tasks = snapshot();
  const auto now = task_info::clock::now();
  using key = std::tuple<std::string, std::uint32_t, std::string, std::string, task_state, std::string>;
  struct group {
    std::size_t count = 0;
    task_info::clock::time_point oldest_start = task_info::clock::time_point::max();
    task_info::clock::time_point oldest_since = task_info::clock::time_point::max();
  };
  std::map<key, group> groups;
  for (const task_info& task : tasks) {
    group& g = groups[key{task.file, task.line, task.function, task.name, task.state, task.blocked_on}];
    ++g.count;
    g.oldest_start = std::min(g.oldest_start, task.started);
    g.oldest_since = std::min(g.oldest_since, task.since);
  }
  std::vector<std::pair<const key*, const group*>> ordered;
  ordered.reserve(groups.size());
  for (const auto& [k, g] : groups) ordered.emplace_back(&k, &g);
  std::stable_sort(ordered.begin(), ordered.end(),
                   [](const auto& a, const auto& b) { return a.second->count > b.second->count; });
  out << "weft: " << tasks.size() << " live task" << (tasks.size() == 1 ? "" : "s") << " in " << groups.size()
      << " group" << (groups.size() == 1 ? "" : "s") << '\n';
  for (const auto& [k, g] : ordered) {
    const auto& [file, line, function, name, state, blocked_on] = *k;
    out << '\n' << g->count << (g->count == 1 ? " task " : " tasks ") << to_string(state);
    if (!blocked_on.empty()) out << " on " << blocked_on;
    out << " for up to " << detail_registry::format_age(now - g->oldest_since) << " (oldest spawned "
        << detail_registry::format_age(now - g->oldest_start) << " ago)\n";
    out << "    spawned at " << detail_registry::describe_site(file, line, function, name) << '\n';
  }
}

// The live tasks as JSON: {"live": N, "tasks": [{"id": ..., ...}, ...]},
// ages in milliseconds.
inline void dump_json(std::ostream& out) {
  const auto tasks = snapshot();
  const auto now = task_info::clock::now();
  const auto ms = [&](task_info::clock::time_point since) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(now - since).count();
  };
  out << "{\"live\": " << tasks.size() << ", \"tasks\": [";
  bool first = true;
  for (const task_info& task : tasks) {
    out << (first ? "\n  " : ",\n  ");
    first = false;
    out << "{\"id\": " << task.id << ", \"parent\": " << task.parent << ", \"name\": ";
    detail_registry::write_json_string(out, task.name);
    out << ", \"file\": ";
    detail_registry::write_json_string(out, task.file);
    out << ", \"line\": " << task.line << ", \"function\": ";
    detail_registry::write_json_string(out, task.function);
    out << ", \"state\": \"" << to_string(task.state) << "\", \"blocked_on\": ";
    detail_registry::write_json_string(out, task.blocked_on);
    out << ", \"age_ms\": " << ms(task.started) << ", \"state_age_ms\": " << ms(task.since) << '}';
  }
  out << (first ? "]}\n" : "\n]}\n");
}

}  // namespace registry

struct leak_check_options {
  // How long the check waits for tasks to finish before it calls them
  // leaked (goleak retries for about a second as well).
  std::chrono::milliseconds grace{1000};
  // Tasks to ignore: by name (a pool's name, "task_group"), or by spawn-site
  // function (a substring of it).
  std::vector<std::string> ignore_names{};
  std::vector<std::string> ignore_functions{};
  // Receives the report when tasks leaked; by default it is written to
  // stderr and the program aborts.
  std::function<void(const std::string& report)> on_leak{};
};

// Fails when tasks started during its lifetime are still live at its end
// (after the grace period): goleak.VerifyNone for C++. Tasks live at
// construction are never reported. Tasks that other threads start meanwhile
// (tests running in parallel) count as started in its scope: filter them.
//
// Thread safety: one leak_check per scope; several may exist at once.
class leak_check {
 public:
  explicit leak_check(leak_check_options options = {}) : options_(std::move(options)) {
    for (const task_info& task : registry::snapshot()) before_.insert(task.id);
  }

  leak_check(const leak_check&) = delete;
  leak_check& operator=(const leak_check&) = delete;

  ~leak_check() {
    if (checked_) return;
    try {
      const auto leaks = leaked();
      if (leaks.empty()) return;
      const std::string text = report(leaks);
      if (options_.on_leak) {
        options_.on_leak(text);
      } else {
        std::fputs(text.c_str(), stderr);
        std::abort();
      }
    } catch (...) {
      std::fputs("weft::leak_check: the check itself failed (out of memory?)\n", stderr);
    }
  }

  // Waits up to the grace period for the tasks started in this scope to
  // finish and returns those still live (empty: no leak). The destructor
  // then checks nothing more.
  std::vector<task_info> leaked() {
    checked_ = true;
    const auto deadline = std::chrono::steady_clock::now() + options_.grace;
    auto pause = std::chrono::microseconds{100};
    for (;;) {
      std::vector<task_info> leaks;
      for (task_info& task : registry::snapshot()) {
        if (!before_.contains(task.id) && !ignored(task)) leaks.push_back(std::move(task));
      }
      if (leaks.empty() || std::chrono::steady_clock::now() >= deadline) return leaks;
      // A grace period, not a synchronisation: nothing signals the end of
      // an arbitrary task, so the check looks again, more slowly each time.
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds{50});
    }
  }

  // A readable account of leaked tasks: one line each with its spawn site,
  // state and what it is blocked on.
  static std::string report(const std::vector<task_info>& leaks) {
    std::ostringstream out;
    out << "weft::leak_check: " << leaks.size() << " task" << (leaks.size() == 1 ? "" : "s")
        << " started in this scope still live:\n";
    for (const task_info& task : leaks) {
      out << "  task " << task.id << ' ' << to_string(task.state);
      if (!task.blocked_on.empty()) out << " on " << task.blocked_on;
      out << ", spawned at " << registry::detail_registry::describe_site(task.file, task.line, task.function, task.name)
          << '\n';
    }
    return out.str();
  }

 private:
  bool ignored(const task_info& task) const {
    for (const std::string& name : options_.ignore_names) {
      if (task.name == name) return true;
    }
    for (const std::string& function : options_.ignore_functions) {
      if (task.function.find(function) != std::string::npos) return true;
    }
    return false;
  }

  leak_check_options options_;
  std::unordered_set<std::uint64_t> before_;
  bool checked_ = false;
};

struct watchdog_options {
  // A task running or blocked (in its current state) for longer is stuck.
  std::chrono::milliseconds threshold{10'000};
  // How often the watchdog looks; zero: a quarter of the threshold, at
  // least 1 ms.
  std::chrono::milliseconds interval{0};
  // Called once per stuck task, on the watchdog's thread; by default one
  // line to stderr.
  std::function<void(const task_info&)> on_stuck{};
};

// A thread that reports tasks running or blocked longer than a threshold,
// once per task, until it is destroyed.
//
// Thread safety: construct and destroy from one thread; on_stuck runs on
// the watchdog's own thread.
class watchdog {
 public:
  explicit watchdog(watchdog_options options = {}) : options_(std::move(options)) {
    if (options_.interval <= std::chrono::milliseconds::zero()) {
      options_.interval = std::max(std::chrono::milliseconds{1}, options_.threshold / 4);
    }
    thread_ = std::thread([this] { run(); });
  }

  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  ~watchdog() {
    {
      std::lock_guard guard(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

 private:
  void run() {
    std::unordered_set<std::uint64_t> reported;
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      lock.unlock();
      check(reported);
      lock.lock();
      wake_.wait_for(lock, options_.interval, [this] { return stopping_; });
    }
  }

  void check(std::unordered_set<std::uint64_t>& reported) {
    try {
      const auto tasks = registry::snapshot();
      const auto now = task_info::clock::now();
      std::unordered_set<std::uint64_t> live;
      for (const task_info& task : tasks) {
        live.insert(task.id);
        if (task.state == task_state::queued || now - task.since < options_.threshold) continue;
        if (!reported.insert(task.id).second) continue;
        if (options_.on_stuck) {
          options_.on_stuck(task);
        } else {
          std::fprintf(
              stderr, "weft::watchdog: task %llu %s%s%s for %s, spawned at %s\n", static_cast<unsigned long long>(task.id),
              to_string(task.state), task.blocked_on.empty() ? "" : " on ", task.blocked_on.c_str(),
              registry::detail_registry::format_age(now - task.since).c_str(),
              registry::detail_registry::describe_site(task.file, task.line, task.function, task.name).c_str());
        }
      }
      std::erase_if(reported, [&](std::uint64_t id) { return !live.contains(id); });
    } catch (...) {
      std::fputs("weft::watchdog: a check failed (out of memory, or on_stuck threw)\n", stderr);
    }
  }

  watchdog_options options_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace weft
