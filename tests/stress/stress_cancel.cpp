// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for weft's cancellation and waiting
// primitives: cancel_source / cancel_token trees and their on_cancel
// registrations (weft/cancel.hpp, detail/cancel_state.hpp), deadlines on the
// internal timer thread and on manual_clock (detail/timer_queue.hpp),
// std::stop_token interop both ways, and wait_group (weft/wait_group.hpp,
// over detail/parker.hpp and detail/futex.hpp). Every random choice comes
// from weft_test::seed(), which main.cpp prints; replay a failure with
//
//   ./weft_stress --seed N --test-case="*cancel*"
//
// (the interleaving itself is up to the scheduler, so a replay repeats the
// choices, not necessarily the failure). --scale N makes each scenario run N
// times longer.
//
// What each scenario checks, from the headers' contracts:
//  - trees: every on_cancel callback runs at most once, and exactly once when
//    its registration is alive when its token is cancelled; never after its
//    registration's destructor returned (also when that destructor runs on
//    another thread while the callback runs, or inside the callback itself);
//    at once when registered on a cancelled token; exactly one cancel() per
//    source returns true and its cause is the token's; every cancelled node
//    was cancelled by its own winning cancel() or by its parent, with the
//    parent's cause (so no child ever cancels its parent); a cancelled
//    parent's children are all cancelled once cancel() returned; a state's
//    callback list holds exactly its live registrations and children.
//  - deadlines (real steady_clock deadlines of up to 1 ms, and manual_clock):
//    each token ends cancelled exactly once, with the explicit cause when an
//    explicit cancel() won, else deadline_exceeded or its parent's cause; a
//    deadline already past gives a cancelled source; waiters wake; sources
//    destroyed while their deadline fires are freed cleanly (ASan); on
//    manual_clock, advance() has fired every deadline it passed when it
//    returns, and the timer queue is back to its baseline once the sources
//    are gone.
//  - std::stop_token: every stop_token() of one state is the same stop
//    state, is stopped once cancel() has returned (also when first asked
//    for after that), and callbacks on it run exactly once; from_stop_token
//    sources (and their children) are cancelled with errc::cancelled exactly
//    once, also when made or destroyed while request_stop() runs.
//  - wait_group: every wait ends; ok means every done() happened and what
//    the tasks wrote is visible; the group is reused across rounds; the
//    waiter may destroy the group as soon as its wait() returned ok, while
//    the last done() may still be inside it (ASan/TSan); a done() or add(-n)
//    below zero throws std::logic_error and leaves the count unchanged, and
//    one above 2^32 - 1 throws std::overflow_error.
//
// Nothing here sleeps to make something happen and nothing asserts a
// duration: real deadlines are what is under test in one scenario, and the
// waits there wait for the deadline's effect.
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>
#include <version>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::iteration_cap;
using weft_test::run_budget;
using weft_test::spin_until;
using weft_test::under_tsan;

using steady = std::chrono::steady_clock;
using weft::manual_clock;
using weft::wait_status;

// The first few contract violations, kept for the report; callable from
// callbacks (no allocation, never throws).
class failure_log {
 public:
  void fail(const char* what) noexcept {
    if (count_.fetch_add(1) == 0) first_.store(what);
  }
  std::uint64_t count() const noexcept { return count_.load(); }
  std::string first() const {
    const char* what = first_.load();
    return what != nullptr ? what : "none";
  }

 private:
  std::atomic<std::uint64_t> count_{0};
  std::atomic<const char*> first_{nullptr};
};

#define STRESS_CHECK_LOG(log) \
  CHECK_MESSAGE((log).count() == 0, "first violation: " << (log).first())

// Causes that tell apart every cancel() call of a run.
class cause_category_t final : public std::error_category {
 public:
  const char* name() const noexcept override { return "stress_cancel"; }
  std::string message(int value) const override { return "stress cause #" + std::to_string(value); }
};

const std::error_category& cause_category() {
  static const cause_category_t category;
  return category;
}

struct cause_error : std::exception {
  const char* what() const noexcept override { return "stress_cancel cause"; }
};

std::atomic<int> next_cause_id{1};

// What one cancel() call passes, and what cause() must then report.
struct cause_spec {
  enum kind_t { plain, code, exception } kind = plain;
  std::error_code code_value;
  std::exception_ptr exception_value;

  std::error_code expected_code() const noexcept {
    return kind == code ? code_value : weft::make_error_code(weft::errc::cancelled);
  }
  std::exception_ptr expected_exception() const noexcept {
    return kind == exception ? exception_value : nullptr;
  }

  bool apply(weft::cancel_source& source) const noexcept {
    switch (kind) {
      case code:
        return source.cancel(code_value);
      case exception:
        return source.cancel(exception_value);
      case plain:
        break;
    }
    return source.cancel();
  }

  bool matches(const weft::cancel_cause& cause) const noexcept {
    return cause.code() == expected_code() && cause.exception() == expected_exception();
  }
};

template <class Rng>
cause_spec random_cause(Rng& rng) {
  cause_spec cause;
  switch (rng() % 3) {
    case 0:
      break;
    case 1:
      cause.kind = cause_spec::code;
      cause.code_value = std::error_code{next_cause_id.fetch_add(1), cause_category()};
      break;
    default:
      cause.kind = cause_spec::exception;
      cause.exception_value = std::make_exception_ptr(cause_error{});
      break;
  }
  return cause;
}

bool same_cause(const weft::cancel_cause& a, const weft::cancel_cause& b) noexcept {
  return a.code() == b.code() && a.exception() == b.exception();
}

std::size_t callback_count(const weft::cancel_token& token) {
  return weft::detail::state_of(token)->callback_count();
}

template <class Rng>
void yield_a_little(Rng& rng, unsigned most) {
  for (auto spins = rng() % (most + 1); spins > 0; --spins) std::this_thread::yield();
}

// Spins (without giving up the core) for a random while: shifts one thread
// against the others by less than a yield would.
template <class Rng>
void pause_a_little(Rng& rng, unsigned most) {
  for (auto spins = rng() % (most + 1); spins > 0; --spins) weft::detail::cpu_relax();
}

// Runs rounds until the scenario's budget is spent (at least one round).
template <class Round>
std::uint64_t run_rounds(std::uint64_t cap_per_scale, Round round) {
  const auto until = steady::now() + 2 * run_budget();
  std::uint64_t rounds = 0;
  do {
    round(rounds);
    ++rounds;
  } while (rounds < iteration_cap(cap_per_scale) && steady::now() < until);
  return rounds;
}

// Counts a callback's runs.
struct count_runs {
  std::atomic<int>* runs;
  void operator()() const noexcept { runs->fetch_add(1); }
};

