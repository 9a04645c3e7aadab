// SPDX-License-Identifier: BSL-1.0
// A randomised stress scenario for weft::registry: tasks spawned, queued,
// run, blocked, refused and dropped through pools and groups while other
// threads take snapshots, dumps and live counts, and a watchdog looks at
// every task. Replay a failure's random choices with
//
//   ./weft_stress --seed N --test-case="*registry*"
//
// What a bug in the registry's records would break, and is checked here:
//  - No torn record: every task is spawned at one of a few sites made up
//    front, each with its own line and function, its executor's name and
//    the one thing its tasks may block on, so a record that mixes two
//    tasks' fields (the line of one, the function or blocked-on of another)
//    shows.
//  - Never missed: tasks blocked for the whole run (the anchors) are in
//    every snapshot, once each, blocked on their semaphore.
//  - Parents: a task spawned by a task has that task's id as its parent;
//    where both are in a snapshot, the parent comes from the outer site.
//  - Counting: once everything has ended, spawned_total() grew by exactly
//    the tasks that were accepted (a refused post or go is not spawned; a
//    task dropped by shutdown_now() is spawned and finished), and
//    live_count() is back where it was.
//  - The watchdog reports each task at most once.
#include <weft/registry.hpp>
#include <weft/semaphore.hpp>
#include <weft/spawn_site.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <latch>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::iteration_cap;
using weft_test::run_budget;

// Where the scenario's tasks are spawned, and what a record of one of them
// may say. Each site is made on a line of its own, so its line names it.
struct site {
  weft::spawn_site where;
  std::string name;        // the executor's name the registry shows
  std::string blocked_on;  // what its tasks may block on; empty: never
};

site make_site(std::string name, std::string blocked_on,
               weft::spawn_site where = weft::spawn_site::current()) {
  return {where, std::move(name), std::move(blocked_on)};
}

// Everything wrong found in records, counted by kind; a failure prints the
// first example of each.
class record_findings {
 public:
  void note(const std::string& kind, const weft::task_info& task) {
    std::lock_guard lock(mutex_);
    auto& entry = counts_[kind];
    if (entry.first++ == 0) {
      std::ostringstream text;
      text << kind << ": task " << task.id << " line " << task.line << " name \"" << task.name
           << "\" state " << weft::to_string(task.state) << " blocked on \"" << task.blocked_on
           << "\" parent " << task.parent;
      entry.second = text.str();
    }
  }

  void check() const {
    std::lock_guard lock(mutex_);
    for (const auto& kind_and_entry : counts_) {
      const std::uint64_t times = kind_and_entry.second.first;
      INFO(kind_and_entry.second.second);
      CHECK_MESSAGE(times == 0, kind_and_entry.first << " seen " << times << " times");
    }
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::string, std::pair<std::uint64_t, std::string>> counts_;
};

// One function per site: the record of a task names both the line and the
// function, so a record that takes either from another task's shows.
site anchor_site() { return make_site("reg-anchors", "semaphore \"reg-anchor\""); }
site plain_site() { return make_site("reg-churn", ""); }
site submit_site() { return make_site("reg-churn", "semaphore \"reg-sem\""); }
site outer_site() { return make_site("reg-churn", "task_group::wait"); }
site nested_site() { return make_site("task_group", ""); }
site small_site() { return make_site("reg-small", ""); }
site dropped_site() { return make_site("reg-drop", ""); }
site waiter_site() { return make_site("reg-churn", "wait_group \"reg-wg\""); }
site done_site() { return make_site("reg-done", ""); }

}  // namespace