// ---------------------------------------------------------------------------
// Trees of children cancelled at random nodes

struct tree_round;
struct registration_slot;

struct slot_callback {
  tree_round* round;
  registration_slot* slot;
  void operator()() const noexcept;
};

enum slot_phase : int { unused = 0, live = 1, destroying = 2, destroyed = 3 };

// One on_cancel registration; the slot outlives it (and the round's threads),
// so a callback that ran after its registration was gone is seen, not a crash.
struct registration_slot {
  std::atomic<int> phase{unused};
  std::atomic<int> runs{0};
  int runs_at_destroy = 0;  // written by whoever destroyed the registration
  // Set up before the registration is made, constant after:
  std::size_t node = 0;
  bool self_destroy = false;  // the callback destroys its own registration
  int action = 0;             // what else the callback does (see slot_callback)
  std::size_t target = 0;
  cause_spec cause;
  std::optional<weft::cancel_callback<slot_callback>> registration;
};

struct tree_node {
  explicit tree_node(weft::cancel_source s, std::size_t parent_index)
      : source(std::move(s)), token(source.token()), parent(parent_index) {}
  weft::cancel_source source;
  const weft::cancel_token token;
  const std::size_t parent;  // the root is its own parent
  std::size_t children = 0;
  std::atomic<int> winners{0};  // cancel() calls on this source that returned true
  cause_spec won;               // the winner's cause, written by the winner
};

struct tree_round {
  std::deque<tree_node> nodes;
  // Per registering thread: its slots, and how many it has handed out.
  std::vector<std::unique_ptr<std::vector<registration_slot>>> slots;
  std::unique_ptr<std::atomic<std::size_t>[]> published;
  failure_log* log = nullptr;

  void cancel_node(std::size_t index, const cause_spec& cause) noexcept {
    tree_node& node = nodes[index];
    if (cause.apply(node.source)) {
      if (node.winners.fetch_add(1) == 0) {
        node.won = cause;
      } else {
        log->fail("two cancel() calls on one source both returned true");
      }
      if (!cause.matches(node.token.cause()))
        log->fail("the winning cancel()'s cause is not the token's cause");
    } else if (!node.token.cancelled()) {
      log->fail("cancel() returned false on a token that is not cancelled");
    }
  }

  // Destroys a live registration unless someone else (its own callback) got
  // there first.
  void destroy(registration_slot& slot) noexcept {
    int expected = live;
    if (!slot.phase.compare_exchange_strong(expected, destroying)) return;
    slot.registration.reset();  // waits for the callback if it runs on another thread
    slot.runs_at_destroy = slot.runs.load();
    slot.phase.store(destroyed);
  }
};

void slot_callback::operator()() const noexcept {
  // Only these two are used after a self-destruction destroys *this.
  tree_round& r = *round;
  registration_slot& s = *slot;
  failure_log& log = *r.log;
  if (s.phase.load() == destroyed)
    log.fail("a callback ran after its registration's destructor returned");
  if (s.runs.fetch_add(1) != 0) log.fail("a callback ran twice");
  const tree_node& own = r.nodes[s.node];
  if (!own.token.cancelled() || !own.token.cause())
    log.fail("a callback ran on a token that is not cancelled");
  switch (s.action) {
    case 1:  // cancel another node (the callback may cancel)
      r.cancel_node(s.target, s.cause);
      break;
    case 2: {  // register on another token and remove it at once (the callback may register)
      const tree_node& other = r.nodes[s.target];
      const bool was_cancelled = other.token.cancelled();
      std::atomic<int> runs{0};
      {
        auto nested = weft::on_cancel(other.token, count_runs{&runs});
        if (was_cancelled && runs.load() != 1)
          log.fail("a registration on a cancelled token did not run at once");
      }
      if (runs.load() > 1) log.fail("a nested callback ran twice");
      break;
    }
    case 3: {  // make and drop a child
      const tree_node& other = r.nodes[s.target];
      const bool was_cancelled = other.token.cancelled();
      auto child = other.token.child();
      if (was_cancelled && !child.cancelled())
        log.fail("a child of a cancelled token was not born cancelled");
      break;
    }
    case 4:  // stay a while, so that destroyers on other threads must wait for us
      for (int i = 0; i < 6; ++i) std::this_thread::yield();
      break;
    default:
      break;
  }
  if (s.self_destroy) {
    int expected = live;
    if (s.phase.compare_exchange_strong(expected, destroying)) {
      s.registration.reset();  // from inside the callback: returns at once
      s.runs_at_destroy = s.runs.load();
      s.phase.store(destroyed);
      return;
    }
  }
  if (s.phase.load() == destroyed)
    log.fail("a registration's destructor returned while its callback still ran");
}

// Checks the tree once no cancel() is in flight. `waiters` bounds the extra
// callbacks that waiting threads may have linked.
void check_tree(tree_round& r, std::size_t waiters) {
  failure_log& log = *r.log;
  std::vector<std::size_t> live_registrations(r.nodes.size(), 0);
  for (const auto& per_thread : r.slots) {
    for (const auto& slot : *per_thread) {
      if (slot.phase.load() == live) ++live_registrations[slot.node];
    }
  }
  for (std::size_t i = 0; i < r.nodes.size(); ++i) {
    tree_node& node = r.nodes[i];
    const tree_node& parent = r.nodes[node.parent];
    const int winners = node.winners.load();
    if (winners > 1) log.fail("more than one cancel() returned true");
    if (node.token.cancelled()) {
      const auto cause = node.token.cause();
      if (winners == 1) {
        if (!node.won.matches(cause))
          log.fail("a node's cause is not its winning cancel()'s cause");
      } else if (i == 0) {
        log.fail("the root is cancelled without any cancel() having won");
      } else if (!parent.token.cancelled()) {
        log.fail(
            "a node is cancelled though neither it nor its parent was (a child cancelled its "
            "parent?)");
      } else if (!same_cause(cause, parent.token.cause())) {
        log.fail("a node cancelled by its parent does not have the parent's cause");
      }
      if (callback_count(node.token) != 0) log.fail("a cancelled token still lists callbacks");
    } else {
      if (i != 0 && parent.token.cancelled())
        log.fail("a cancelled parent left a child uncancelled");
      if (winners != 0) log.fail("a cancel() returned true but the token is not cancelled");
      const std::size_t expected = node.children + live_registrations[i];
      const std::size_t count = callback_count(node.token);
      if (count < expected)
        log.fail("a token lists fewer callbacks than its live registrations and children");
      if (count > expected + waiters)
        log.fail("a token's callback list grew with registrations or children that are gone");
    }
  }
}

}  // namespace

TEST_CASE(
    "cancel trees run every callback once and give every node the first cause that reached it" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed};
  failure_log log;
  std::uint64_t registrations_made = 0;

  const auto rounds = run_rounds(2'000, [&](std::uint64_t round_index) {
    tree_round r;
    r.log = &log;
    const std::size_t node_count = std::uniform_int_distribution<std::size_t>{2, 40}(setup);
    std::vector<int> depth{0};
    r.nodes.emplace_back(weft::cancel_source{}, 0);
    for (std::size_t i = 1; i < node_count; ++i) {
      std::size_t parent = setup() % i;
      while (depth[parent] >= 5) parent = r.nodes[parent].parent;
      depth.push_back(depth[parent] + 1);
      r.nodes.emplace_back(r.nodes[parent].token.child(), parent);
      ++r.nodes[parent].children;
    }

    const int cancellers = 1 + static_cast<int>(setup() % 3);
    const int churners = 1 + static_cast<int>(setup() % 3);
    const int waiters = static_cast<int>(setup() % 3);
    const std::size_t slots_per_churner = under_tsan ? 48 : 128;
    r.published = std::make_unique<std::atomic<std::size_t>[]>(static_cast<std::size_t>(churners));
    for (int t = 0; t < churners; ++t) {
      r.slots.push_back(std::make_unique<std::vector<registration_slot>>(slots_per_churner));
      r.published[static_cast<std::size_t>(t)].store(0);
    }
    const auto pick = [&r](auto& rng) { return static_cast<std::size_t>(rng() % r.nodes.size()); };

    std::atomic<int> started{0};
    const int everyone = cancellers + churners + waiters;
    const auto start_together = [&] {
      started.fetch_add(1);
      spin_until([&] { return started.load() >= everyone; });
    };
    std::atomic<bool> stop_churn{false};
    std::atomic<std::uint64_t> churn_ops{0};
    std::atomic<bool> stop_waiting{false};
    const std::uint64_t round_seed = seed + round_index * 7919u;

    std::vector<std::thread> cancel_threads;
    for (int t = 0; t < cancellers; ++t) {
      cancel_threads.emplace_back([&, t] {
        std::mt19937_64 rng{round_seed + 100u + static_cast<std::uint64_t>(t)};
        start_together();
        for (int c = 1 + static_cast<int>(rng() % 3); c > 0; --c) {
          // Somewhere in the middle of the churn.
          const auto after = rng() % 300;
          spin_until([&] { return churn_ops.load() >= after; });
          pause_a_little(rng, 500);
          r.cancel_node(pick(rng), random_cause(rng));
        }
      });
    }

    std::vector<std::thread> churn_threads;
    for (int t = 0; t < churners; ++t) {
      churn_threads.emplace_back([&, t] {
        std::mt19937_64 rng{round_seed + 200u + static_cast<std::uint64_t>(t)};
        auto& mine = *r.slots[static_cast<std::size_t>(t)];
        auto& published = r.published[static_cast<std::size_t>(t)];
        std::size_t used = 0;
        start_together();
        const std::uint64_t least = 50 + rng() % 200;
        for (std::uint64_t op = 0; op < least || !stop_churn.load(); ++op) {
          churn_ops.fetch_add(1);
          switch (rng() % 8) {
            case 0:
            case 1:
            case 2: {  // register
              if (used == mine.size()) break;
              registration_slot& slot = mine[used];
              slot.node = pick(rng);
              slot.self_destroy = rng() % 4 == 0;
              slot.action = static_cast<int>(rng() % 8);
              slot.target = pick(rng);
              if (slot.action == 1) slot.cause = random_cause(rng);
              const weft::cancel_token& token = r.nodes[slot.node].token;
              const bool was_cancelled = token.cancelled();
              slot.registration.emplace(token, slot_callback{&r, &slot});
              if (was_cancelled && slot.runs.load() != 1) {
                log.fail("a registration on a cancelled token did not run at once");
              }
              slot.phase.store(live);
              published.store(++used);
              break;
            }
            case 3:
            case 4: {  // destroy a registration, maybe another thread's, maybe while its callback
                       // runs
              const auto owner =
                  static_cast<std::size_t>(rng() % static_cast<std::uint64_t>(churners));
              const std::size_t count = r.published[owner].load();
              if (count != 0) r.destroy((*r.slots[owner])[rng() % count]);
              break;
            }
            case 5: {  // a short-lived child (and grandchild) with a registration
              const tree_node& parent = r.nodes[pick(rng)];
              const bool parent_cancelled = parent.token.cancelled();
              auto child = parent.token.child();
              if (parent_cancelled && (!child.cancelled() ||
                                       !same_cause(child.token().cause(), parent.token.cause()))) {
                log.fail(
                    "a child of a cancelled token was not born cancelled with the parent's cause");
              }
              std::atomic<int> runs{0};
              std::optional<weft::cancel_source> grandchild;
              if (rng() % 2 == 0) grandchild = child.token().child();
              {
                const bool child_cancelled = child.cancelled();
                auto registration = weft::on_cancel(child.token(), count_runs{&runs});
                if (child_cancelled && runs.load() != 1)
                  log.fail("a registration on a cancelled child did not run at once");
                if (rng() % 3 == 0) {
                  const auto cause = random_cause(rng);
                  // Only the cancel() that wins has run the callbacks when it
                  // returns; one that lost may return while the parent's
                  // cancellation still runs them on another thread.
                  if (cause.apply(child)) {
                    if (!cause.matches(child.token().cause()))
                      log.fail("a child's winning cause is not its cause");
                    if (runs.load() != 1)
                      log.fail("a live registration did not run when its child was cancelled");
                    if (grandchild && !grandchild->cancelled())
                      log.fail("a grandchild missed its parent's cancel");
                  } else if (!same_cause(child.token().cause(), parent.token.cause())) {
                    log.fail("a child's cancel() lost, but not to its parent's cause");
                  }
                }
                yield_a_little(rng, 2);
              }
              if (runs.load() > 1) log.fail("a child's callback ran twice");
              break;
            }
            case 6: {
              // Rarely: a short timed wait spins and yields first, which is
              // slow on a loaded machine.
              if (rng() % 4 != 0) break;
              const tree_node& node = r.nodes[pick(rng)];
              const auto status = node.token.wait_for(std::chrono::microseconds{rng() % 5});
              if (status == wait_status::ok && !node.token.cancelled())
                log.fail("wait_for said ok on an uncancelled token");
              break;
            }
            default:
              std::this_thread::yield();
              break;
          }
        }
      });
    }

    std::vector<std::thread> wait_threads;
    for (int t = 0; t < waiters; ++t) {
      wait_threads.emplace_back([&, t] {
        std::mt19937_64 rng{round_seed + 300u + static_cast<std::uint64_t>(t)};
        start_together();
        while (!stop_waiting.load()) {
          const tree_node& node = r.nodes[pick(rng)];
          const auto status = node.token.wait();  // the root's cancel at the end wakes everyone
          if (status != wait_status::ok || !node.token.cancelled() || !node.token.cause()) {
            log.fail("wait() returned without the token being cancelled");
          }
        }
      });
    }

    for (auto& t : cancel_threads) t.join();
    stop_churn.store(true);
    for (auto& t : churn_threads) t.join();
    stop_waiting.store(true);
    check_tree(r, static_cast<std::size_t>(waiters));

    // Cancel the root: every node ends cancelled, every live registration ran.
    r.cancel_node(0, random_cause(setup));
    for (auto& t : wait_threads) t.join();
    check_tree(r, 0);
    for (std::size_t i = 0; i < r.nodes.size(); ++i) {
      if (!r.nodes[i].token.cancelled()) log.fail("a node is not cancelled after its root was");
    }
    for (auto& per_thread : r.slots) {
      for (auto& slot : *per_thread) {
        switch (slot.phase.load()) {
          case live:
            ++registrations_made;
            if (slot.runs.load() != 1) log.fail("a live registration did not run exactly once");
            break;
          case destroyed:
            ++registrations_made;
            if (slot.runs.load() > 1) log.fail("a destroyed registration's callback ran twice");
            if (slot.runs.load() != slot.runs_at_destroy)
              log.fail("a callback ran after its registration was destroyed");
            break;
          case destroying:
            log.fail("a registration is stuck being destroyed");
            break;
          default:
            break;
        }
      }
    }
    for (auto& per_thread : r.slots) {
      for (auto& slot : *per_thread) r.destroy(slot);
    }
  });
  MESSAGE("rounds: " << rounds << ", registrations: " << registrations_made);
  STRESS_CHECK_LOG(log);
}