TEST_CASE("registry records stay whole, complete and counted while tasks churn" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);

  weft::semaphore anchor_gate{1, "reg-anchor"};
  weft::semaphore busy_slots{2, "reg-sem"};
  weft::wait_group nested_done{"reg-wg"};
  const site anchor_at = anchor_site();
  const site plain_at = plain_site();
  const site submit_at = submit_site();
  const site outer_at = outer_site();
  const site nested_at = nested_site();
  const site small_at = small_site();
  const site dropped_at = dropped_site();
  const site waiter_at = waiter_site();
  const site done_at = done_site();
  const std::vector<const site*> sites{&anchor_at, &plain_at,   &submit_at, &outer_at, &nested_at,
                                       &small_at,  &dropped_at, &waiter_at, &done_at};
  std::unordered_map<std::uint32_t, const site*> site_by_line;
  for (const site* s : sites) site_by_line.emplace(s->where.line(), s);

  const std::uint64_t spawned_before = weft::registry::spawned_total();
  const std::uint64_t live_before = weft::registry::live_count();
  std::atomic<std::uint64_t> accepted{0};
  record_findings found;

  // Checks one record against its site; returns the site, or null.
  const auto check_record = [&](const weft::task_info& task) -> const site* {
    const auto at = site_by_line.find(task.line);
    if (at == site_by_line.end()) {
      found.note("a record from no known site", task);
      return nullptr;
    }
    const site& s = *at->second;
    if (task.file != s.where.file() || task.function != s.where.function()) {
      found.note("file or function not the site's", task);
    }
    if (task.name != s.name) found.note("name not the site's", task);
    if (task.id == 0) found.note("id 0", task);
    if (task.state == weft::task_state::blocked) {
      if (task.blocked_on.empty() || task.blocked_on != s.blocked_on) {
        found.note("blocked on what the site never blocks on", task);
      }
    } else if (!task.blocked_on.empty()) {
      found.note("blocked-on set while not blocked", task);
    }
    if (task.state == weft::task_state::queued && task.since != task.started) {
      found.note("a queued task's state began after its spawn", task);
    }
    if (task.since < task.started) found.note("state began before the spawn", task);
    if ((task.parent != 0) != (&s == &nested_at)) found.note("parent set for the wrong site", task);
    return &s;
  };

  // The anchors: blocked from before the churn to after it.
  const std::size_t anchors = 3;
  anchor_gate.acquire(1);
  weft::worker_pool anchor_pool{{.workers = anchors, .name = "reg-anchors"}};
  for (std::size_t i = 0; i < anchors; ++i) {
    anchor_pool.post(
        [&] {
          anchor_gate.acquire(1);
          anchor_gate.release(1);
        },
        anchor_at.where);
    accepted.fetch_add(1);
  }
  std::set<std::uint64_t> anchor_ids;
  weft_test::spin_until([&] {
    anchor_ids.clear();
    for (const auto& task : weft::registry::snapshot()) {
      if (task.line == anchor_at.where.line() && task.state == weft::task_state::blocked) {
        anchor_ids.insert(task.id);
      }
    }
    return anchor_ids.size() == anchors;
  });

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> snapshots{0};
  std::mutex reported_mutex;
  std::unordered_map<std::uint64_t, int> reported;
  {
    weft_test::future_sink unread;  // before the pool: see future_sink
    weft::worker_pool churn{{.workers = 3, .queue_capacity = 64, .name = "reg-churn"}};
    // Runs the wait_group's done() calls, which never wait, so the tasks on
    // churn that wait for the count (and may hold every churn worker) are
    // always released.
    weft::worker_pool finisher{{.workers = 1, .name = "reg-done"}};
    weft::watchdog dog{
        {.threshold = 0ms, .interval = 1ms, .on_stuck = [&](const weft::task_info& task) {
           check_record(task);
           std::lock_guard lock(reported_mutex);
           ++reported[task.id];
         }}};

    std::thread reader([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        const auto tasks = weft::registry::snapshot();
        std::unordered_set<std::uint64_t> ids;
        std::unordered_map<std::uint64_t, const site*> site_of;
        std::size_t anchors_seen = 0;
        for (const auto& task : tasks) {
          if (!ids.insert(task.id).second) found.note("listed twice in one snapshot", task);
          const site* s = check_record(task);
          site_of.emplace(task.id, s);
          if (anchor_ids.contains(task.id)) {
            ++anchors_seen;
            if (task.state != weft::task_state::blocked) found.note("an anchor not blocked", task);
          }
        }
        for (const auto& task : tasks) {
          if (task.parent == 0) continue;
          const auto parent = site_of.find(task.parent);
          if (parent != site_of.end() && parent->second != &outer_at) {
            found.note("a parent from the wrong site", task);
          }
        }
        if (anchors_seen != anchors) {
          found.note("an anchor missing from a snapshot", weft::task_info{});
        }
        snapshots.fetch_add(1, std::memory_order_relaxed);
      }
    });
    std::thread dumper([&] {
      std::uint64_t last_spawned = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        std::ostringstream text;
        weft::registry::dump(text);
        weft::registry::dump_json(text);
        const auto spawned = weft::registry::spawned_total();
        if (spawned < last_spawned) found.note("spawned_total went down", weft::task_info{});
        last_spawned = spawned;
        (void)weft::registry::live_count();
      }
    });

    const auto spawner = [&](std::uint64_t thread_seed) {
      std::mt19937_64 rng{thread_seed};
      const auto until = std::chrono::steady_clock::now() + run_budget();
      weft::worker_pool small{{.workers = 1,
                               .queue_capacity = 2,
                               .on_full = weft::overflow::reject,
                               .name = "reg-small"}};
      for (std::uint64_t round = 0; round < iteration_cap(20'000); ++round) {
        if ((round & 7) == 0 && std::chrono::steady_clock::now() >= until) break;
        switch (rng() % 6) {
          case 0:
            churn.post([] {}, plain_at.where);
            accepted.fetch_add(1);
            break;
          case 1: {
            auto done = churn.submit(
                [&] {
                  busy_slots.acquire(1);
                  busy_slots.release(1);
                },
                submit_at.where);
            accepted.fetch_add(1);
            if (rng() % 2 == 0) {
              done.get();
            } else {
              unread.keep(std::move(done));
            }
            break;
          }
          case 2: {
            // A task that waits for its own group of nested tasks.
            const int nested = 1 + static_cast<int>(rng() % 4);
            churn.post(
                [&, nested] {
                  weft::task_group group{churn.executor()};
                  for (int i = 0; i < nested; ++i) {
                    group.go([] {}, nested_at.where);
                    accepted.fetch_add(1);
                  }
                  group.wait();
                },
                outer_at.where);
            accepted.fetch_add(1);
            break;
          }
          case 3:
            if (small.try_post([] {}, small_at.where)) accepted.fetch_add(1);
            break;
          case 4: {
            nested_done.add(1);
            finisher.post([&] { nested_done.done(); }, done_at.where);
            accepted.fetch_add(1);
            if (rng() % 2 == 0) {
              churn.post([&] { nested_done.wait(); }, waiter_at.where);
              accepted.fetch_add(1);
            }
            break;
          }
          default: {
            // Tasks queued behind a blocked worker, then dropped.
            weft::worker_pool doomed{{.workers = 1, .queue_capacity = 8, .name = "reg-drop"}};
            std::latch started{1};
            std::latch release{1};
            doomed.post(
                [&] {
                  started.count_down();
                  release.wait();
                },
                dropped_at.where);
            accepted.fetch_add(1);
            const int queued = static_cast<int>(rng() % 8);
            for (int i = 0; i < queued; ++i) {
              if (doomed.try_post([] {}, dropped_at.where)) accepted.fetch_add(1);
            }
            started.wait();
            (void)doomed.shutdown_now();
            release.count_down();
            bool refused = false;
            try {
              doomed.post([] {}, dropped_at.where);
            } catch (const weft::rejected&) {
              refused = true;
            }
            if (!refused) found.note("a post after shutdown_now() accepted", weft::task_info{});
            break;
          }
        }
      }
      small.shutdown();
    };
    std::vector<std::thread> spawners;
    for (std::uint64_t t = 0; t < 2; ++t) spawners.emplace_back(spawner, seed + t);
    for (auto& t : spawners) t.join();
    nested_done.wait();
    finisher.shutdown();
    finisher.join();
    churn.shutdown();
    churn.join();
    stop.store(true);
    reader.join();
    dumper.join();
  }
  anchor_gate.release(1);
  anchor_pool.shutdown();
  anchor_pool.join();

  MESSAGE(accepted.load() << " tasks accepted, " << snapshots.load() << " snapshots, "
                          << reported.size() << " tasks reported stuck");
  found.check();
  CHECK(snapshots.load() > 0);
  {
    std::lock_guard lock(reported_mutex);
    for (const auto& id_and_times : reported) {
      INFO("task " << id_and_times.first);
      CHECK(id_and_times.second == 1);
    }
  }
  CHECK(weft::registry::spawned_total() - spawned_before == accepted.load());
  CHECK(weft::registry::live_count() == live_before);
  for (const auto& task : weft::registry::snapshot()) {
    if (site_by_line.contains(task.line) && task.file == anchor_at.where.file()) {
      found.note("still listed after everything ended", task);
    }
  }
  found.check();
}