// ---------------------------------------------------------------------------
// Deadlines

namespace {

// One observed source of a deadline round; `deadline` is empty for a plain
// child.
template <class Clock>
struct timed_item {
  std::optional<weft::cancel_source> source;
  weft::cancel_token token;
  std::size_t parent = 0;
  bool has_parent = false;
  std::optional<typename Clock::time_point> deadline;
  std::atomic<int> winners{0};
  cause_spec won;
  std::atomic<int> runs{0};
  std::optional<weft::cancel_callback<count_runs>> registration;
  // Registered after every item exists, so after every child's link: once it
  // ran, cancel() has run every callback of this token (registration order).
  std::atomic<int> tail_runs{0};
  std::optional<weft::cancel_callback<count_runs>> tail;
};

// How a round drives its clock: steady_clock deadlines fire on weft's timer
// thread by themselves; manual_clock ones fire when threads advance it.
template <class Clock>
constexpr bool driven = std::is_same_v<Clock, manual_clock>;

template <class Clock>
void run_deadline_round(std::uint64_t round_seed, failure_log& log) {
  std::mt19937_64 setup{round_seed};
  using items_t = std::deque<timed_item<Clock>>;
  items_t items;
  const std::size_t baseline_timers = [] {
    if constexpr (driven<Clock>) {
      return manual_clock::pending_timers();
    } else {
      return std::size_t{0};
    }
  }();
  const auto offset = [](std::int64_t microseconds) {
    return std::chrono::microseconds{microseconds};
  };

  const std::size_t count = std::uniform_int_distribution<std::size_t>{4, 40}(setup);
  const auto shared_deadline = Clock::now() + offset(static_cast<std::int64_t>(setup() % 400));
  for (std::size_t i = 0; i < count; ++i) {
    auto& item = items.emplace_back();
    weft::cancel_token parent_token;
    if (i > 0 && setup() % 3 != 0) {
      item.parent = setup() % i;
      item.has_parent = true;
      parent_token = items[item.parent].token;
    }
    const bool parent_cancelled = parent_token.cancelled();
    const auto kind = setup() % 9;
    if (kind == 0) {
      item.source = item.has_parent ? parent_token.child() : weft::cancel_source{};
    } else {
      const auto now = Clock::now();
      typename Clock::time_point deadline;
      if (kind == 1) {
        deadline = now - offset(static_cast<std::int64_t>(setup() % 100));  // already past
      } else if (kind == 2) {
        deadline = shared_deadline;  // many timers due at the very same time
      } else if (item.has_parent && items[item.parent].deadline && setup() % 2 == 0) {
        // After the parent's: the parent's deadline comes first.
        deadline = std::min(
            *items[item.parent].deadline + offset(static_cast<std::int64_t>(setup() % 200)),
            now + offset(1500));
      } else {
        deadline = now + offset(static_cast<std::int64_t>(setup() % 900) - 50);
      }
      // with_timeout counts from its own now, which may be later: the deadline
      // kept here is then a lower bound, which is all the checks need.
      item.deadline = deadline;
      item.source = setup() % 2 == 0 ? weft::with_deadline(parent_token, deadline)
                                     : weft::with_timeout<Clock>(parent_token, deadline - now);
      if (deadline <= now && !item.source->cancelled()) {
        log.fail("a deadline already past gave a source that is not cancelled");
      }
    }
    item.token = item.source->token();
    if (parent_cancelled && !same_cause(item.token.cause(), parent_token.cause())) {
      log.fail("a source made from a cancelled parent does not have the parent's cause");
    }
    const bool was_cancelled = item.token.cancelled();
    item.registration.emplace(item.token, count_runs{&item.runs});
    if (was_cancelled && item.runs.load() != 1)
      log.fail("a registration on a cancelled token did not run at once");
  }
  typename Clock::time_point last_deadline = Clock::now();
  for (auto& item : items) {
    item.tail.emplace(item.token, count_runs{&item.tail_runs});
    if (item.deadline) last_deadline = std::max(last_deadline, *item.deadline);
  }

  const auto cancel_item = [&log](timed_item<Clock>& item, const cause_spec& cause) {
    if (cause.apply(*item.source)) {
      if (item.winners.fetch_add(1) == 0) {
        item.won = cause;
      } else {
        log.fail("two cancel() calls on one source both returned true");
      }
      if (!cause.matches(item.token.cause()))
        log.fail("the winning cancel()'s cause is not the token's cause");
    } else if (!item.token.cancelled()) {
      log.fail("cancel() returned false on a token that is not cancelled");
    }
  };

  std::atomic<bool> stop{false};
  std::atomic<int> waiters_left{0};
  std::vector<std::thread> threads;
  const int cancellers = 1 + static_cast<int>(setup() % 2);
  for (int t = 0; t < cancellers; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng{round_seed + 10u + static_cast<std::uint64_t>(t)};
      for (int c = static_cast<int>(rng() % 6); c > 0 && !stop.load(); --c) {
        yield_a_little(rng, 30);
        cancel_item(items[rng() % items.size()], random_cause(rng));
      }
    });
  }
  // Sources that nobody observes, destroyed while their deadline is about to
  // fire (or firing): the timer must skip or finish them, never touch them after.
  threads.emplace_back([&] {
    std::mt19937_64 rng{round_seed + 20u};
    for (std::uint64_t n = 0; n < 10'000 && !stop.load(); ++n) {
      weft::cancel_token parent;
      if (rng() % 2 == 0) parent = items[rng() % items.size()].token;
      auto doomed =
          weft::with_timeout<Clock>(parent, offset(static_cast<std::int64_t>(rng() % 30) - 5));
      std::atomic<int> runs{0};
      std::optional<weft::cancel_callback<count_runs>> registration;
      if (rng() % 2 == 0) registration.emplace(doomed.token(), count_runs{&runs});
      std::optional<weft::cancel_source> child;
      if (rng() % 3 == 0) {
        child = rng() % 2 == 0 ? doomed.token().child()
                               : weft::with_timeout<Clock>(
                                     doomed.token(), offset(static_cast<std::int64_t>(rng() % 20)));
      }
      yield_a_little(rng, 8);
      if (rng() % 4 == 0) doomed.cancel();
      registration.reset();
      if (runs.load() > 1) log.fail("a callback ran twice");
      if (rng() % 2 == 0) child.reset();
    }
  });
  const int waiters = static_cast<int>(setup() % 3);
  waiters_left.store(waiters);
  for (int t = 0; t < waiters; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng{round_seed + 30u + static_cast<std::uint64_t>(t)};
      while (!stop.load()) {
        auto& item = items[rng() % items.size()];
        wait_status status = wait_status::ok;
        switch (rng() % 3) {
          case 0:
            if (!item.deadline) continue;  // only deadline tokens surely end
            status = item.token.wait();
            break;
          case 1:
            status = item.token.wait_for(offset(static_cast<std::int64_t>(rng() % 100)));
            break;
          default:
            status = item.token.wait_until(Clock::now() +
                                           offset(static_cast<std::int64_t>(rng() % 100)));
            break;
        }
        if (status == wait_status::ok && !item.token.cancelled())
          log.fail("a wait said ok on an uncancelled token");
        if (status != wait_status::ok && status != wait_status::timeout)
          log.fail("a wait gave a status it cannot give");
      }
      waiters_left.fetch_sub(1);
    });
  }
  if constexpr (driven<Clock>) {
    const int advancers = 1 + static_cast<int>(setup() % 2);
    for (int t = 0; t < advancers; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng{round_seed + 40u + static_cast<std::uint64_t>(t)};
        while (!stop.load()) {
          manual_clock::advance(offset(static_cast<std::int64_t>(rng() % 40)));
          yield_a_little(rng, 4);
        }
      });
    }
  }

  // Every deadline token ends cancelled: by the timer thread, or when the
  // clock is moved past the last deadline.
  if constexpr (driven<Clock>) {
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (i % 4 == 0) std::this_thread::yield();  // let the advancers race the cancellers a while
    }
    // Past every deadline (with_timeout's own now is this round's, as nobody
    // advanced the clock while the items were made).
    const auto now = manual_clock::now();
    manual_clock::advance(std::max(last_deadline - now, manual_clock::duration::zero()) + 1us);
    for (auto& item : items) {
      if (item.deadline && !item.token.cancelled())
        log.fail("advance() returned before firing a deadline it passed");
    }
  }
  for (auto& item : items) {
    if (item.deadline && item.token.wait() != wait_status::ok)
      log.fail("wait() on a deadline token did not give ok");
  }
  stop.store(true);
  if constexpr (driven<Clock>) {
    // Waiters may sit in a wait_until on the manual clock.
    while (waiters_left.load() > 0) {
      manual_clock::advance(200us);
      std::this_thread::yield();
    }
  }
  for (auto& t : threads) t.join();
  // A cancel() may still be running callbacks on the timer thread: wait until
  // each cancelled token's last callback ran, so its children are settled.
  for (auto& item : items) {
    if (item.token.cancelled()) spin_until([&] { return item.tail_runs.load() != 0; });
  }

  for (std::size_t i = 0; i < items.size(); ++i) {
    auto& item = items[i];
    const int winners = item.winners.load();
    if (winners > 1) log.fail("more than one cancel() returned true");
    if (!item.token.cancelled()) {
      if (item.deadline) log.fail("a deadline token is not cancelled after its deadline");
      if (item.runs.load() != 0) log.fail("a callback ran on a token that is not cancelled");
      if (item.has_parent && items[item.parent].token.cancelled())
        log.fail("a cancelled parent left a child uncancelled");
      continue;
    }
    const auto cause = item.token.cause();
    if (winners == 1) {
      if (!item.won.matches(cause))
        log.fail("the winning cancel()'s cause is not the token's cause");
    } else if (cause.is_deadline()) {
      if (!item.deadline && !(item.has_parent && items[item.parent].token.cancelled())) {
        log.fail(
            "a token without a deadline has deadline_exceeded but its parent is not cancelled");
      }
    } else if (!item.has_parent || !items[item.parent].token.cancelled() ||
               !same_cause(cause, items[item.parent].token.cause())) {
      log.fail(
          "a token's cause is neither its winning cancel(), its deadline nor its parent's cause");
    }
  }
  for (auto& item : items) {
    if (item.token.cancelled() && (item.runs.load() != 1 || item.tail_runs.load() != 1)) {
      log.fail("a registration did not run exactly once");
    }
    item.registration.reset();
    item.tail.reset();
  }
  items.clear();
  if constexpr (driven<Clock>) {
    if (manual_clock::pending_timers() != baseline_timers) {
      log.fail("the manual clock's timer queue kept timers of sources that are gone");
    }
  }
}

}  // namespace

TEST_CASE(
    "steady_clock deadlines racing early cancels and destruction end each token cancelled once" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  failure_log log;
  const auto rounds = run_rounds(1'000, [&](std::uint64_t round) {
    run_deadline_round<steady>(seed + round * 104'729u, log);
  });
  MESSAGE("rounds: " << rounds);
  STRESS_CHECK_LOG(log);
}

TEST_CASE(
    "manual_clock deadlines racing advances, cancels and destruction leave the timer queue empty" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  failure_log log;
  const auto rounds = run_rounds(1'000, [&](std::uint64_t round) {
    run_deadline_round<manual_clock>(seed + round * 15'485'863u, log);
  });
  MESSAGE("rounds: " << rounds);
  STRESS_CHECK_LOG(log);
}

// ---------------------------------------------------------------------------
// std::stop_token interop

#if defined(__cpp_lib_jthread)

namespace {

struct count_stops {
  std::atomic<int>* runs;
  void operator()() const noexcept { runs->fetch_add(1); }
};

// weft -> std (-> weft): threads ask a token for its std::stop_token while
// another cancels it.
void run_weft_to_std_round(std::uint64_t round_seed, failure_log& log) {
  std::mt19937_64 setup{round_seed};
  weft::cancel_source root;
  const bool is_child = setup() % 2 == 0;
  weft::cancel_source source = is_child ? root.token().child() : weft::cancel_source{};
  const weft::cancel_token token = source.token();
  const bool cancel_root = is_child && setup() % 3 == 0;
  const int threads_count = 2 + static_cast<int>(setup() % 5);

  struct per_thread {
    std::stop_token stop_token;
    std::atomic<int> std_runs{0};
    std::optional<std::stop_callback<count_stops>> std_callback;
    std::optional<weft::cancel_source> back;  // from_stop_token of the bridge
    std::atomic<int> back_runs{0};
    std::optional<weft::cancel_callback<count_runs>> back_callback;
  };
  std::deque<per_thread> slots(static_cast<std::size_t>(threads_count));
  std::atomic<bool> cancel_returned{false};
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_count; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(t) + 1u};
      auto& mine = slots[static_cast<std::size_t>(t)];
      started.fetch_add(1);
      spin_until([&] { return started.load() >= threads_count + 1; });
      yield_a_little(rng, 3);
      // While cancel() still runs its callbacks, the token may say cancelled
      // before the bridge (one of those callbacks) has stopped its
      // std::stop_source; once cancel() has returned, it must have.
      const bool after_cancel = cancel_returned.load();
      mine.stop_token = token.stop_token();
      if (after_cancel && !mine.stop_token.stop_requested()) {
        log.fail(
            "after cancel() returned, stop_token() gave a std::stop_token that is not stopped");
      }
      const bool stopped = mine.stop_token.stop_requested();
      if (rng() % 4 != 0) {
        mine.std_callback.emplace(mine.stop_token, count_stops{&mine.std_runs});
        if (stopped && mine.std_runs.load() != 1)
          log.fail("a stop_callback on a stopped token did not run at once");
      }
      if (rng() % 2 == 0) {
        mine.back = weft::from_stop_token(mine.stop_token);
        mine.back_callback.emplace(mine.back->token(), count_runs{&mine.back_runs});
        if (stopped && mine.back_runs.load() != 1)
          log.fail("from_stop_token of a stopped token is not cancelled");
        if (rng() % 3 == 0) {  // and gone again, maybe while the stop runs
          mine.back_callback.reset();
          if (mine.back_runs.load() > 1) log.fail("a callback ran twice");
          mine.back.reset();
        }
      }
      if (rng() % 4 == 0) {
        mine.std_callback.reset();
        if (mine.std_runs.load() > 1) log.fail("a stop_callback ran twice");
      }
    });
  }
  started.fetch_add(1);
  spin_until([&] { return started.load() >= threads_count + 1; });
  yield_a_little(setup, 4);
  const auto cause = cancel_root ? cause_spec{} : random_cause(setup);
  if (!cause.apply(cancel_root ? root : source)) log.fail("the only cancel() returned false");
  cancel_returned.store(true);
  if (!token.cancelled()) log.fail("cancel() returned with the token not cancelled");
  for (auto& t : threads) t.join();
  if (!cause.matches(token.cause())) log.fail("the token does not carry its cancel()'s cause");
  const std::stop_token fresh = token.stop_token();
  if (!fresh.stop_requested())
    log.fail("the std::stop_token of a token cancelled earlier is not stopped");
  for (auto& mine : slots) {
    if (mine.stop_token != fresh)
      log.fail("two stop_token() calls on one state gave different std stop states");
    if (!mine.stop_token.stop_requested())
      log.fail("a bridged std::stop_token was not stopped by the cancel");
    if (mine.std_callback && mine.std_runs.load() != 1)
      log.fail("a std::stop_callback did not run exactly once");
    if (mine.back) {
      if (!mine.back->cancelled() ||
          mine.back->token().cause().code() != weft::make_error_code(weft::errc::cancelled)) {
        log.fail("a from_stop_token source was not cancelled with errc::cancelled");
      }
      if (mine.back_runs.load() != 1)
        log.fail("a from_stop_token source's callback did not run exactly once");
    }
  }
}

// std -> weft: threads make and drop from_stop_token sources (and children)
// while another thread calls request_stop().
void run_std_to_weft_round(std::uint64_t round_seed, failure_log& log) {
  std::mt19937_64 setup{round_seed};
  std::stop_source std_source;
  const int threads_count = 2 + static_cast<int>(setup() % 5);
  struct held {
    explicit held(weft::cancel_source s) : source(std::move(s)) {}
    weft::cancel_source source;
    std::optional<weft::cancel_source> child;
    std::atomic<int> runs{0};
    std::optional<weft::cancel_callback<count_runs>> registration;
  };
  std::vector<std::vector<std::unique_ptr<held>>> kept(static_cast<std::size_t>(threads_count));
  std::atomic<int> started{0};
  std::atomic<bool> stopped{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_count; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(t) + 1u};
      auto& mine = kept[static_cast<std::size_t>(t)];
      mine.reserve(64);
      started.fetch_add(1);
      spin_until([&] { return started.load() >= threads_count + 1; });
      for (int n = 0; n < 64 && !stopped.load(); ++n) {
        const bool was_stopped = std_source.stop_requested();
        auto h = std::make_unique<held>(weft::from_stop_token(std_source.get_token()));
        if (was_stopped && !h->source.cancelled())
          log.fail("from_stop_token of a stopped token is not cancelled");
        if (rng() % 2 == 0) h->child = h->source.token().child();
        h->registration.emplace(h->child ? h->child->token() : h->source.token(),
                                count_runs{&h->runs});
        if (rng() % 2 == 0) {
          mine.push_back(std::move(h));
        } else {  // dropped at once, maybe while request_stop() runs its callback
          yield_a_little(rng, 2);
          h->registration.reset();
          if (h->runs.load() > 1) log.fail("a callback ran twice");
        }
      }
    });
  }
  started.fetch_add(1);
  spin_until([&] { return started.load() >= threads_count + 1; });
  yield_a_little(setup, 30);
  std_source.request_stop();
  stopped.store(true);
  for (auto& t : threads) t.join();
  for (auto& per_thread : kept) {
    for (auto& h : per_thread) {
      const auto token = h->child ? h->child->token() : h->source.token();
      if (!token.cancelled() ||
          token.cause().code() != weft::make_error_code(weft::errc::cancelled) ||
          token.cause().exception() != nullptr) {
        log.fail("a from_stop_token source (or its child) was not cancelled with errc::cancelled");
      }
      if (h->runs.load() != 1)
        log.fail("a callback on a from_stop_token source did not run exactly once");
    }
  }
}

}  // namespace

TEST_CASE("std::stop_token interop holds both ways while cancels and request_stop race" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  failure_log log;
  const auto rounds = run_rounds(4'000, [&](std::uint64_t round) {
    if (round % 2 == 0) {
      run_weft_to_std_round(seed + round * 31u, log);
    } else {
      run_std_to_weft_round(seed + round * 31u, log);
    }
  });
  MESSAGE("rounds: " << rounds);
  STRESS_CHECK_LOG(log);
}

#endif  // __cpp_lib_jthread

// ---------------------------------------------------------------------------
// wait_group

TEST_CASE("wait_group reused across rounds releases every waiter after every done" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed};
  failure_log log;
  weft_test::chaos_sources chaos{4};
  weft::wait_group group{"stress"};
  std::atomic<std::uint64_t> statuses[4] = {};

  const auto rounds = run_rounds(5'000, [&](std::uint64_t round) {
    const std::size_t tasks = std::uniform_int_distribution<std::size_t>{1, 48}(setup);
    std::vector<std::atomic<std::uint64_t>> written(tasks);
    // Raise the count in random pieces (reuse: the last round's waits have returned).
    for (std::size_t added = 0; added < tasks;) {
      const auto piece = std::min<std::size_t>(tasks - added, 1 + setup() % 8);
      group.add(static_cast<std::int64_t>(piece));
      added += piece;
    }
    const int doers = 1 + static_cast<int>(setup() % 6);
    const int waiters = 1 + static_cast<int>(setup() % 6);
    const std::uint64_t stamp = round + 1;
    const std::uint64_t round_seed = seed + round * 65'537u;
    std::vector<std::thread> threads;
    for (int w = 0; w < waiters; ++w) {
      threads.emplace_back([&, w] {
        std::mt19937_64 rng{round_seed + 100u + static_cast<std::uint64_t>(w)};
        for (;;) {
          wait_status status = wait_status::ok;
          switch (rng() % 6) {
            case 0:
              group.wait();
              break;
            case 1:
              status = group.wait(chaos.token(rng()));
              break;
            case 2: {
              auto request =
                  weft::with_timeout(chaos.token(rng()), std::chrono::microseconds{rng() % 300});
              status = group.wait(request.token());
              if (status == wait_status::timeout && !request.token().cause().is_deadline()) {
                log.fail("wait(token) said timeout but the token's cause is not its deadline");
              }
              break;
            }
            case 3:
              status = group.wait_for(std::chrono::microseconds{rng() % 300});
              break;
            case 4:
              status = group.wait_until(steady::now() + std::chrono::microseconds{rng() % 300});
              break;
            default: {
              weft::cancel_source never;
              status = group.wait(never.token());
              break;
            }
          }
          statuses[static_cast<std::size_t>(status)].fetch_add(1);
          if (status == wait_status::closed) log.fail("wait gave closed");
          if (status != wait_status::ok) continue;
          for (const auto& w_ : written) {
            if (w_.load(std::memory_order_relaxed) != stamp) {
              log.fail(
                  "wait() returned ok before every task's done() (or without seeing its writes)");
              break;
            }
          }
          return;
        }
      });
    }
    for (int d = 0; d < doers; ++d) {
      threads.emplace_back([&, d] {
        std::mt19937_64 rng{round_seed + 200u + static_cast<std::uint64_t>(d)};
        for (std::size_t i = static_cast<std::size_t>(d); i < tasks;
             i += static_cast<std::size_t>(doers)) {
          written[i].store(stamp, std::memory_order_relaxed);
          if (rng() % 8 == 0) {
            // Raise the count again while it is still above zero (this task's
            // own done() is pending), then lower it twice.
            group.add(1);
            group.done();
          }
          if (rng() % 4 == 0) yield_a_little(rng, 3);
          group.done();
        }
      });
    }
    if (setup() % 4 == 0) chaos.cancel_and_replace(setup(), setup() % 2 == 0);
    for (auto& t : threads) t.join();
    if (group.count() != 0) log.fail("the count is not zero after every done()");
    if (group.stats().waiters != 0)
      log.fail("waiters are left in the queue after every wait returned");
  });
  MESSAGE("rounds: " << rounds << ", ok " << statuses[0].load() << ", cancelled "
                     << statuses[1].load() << ", timeout " << statuses[2].load());
  STRESS_CHECK_LOG(log);
}

namespace {

// One configuration of the destruction race, run by persistent threads (a
// new thread per round would make the rounds too few): each round a fresh
// wait_group, `doers` threads that call done() once each, and a destroyer
// that waits in a random way until a wait gives ok and then deletes it.
//  variant 0: the destroyer's first waits are cancelled (by the main
//             thread, at about the moment the doers call done()) or time
//             out, and it waits again;
//  variant 1: reuse: another thread add(1)s after the count may have
//             reached zero and done()s again; the destroyer waits for that
//             add, then for zero;
//  variant 2: a second waiter gives up (wait_for) or is released; the
//             destroyer waits until it has returned.
// In every variant each add/done has been called and every other wait has
// returned before the destroyer's last wait begins, so deleting the group
// when that wait returns is allowed.
// Gives a waiter a moment to queue (the race needs one queued), but never
// waits for one that may not come.
void wait_for_a_waiter(const weft::wait_group& group) {
  for (int spins = 0; spins < 4000 && group.stats().waiters == 0; ++spins)
    weft::detail::cpu_relax();
}

std::uint64_t run_destruction_config(int variant, int doers, std::uint64_t config_seed,
                                     steady::time_point until) {
  constexpr std::uint64_t quit = ~std::uint64_t{0};
  std::atomic<std::uint64_t> published{0};
  std::atomic<int> finished{0};
  std::atomic<int> go{0};
  std::atomic<bool> extra_added{false};
  std::atomic<bool> other_waiter_done{false};
  std::atomic<bool> about_to_finish{false};  // a doer is about to call done()
  weft::wait_group* group = nullptr;         // written before a round is published
  weft::cancel_source first_source;          // idem
  const int helpers = 1 + doers + (variant != 0 ? 1 : 0);

  const auto next_round = [&](std::uint64_t seen) {
    spin_until([&] { return published.load() != seen; });
    return published.load();
  };

  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // the destroyer
    std::mt19937_64 rng{config_seed};
    for (std::uint64_t seen = 0; (seen = next_round(seen)) != quit;) {
      weft::wait_group* const g = group;
      weft::cancel_source source = first_source;
      go.fetch_add(1);
      for (bool first = true;; first = false) {
        wait_status status = wait_status::ok;
        switch (first && rng() % 2 == 0 ? 0 : rng() % 4) {
          case 0:
            status = g->wait(source.token());
            break;
          case 1:
            status = g->wait_for(std::chrono::microseconds{rng() % 20});
            break;
          case 2:
            status = g->wait(
                weft::with_timeout(weft::cancel_token{}, std::chrono::microseconds{rng() % 20})
                    .token());
            break;
          default:
            g->wait();
            break;
        }
        if (status == wait_status::ok) break;
        source = weft::cancel_source{};  // a fresh token for the next try
      }
      if (variant == 1) {
        spin_until([&] { return extra_added.load(); });
        g->wait();
      }
      spin_until([&] { return other_waiter_done.load(); });
      g->wait();
      delete g;  // every add/done called, every other wait returned
      finished.fetch_add(1);
    }
  });
  for (int d = 0; d < doers; ++d) {
    threads.emplace_back([&] {
      for (std::uint64_t seen = 0; (seen = next_round(seen)) != quit;) {
        weft::wait_group* const g = group;
        go.fetch_add(1);
        spin_until([&] { return go.load() >= doers + 1; });
        wait_for_a_waiter(*g);
        about_to_finish.store(true);
        g->done();
        finished.fetch_add(1);
      }
    });
  }
  if (variant == 1) {
    threads.emplace_back([&] {
      std::mt19937_64 rng{config_seed + 1u};
      for (std::uint64_t seen = 0; (seen = next_round(seen)) != quit;) {
        weft::wait_group* const g = group;
        spin_until([&] { return go.load() >= doers + 1; });
        pause_a_little(rng, 64);
        g->add(1);
        extra_added.store(true);
        g->done();
        finished.fetch_add(1);
      }
    });
  } else if (variant == 2) {
    threads.emplace_back([&] {
      std::mt19937_64 rng{config_seed + 2u};
      for (std::uint64_t seen = 0; (seen = next_round(seen)) != quit;) {
        weft::wait_group* const g = group;
        (void)g->wait_for(std::chrono::microseconds{rng() % 30});
        other_waiter_done.store(true);
        finished.fetch_add(1);
      }
    });
  }

  std::mt19937_64 rng{config_seed + 3u};
  std::uint64_t round = 0;
  while (round < iteration_cap(100'000) && steady::now() < until) {
    group = new weft::wait_group;
    group->add(doers);
    first_source = weft::cancel_source{};
    go.store(0);
    about_to_finish.store(false);
    extra_added.store(false);
    other_waiter_done.store(variant != 2);
    finished.store(0);
    published.store(++round);
    // Cancel the destroyer's first token at about the moment the doers call done().
    spin_until([&] { return go.load() >= doers + 1; });
    // (Not touching the group: it may be gone already.)
    if (rng() % 2 == 0) {
      spin_until([&] { return about_to_finish.load(); });
      first_source.cancel();
    }
    spin_until([&] { return finished.load() == helpers; });
  }
  published.store(quit);
  for (auto& t : threads) t.join();
  return round;
}

}  // namespace

// The classic use-after-free: the waiter destroys the wait_group as soon as
// its wait() returns ok, while the done() that brought the count to zero may
// still be inside the wait_group (ASan, TSan).
TEST_CASE(
    "wait_group may be destroyed by its waiter as soon as wait returns, while done is still "
    "inside" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  const auto start = steady::now();
  const auto budget = 2 * run_budget();
  std::uint64_t rounds = 0;
  int config = 0;
  for (const int variant : {0, 1, 2}) {
    for (const int doers : {1, 2}) {
      CAPTURE(variant);
      CAPTURE(doers);
      ++config;
      rounds +=
          run_destruction_config(variant, doers, seed + static_cast<std::uint64_t>(config) * 7u,
                                 start + budget * config / 6);
    }
  }
  MESSAGE("rounds: " << rounds);
  CHECK(rounds > 0);
}

TEST_CASE("wait_group rejects a count below zero or above 2^32 - 1 and leaves it unchanged" *
          doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed};
  failure_log log;
  constexpr std::int64_t max_count = 0xFFFF'FFFF;

  const auto rounds = run_rounds(20'000, [&](std::uint64_t round) {
    weft::wait_group group;
    const std::int64_t start = std::uniform_int_distribution<std::int64_t>{0, 64}(setup);
    group.add(start);
    const int threads_count = 2 + static_cast<int>(setup() % 6);
    std::atomic<std::int64_t> applied{start};  // sum of the deltas that succeeded
    std::atomic<bool> waiter_done{false};
    std::vector<std::thread> threads;
    const std::uint64_t round_seed = seed + round * 257u;
    for (int t = 0; t < threads_count; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng{round_seed + static_cast<std::uint64_t>(t)};
        for (int op = 0; op < 24; ++op) {
          std::int64_t delta = 0;
          switch (rng() % 8) {
            case 0:
              delta = static_cast<std::int64_t>(1 + rng() % 4);
              break;
            case 1:
              delta = -static_cast<std::int64_t>(1 + rng() % 4);
              break;
            case 2:
              delta = max_count - static_cast<std::int64_t>(rng() % 8);  // near the top
              break;
            case 3:
              delta = -max_count;
              break;
            default:
              delta = -1;  // done()
              break;
          }
          try {
            if (delta == -1) {
              group.done();
            } else {
              group.add(delta);
            }
            applied.fetch_add(delta);
          } catch (const std::overflow_error&) {
            if (delta <= 0) log.fail("a decrement threw std::overflow_error");
          } catch (const std::logic_error&) {
            if (delta >= 0) log.fail("add() of a positive amount threw std::logic_error");
          } catch (...) {
            log.fail("add() threw something other than logic_error or overflow_error");
          }
        }
      });
    }
    std::thread waiter([&] {
      group.wait();
      waiter_done.store(true);
    });
    for (auto& t : threads) t.join();
    const auto count = group.count();
    if (count != applied.load()) log.fail("the count is not the sum of the add()s that succeeded");
    if (count < 0 || count > max_count) log.fail("the count left its range");
    // Bring it down to zero through errors and successes, releasing the waiter.
    try {
      group.add(-(count + 1));
      log.fail("add() below zero did not throw");
    } catch (const std::logic_error&) {
    }
    if (group.count() != count) log.fail("a refused add() changed the count");
    if (count > 0) group.add(-count);
    try {
      group.done();
      log.fail("done() at zero did not throw");
    } catch (const std::logic_error&) {
    }
    waiter.join();
    if (!waiter_done.load() || group.count() != 0) log.fail("the waiter was not released at zero");
  });
  MESSAGE("rounds: " << rounds);
  STRESS_CHECK_LOG(log);
}

#undef STRESS_CHECK_LOG
