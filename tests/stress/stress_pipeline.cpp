// SPDX-License-Identifier: BSL-1.0
// Randomised stress for weft::pipeline (weft/pipeline.hpp) and for the
// fan-out calls gather, parallel_map and for_each (weft/fan.hpp): many short
// runs of random shapes, some with an exception thrown from a random function
// at a random call, some with their token cancelled at a random moment (by
// another thread, by a deadline, from inside a function, or before the run),
// and fan-out calls on small pools that are shut down during the call.
// Every random choice comes from weft_test::seed(); replay a failure with
//
//   ./weft_stress --seed N --test-case="pipeline stress*,fan stress*"
//
// (the interleaving is the scheduler's, so a replay repeats the choices, not
// necessarily the failure). --scale N makes each scenario run N times longer.
//
// What is checked after every run or call, whatever happened in it:
//  - it returned or threw (a hang never ends: ctest's TIMEOUT catches it);
//  - it returned only if nothing threw, and then every item reached the sink
//    (every element was computed) exactly once, in input order where the
//    header promises order;
//  - it threw one of the exceptions the functions threw, or, when none threw,
//    the token's cause (identified by value, not by type), or weft::rejected
//    when the pool was shut down;
//  - no item or element was delivered twice, or with a wrong value;
//  - no function of the run is running when it returns, and none runs
//    later (its call count is read again after later runs, which join
//    nothing of it);
//  - pipeline stats, read from another thread while it runs and once after,
//    stay in range and agree with what the functions counted.
//
// The functions' work is a spin whose length is hashed from the item, and
// sometimes a yield. Deadlines are real steady_clock deadlines of 50 us to
// 2 ms, and a cancelling thread first spins a random count: both only vary
// where the cancellation lands. No assertion depends on how long anything
// took.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/fan.hpp>
#include <weft/pipeline.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::iteration_cap;
using weft_test::mix;
using weft_test::run_budget;
using weft_test::under_tsan;

// No count in these scenarios comes near this; a counter past it has wrapped
// or was read torn.
constexpr std::uint64_t sane_count = std::uint64_t{1} << 40;

// Uneven work: a spin of a length hashed from `h`, and a yield on one call in
// eight, so functions finish out of order and threads interleave.
void busy_work(std::uint64_t h) {
  const std::uint64_t spins = h % (under_tsan ? 64 : 512);
  volatile std::uint64_t sink = 0;
  for (std::uint64_t i = 0; i < spins; ++i) sink = sink + i;
  if ((h >> 40) % 8 == 0) std::this_thread::yield();
}

// Spins `spins` iterations, yielding now and then: how long a cancelling
// thread waits before it cancels.
void spin_then_yield(std::uint64_t spins) {
  volatile std::uint64_t sink = 0;
  for (std::uint64_t i = 0; i < spins; ++i) {
    sink = sink + i;
    if (i % 4096 == 4095) std::this_thread::yield();
  }
}

// Thrown by a function of a run at its planned call; the value says which
// throw it was.
class injected_fault : public std::runtime_error {
 public:
  explicit injected_fault(std::uint64_t value)
      : std::runtime_error("injected fault " + std::to_string(value)), value_(value) {}
  std::uint64_t value() const noexcept { return value_; }

 private:
  std::uint64_t value_;
};

// Given to cancel_source::cancel(std::exception_ptr) as the cause.
class cancel_marker : public std::runtime_error {
 public:
  explicit cancel_marker(std::uint64_t value)
      : std::runtime_error("cancel marker " + std::to_string(value)), value_(value) {}
  std::uint64_t value() const noexcept { return value_; }

 private:
  std::uint64_t value_;
};

// The broken invariants seen on any thread: the first one's description and
// how many. Threads other than the test's report here; the test thread
// CHECKs it.
class violations {
 public:
  void add(const std::string& what) {
    std::lock_guard lock(mutex_);
    if (count_++ == 0) first_ = what;
  }
  std::uint64_t count() const {
    std::lock_guard lock(mutex_);
    return count_;
  }
  std::string first() const {
    std::lock_guard lock(mutex_);
    return first_;
  }

 private:
  mutable std::mutex mutex_;
  std::uint64_t count_ = 0;
  std::string first_;
};

// How a run or call ended.
struct outcome {
  enum kind_t { returned, fault, marker, system_error, rejected, other };
  kind_t kind = returned;
  std::uint64_t value = 0;  // the fault's or the marker's
  std::error_code code;     // the system_error's
  std::string what;

  std::string describe() const {
    switch (kind) {
      case returned:
        return "returned";
      case fault:
      case marker:
      case other:
        return "threw \"" + what + "\"";
      case rejected:
        return "threw weft::rejected";
      case system_error:
        return "threw std::system_error " + code.message();
    }
    return "?";
  }
};

template <class F>
outcome outcome_of(F&& f) {
  outcome o;
  try {
    std::forward<F>(f)();
  } catch (const injected_fault& e) {
    o.kind = outcome::fault;
    o.value = e.value();
    o.what = e.what();
  } catch (const cancel_marker& e) {
    o.kind = outcome::marker;
    o.value = e.value();
    o.what = e.what();
  } catch (const std::system_error& e) {
    o.kind = outcome::system_error;
    o.code = e.code();
    o.what = e.what();
  } catch (const weft::rejected& e) {
    o.kind = outcome::rejected;
    o.what = e.what();
  } catch (const std::exception& e) {
    o.kind = outcome::other;
    o.what = e.what();
  } catch (...) {
    o.kind = outcome::other;
    o.what = "a non-standard exception";
  }
  return o;
}

enum class cancel_mode { none, before, other_thread, deadline, from_inside };

// What cancel() is given: nothing (errc::cancelled), a cancel_marker, or an
// error code of the user's.
enum class cause_kind { plain, marker, code };

// The token a run or call is given, and what cancels it: nothing, a cancel
// before it starts, another thread after a random spin, a deadline, or one
// of the run's own functions at a planned call (cancel_now()). The cause is
// the default one, a cancel_marker with a value of its own, or
// std::errc::operation_canceled.
class canceller {
 public:
  canceller(cancel_mode mode, cause_kind cause, std::uint64_t marker, std::uint64_t spins,
            std::chrono::microseconds deadline)
      : mode_(mode), cause_(cause), marker_(marker), spins_(spins) {
    if (mode_ == cancel_mode::none) return;
    if (mode_ == cancel_mode::deadline)
      source_ = weft::with_timeout(weft::cancel_token{}, deadline);
    token_ = source_.token();
    if (mode_ == cancel_mode::before) cancel_now();
  }
  canceller(const canceller&) = delete;
  canceller& operator=(const canceller&) = delete;
  ~canceller() { finish(); }

  // Starts the cancelling thread, in other_thread mode.
  void start() {
    if (mode_ == cancel_mode::other_thread) {
      thread_ = std::thread([this] {
        spin_then_yield(spins_);
        cancel_now();
      });
    }
  }
  void finish() {
    if (thread_.joinable()) thread_.join();
  }

  void cancel_now() {
    switch (cause_) {
      case cause_kind::plain:
        source_.cancel();
        break;
      case cause_kind::marker:
        source_.cancel(std::make_exception_ptr(cancel_marker{marker_}));
        break;
      case cause_kind::code:
        source_.cancel(std::make_error_code(std::errc::operation_canceled));
        break;
    }
  }

  cancel_mode mode() const noexcept { return mode_; }
  const weft::cancel_token& token() const noexcept { return token_; }
  bool cancelled() const noexcept { return token_.cancelled(); }

  // Whether `o` is the token's cause, thrown: the marker with this
  // canceller's value, or a std::system_error with the cause's code.
  bool is_cause(const outcome& o) const {
    if (!token_.cancelled()) return false;
    const auto cause = token_.cause();
    if (cause.exception()) return o.kind == outcome::marker && o.value == marker_;
    return o.kind == outcome::system_error && o.code == cause.code();
  }

 private:
  cancel_mode mode_;
  cause_kind cause_;
  std::uint64_t marker_;
  std::uint64_t spins_;
  weft::cancel_source source_;
  weft::cancel_token token_;
  std::thread thread_;
};

cancel_mode random_cancel_mode(std::mt19937_64& rng) {
  switch (rng() % 5) {
    case 0:
      return cancel_mode::before;
    case 1:
      return cancel_mode::other_thread;
    case 2:
      return cancel_mode::deadline;
    case 3:
      return cancel_mode::from_inside;
    default:
      return cancel_mode::none;
  }
}

cause_kind random_cause_kind(std::mt19937_64& rng) {
  switch (rng() % 3) {
    case 0:
      return cause_kind::marker;
    case 1:
      return cause_kind::code;
    default:
      return cause_kind::plain;
  }
}

std::uint64_t random_spins(std::mt19937_64& rng) { return rng() % (under_tsan ? 20'000 : 200'000); }

std::chrono::microseconds random_deadline(std::mt19937_64& rng) {
  return std::chrono::microseconds{std::uniform_int_distribution<int>{50, 2000}(rng)};
}

bool contains(const std::vector<std::uint64_t>& values, std::uint64_t value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

// ---------------------------------------------------------------------------
// pipeline

// What flows through a pipeline: a key that identifies the item (unique at
// every point of the pipeline: an expanded item's children get keys of their
// own) and a trace that every function updates, so an item that skipped a
// stage or went through one twice arrives with the wrong trace.
struct item {
  std::uint64_t key = 0;
  std::uint64_t trace = 0;
  friend bool operator==(const item&, const item&) = default;
};

bool key_less(const item& a, const item& b) { return a.key < b.key; }

enum class step_kind { map, filter, expand, batch };

// A stage between the source and the sink. A batch step is batch(n,
// max_wait) followed by an expand stage that flattens the batches again.
struct step {
  step_kind kind = step_kind::map;
  weft::stage_options options;  // the flattening stage's, for a batch step
  bool takes_token = false;
  std::size_t batch_size = 1;
  std::chrono::microseconds batch_wait{100};
  std::size_t batch_buffer = 1;
};

enum class source_kind { lvalue_range, rvalue_range, generator, channel };

struct pipeline_plan {
  std::uint64_t id = 0;
  std::uint64_t salt = 0;
  std::size_t items = 0;
  source_kind source = source_kind::lvalue_range;
  std::size_t source_channel_capacity = 1;  // 0: a rendezvous channel
  std::vector<step> steps;
  // The sink takes batches: batch(n, max_wait) right before it.
  bool batch_into_sink = false;
  std::size_t sink_batch_size = 1;
  std::chrono::microseconds sink_batch_wait{100};
  weft::stage_options sink_options;
  bool sink_takes_token = false;
  // Functions are numbered: 0 the generator (if the source is one), 1 + k
  // step k's function, steps.size() + 1 the sink.
  std::optional<std::size_t> fault_function;
  std::uint64_t fault_at = 0;  // the fault_function's call (in call order) that throws
  bool fault_repeats = false;  // and every later call of it
  cancel_mode cancel = cancel_mode::none;
  cause_kind cause = cause_kind::plain;
  std::uint64_t cancel_at = 0;  // from_inside: the run's call (of any function) that cancels
  std::uint64_t cancel_spins = 0;
  std::chrono::microseconds deadline{0};
  bool watch_stats = false;

  std::size_t sink_function() const { return steps.size() + 1; }
  std::size_t functions() const { return steps.size() + 2; }
  // The sink sees items in input order: every stage is ordered or has one
  // worker (a batch has one), and so does the sink.
  bool keeps_order() const {
    if (sink_options.workers != 1) return false;
    return std::all_of(steps.begin(), steps.end(),
                       [](const step& s) { return s.options.ordered || s.options.workers == 1; });
  }
};

// What each function does to an item, for the stage functions and for the
// plan's own simulation of the expected output.
item source_item(std::uint64_t id, std::uint64_t salt) { return {id, mix(id ^ salt)}; }
item map_item(item it, std::size_t k) { return {it.key, mix(it.trace ^ (k + 1))}; }
bool filter_keeps(const item& it, std::size_t k, std::uint64_t salt) {
  return mix(it.key ^ salt ^ (std::uint64_t{k} << 32)) % 4 != 0;
}
item filtered_item(item it, std::size_t k) { return {it.key, mix(it.trace + k + 7)}; }
std::size_t expand_count(const item& it, std::size_t k, std::uint64_t salt) {
  return static_cast<std::size_t>(mix((it.key * 3) ^ salt ^ (std::uint64_t{k} << 40)) % 3);
}
item expanded_item(const item& it, std::size_t k, std::size_t j) {
  return {it.key * 3 + j, mix(it.trace ^ ((k + 1) << 8) ^ j)};
}
item flattened_item(item it, std::size_t k) { return {it.key, mix(it.trace * 3 + k)}; }

// The sink's items, in input order, when nothing fails.
std::vector<item> expected_output(const pipeline_plan& plan) {
  std::vector<item> current;
  for (std::uint64_t id = 0; id < plan.items; ++id) current.push_back(source_item(id, plan.salt));
  for (std::size_t k = 0; k < plan.steps.size(); ++k) {
    std::vector<item> next;
    for (const item& it : current) {
      switch (plan.steps[k].kind) {
        case step_kind::map:
          next.push_back(map_item(it, k));
          break;
        case step_kind::filter:
          if (filter_keeps(it, k, plan.salt)) next.push_back(filtered_item(it, k));
          break;
        case step_kind::expand:
          for (std::size_t j = 0; j < expand_count(it, k, plan.salt); ++j) {
            next.push_back(expanded_item(it, k, j));
          }
          break;
        case step_kind::batch:
          next.push_back(flattened_item(it, k));
          break;
      }
    }
    current = std::move(next);
  }
  return current;
}

// What one run's functions did.
struct pipeline_record {
  explicit pipeline_record(std::size_t functions) : calls_of(functions) {}

  std::atomic<std::int64_t> in_flight{0};  // calls of the run's functions running now
  std::atomic<std::uint64_t> calls{0};     // calls of any of them, so far
  std::vector<std::atomic<std::uint64_t>> calls_of;
  std::atomic<std::uint64_t> sink_completed{0};  // sink calls that returned
  // Calls that found their token cancelled on entry (functions that take one).
  std::atomic<std::uint64_t> saw_cancelled{0};
  std::mutex mutex;
  std::vector<item> delivered;        // under mutex: what the sink got, in its order
  std::vector<std::uint64_t> thrown;  // under mutex: the faults thrown
  std::uint64_t calls_at_return = 0;
};

// Everything a run's functions reach, through one pointer.
struct run_context {
  const pipeline_plan& plan;
  pipeline_record& record;
  canceller& cancel;
  violations& bad;
};

// One call of function `f`: counted while it lasts; it throws the planned
// fault, or cancels the run's token, when this is the planned call.
class call_scope {
 public:
  call_scope(run_context& context, std::size_t f) : context_(context) {
    context.record.in_flight.fetch_add(1, std::memory_order_relaxed);
    const auto overall = context.record.calls.fetch_add(1, std::memory_order_relaxed);
    const auto mine = context.record.calls_of[f].fetch_add(1, std::memory_order_relaxed);
    const auto& plan = context.plan;
    if (plan.cancel == cancel_mode::from_inside && overall == plan.cancel_at)
      context.cancel.cancel_now();
    if (plan.fault_function == f &&
        (mine == plan.fault_at || (plan.fault_repeats && mine > plan.fault_at))) {
      const std::uint64_t value = mix(plan.id) ^ (std::uint64_t{f} << 48) ^ mine;
      {
        std::lock_guard lock(context.record.mutex);
        context.record.thrown.push_back(value);
      }
      context.record.in_flight.fetch_sub(1, std::memory_order_relaxed);
      throw injected_fault{value};
    }
  }
  call_scope(const call_scope&) = delete;
  call_scope& operator=(const call_scope&) = delete;
  ~call_scope() { context_.record.in_flight.fetch_sub(1, std::memory_order_relaxed); }

 private:
  run_context& context_;
};

void note_token(run_context& context, const weft::cancel_token& token) {
  if (token.cancelled()) context.record.saw_cancelled.fetch_add(1, std::memory_order_relaxed);
}

void check_batch(run_context& context, const std::vector<item>& batch, std::size_t most) {
  if (batch.empty() || batch.size() > most) {
    context.bad.add("a batch of " + std::to_string(batch.size()) + " items, with batch size " +
                    std::to_string(most));
  }
}

// Adds step k of the plan to `p`.
weft::pipeline<item> add_step(weft::pipeline<item> p, run_context* context, std::size_t k) {
  const step& s = context->plan.steps[k];
  const std::size_t f = k + 1;
  const std::uint64_t salt = context->plan.salt;
  switch (s.kind) {
    case step_kind::map: {
      auto body = [context, k, f](item it) {
        const call_scope call{*context, f};
        busy_work(mix(it.key ^ (k << 16)));
        return map_item(it, k);
      };
      if (!s.takes_token) return std::move(p).stage(body, s.options);
      return std::move(p).stage(
          [context, body](item it, const weft::cancel_token& token) {
            note_token(*context, token);
            return body(it);
          },
          s.options);
    }
    case step_kind::filter: {
      auto body = [context, k, f, salt](item it) -> std::optional<item> {
        const call_scope call{*context, f};
        busy_work(mix(it.key ^ (k << 20)));
        if (!filter_keeps(it, k, salt)) return std::nullopt;
        return filtered_item(it, k);
      };
      if (!s.takes_token) return std::move(p).stage(body, s.options);
      return std::move(p).stage(
          [context, body](item it, const weft::cancel_token& token) {
            note_token(*context, token);
            return body(it);
          },
          s.options);
    }
    case step_kind::expand: {
      auto body = [context, k, f, salt](item it) {
        const call_scope call{*context, f};
        busy_work(mix(it.key ^ (k << 24)));
        std::vector<item> children;
        for (std::size_t j = 0; j < expand_count(it, k, salt); ++j) {
          children.push_back(expanded_item(it, k, j));
        }
        return children;
      };
      if (!s.takes_token) return std::move(p).expand(body, s.options);
      return std::move(p).expand(
          [context, body](item it, const weft::cancel_token& token) {
            note_token(*context, token);
            return body(it);
          },
          s.options);
    }
    case step_kind::batch: {
      auto body = [context, k, f, most = s.batch_size](std::vector<item> batch) {
        const call_scope call{*context, f};
        check_batch(*context, batch, most);
        busy_work(mix(batch.size() ^ (k << 28)));
        for (item& it : batch) it = flattened_item(it, k);
        return batch;
      };
      auto batched = std::move(p).batch(s.batch_size, s.batch_wait, s.batch_buffer);
      if (!s.takes_token) return std::move(batched).expand(body, s.options);
      return std::move(batched).expand(
          [context, body](std::vector<item> batch, const weft::cancel_token& token) {
            note_token(*context, token);
            return body(std::move(batch));
          },
          s.options);
    }
  }
  return p;
}

weft::runnable_pipeline add_sink(weft::pipeline<item> p, run_context* context) {
  const pipeline_plan& plan = context->plan;
  const std::size_t f = plan.sink_function();
  if (plan.batch_into_sink) {
    auto body = [context, f, most = plan.sink_batch_size](std::vector<item> batch) {
      const call_scope call{*context, f};
      check_batch(*context, batch, most);
      busy_work(mix(batch.size() ^ 0x5151u));
      {
        std::lock_guard lock(context->record.mutex);
        context->record.delivered.insert(context->record.delivered.end(), batch.begin(),
                                         batch.end());
      }
      context->record.sink_completed.fetch_add(1, std::memory_order_relaxed);
    };
    auto batched = std::move(p).batch(plan.sink_batch_size, plan.sink_batch_wait);
    if (!plan.sink_takes_token) return std::move(batched).sink(body, plan.sink_options);
    return std::move(batched).sink(
        [context, body](std::vector<item> batch, const weft::cancel_token& token) {
          note_token(*context, token);
          body(std::move(batch));
        },
        plan.sink_options);
  }
  auto body = [context, f](item it) {
    const call_scope call{*context, f};
    busy_work(mix(it.key ^ 0x5eedu));
    {
      std::lock_guard lock(context->record.mutex);
      context->record.delivered.push_back(it);
    }
    context->record.sink_completed.fetch_add(1, std::memory_order_relaxed);
  };
  if (!plan.sink_takes_token) return std::move(p).sink(body, plan.sink_options);
  return std::move(p).sink(
      [context, body](item it, const weft::cancel_token& token) {
        note_token(*context, token);
        body(it);
      },
      plan.sink_options);
}

// A stage as stats() lists it: which function it calls (none for the source
// and a batch), and whether it can send more than it takes.
struct stage_role {
  std::string name;
  std::size_t workers = 1;
  std::optional<std::size_t> function;
  bool sink = false;
  bool batch = false;
  std::size_t batch_size = 0;
  bool may_multiply = false;  // expand and flatten stages
};

std::vector<stage_role> roles_of(const pipeline_plan& plan) {
  const auto role = [](std::string name, std::size_t workers) {
    stage_role r;
    r.name = std::move(name);
    r.workers = workers;
    return r;
  };
  const auto batch = [&](std::size_t size) {
    auto r = role("batch", 1);
    r.batch = true;
    r.batch_size = size;
    return r;
  };
  std::vector<stage_role> roles{role("source", 1)};
  for (std::size_t k = 0; k < plan.steps.size(); ++k) {
    const step& s = plan.steps[k];
    if (s.kind == step_kind::batch) roles.push_back(batch(s.batch_size));
    auto r = role(s.options.name, s.options.workers);
    r.function = k + 1;
    r.may_multiply = s.kind == step_kind::expand || s.kind == step_kind::batch;
    roles.push_back(std::move(r));
  }
  if (plan.batch_into_sink) roles.push_back(batch(plan.sink_batch_size));
  auto sink = role(plan.sink_options.name, plan.sink_options.workers);
  sink.function = plan.sink_function();
  sink.sink = true;
  roles.push_back(std::move(sink));
  return roles;
}

std::string stage_text(std::size_t index, const weft::stage_stats& s) {
  return "stage " + std::to_string(index) + " (" + s.name + "): in " + std::to_string(s.items_in) +
         ", out " + std::to_string(s.items_out);
}

// What holds of any snapshot, also one taken while the pipeline runs; and,
// given the previous snapshot, that no counter went back.
//
// `skew` gets what only a snapshot whose counts were read at different
// moments shows (more out than in), kept apart so that it does not hide the
// rest.
void check_snapshot(const weft::pipeline_stats& stats, const weft::pipeline_stats* previous,
                    const std::vector<stage_role>& roles, const std::string& what, violations& bad,
                    violations& skew) {
  if (stats.stages.size() != roles.size()) {
    bad.add(what + ": stats() lists " + std::to_string(stats.stages.size()) +
            " stages, the pipeline has " + std::to_string(roles.size()));
    return;
  }
  if (stats.elapsed.count() < 0) bad.add(what + ": stats().elapsed is negative");
  for (std::size_t i = 0; i < roles.size(); ++i) {
    const auto& s = stats.stages[i];
    const auto& role = roles[i];
    const std::string stage = what + ": " + stage_text(i, s);
    if (s.name != role.name) bad.add(stage + ": named wrong");
    if (s.workers != role.workers) bad.add(stage + ": wrong worker count");
    if (s.items_in >= sane_count || s.items_out >= sane_count) {
      bad.add(stage + ": a count out of range");
    }
    if (s.busy.count() < 0 || s.waiting_for_input.count() < 0 || s.waiting_to_send.count() < 0) {
      bad.add(stage + ": a negative time");
    }
    // A stage that sends at most one item per item it takes (a map, a
    // filter, a batch, the sink) never reports more out than in.
    if (!role.may_multiply && s.items_out > s.items_in) {
      skew.add(stage + ": more out than in, in one snapshot");
    }
    if (previous != nullptr && previous->stages.size() == stats.stages.size()) {
      const auto& before = previous->stages[i];
      if (s.items_in < before.items_in || s.items_out < before.items_out || s.busy < before.busy ||
          s.waiting_for_input < before.waiting_for_input ||
          s.waiting_to_send < before.waiting_to_send) {
        bad.add(stage + ": a counter went back from " + stage_text(i, before));
      }
    }
  }
}

// What holds once run() has returned or thrown: the stats agree with the
// functions' own counts; after a run that returned, every channel was
// drained.
void check_final_stats(const weft::pipeline_stats& stats, const std::vector<stage_role>& roles,
                       const pipeline_plan& plan, pipeline_record& record, bool returned,
                       const std::string& what, violations& bad, violations& skew) {
  check_snapshot(stats, nullptr, roles, what, bad, skew);
  if (stats.stages.size() != roles.size()) return;
  for (std::size_t i = 0; i < roles.size(); ++i) {
    const auto& s = stats.stages[i];
    const auto& role = roles[i];
    // A stage calls its function once for every item it receives.
    if (role.function && s.items_in != record.calls_of[*role.function].load()) {
      bad.add(what + ": " + stage_text(i, s) + ", but its function was called " +
              std::to_string(record.calls_of[*role.function].load()) + " times");
    }
    if (role.sink && s.items_out != record.sink_completed.load()) {
      bad.add(what + ": " + stage_text(i, s) + ", but " +
              std::to_string(record.sink_completed.load()) + " sink calls returned");
    }
    if (!returned) continue;
    if (i == 0 && s.items_out != plan.items) {
      bad.add(what + ": " + stage_text(i, s) + " after a complete run of " +
              std::to_string(plan.items) + " items");
    }
    if (i > 0 && s.items_in != stats.stages[i - 1].items_out) {
      bad.add(what + ": " + stage_text(i, s) + " after a complete run, but the stage before sent " +
              std::to_string(stats.stages[i - 1].items_out));
    }
    if (role.batch && (s.items_out > s.items_in || s.items_out * role.batch_size < s.items_in)) {
      bad.add(what + ": " + stage_text(i, s) + ": not batches of 1 to " +
              std::to_string(role.batch_size));
    }
  }
}

// The sink's items against the plan's: none twice, none unknown or with a
// wrong trace, in input order where promised; and, after a complete run,
// all of them.
void check_delivered(const pipeline_plan& plan, const std::vector<item>& expected,
                     const std::vector<item>& delivered, bool complete, const std::string& what,
                     violations& bad) {
  std::vector<item> sorted_expected = expected;
  std::sort(sorted_expected.begin(), sorted_expected.end(), key_less);
  std::vector<item> sorted_delivered = delivered;
  std::sort(sorted_delivered.begin(), sorted_delivered.end(), key_less);
  for (std::size_t i = 1; i < sorted_delivered.size(); ++i) {
    if (sorted_delivered[i].key == sorted_delivered[i - 1].key) {
      bad.add(what + ": item " + std::to_string(sorted_delivered[i].key) +
              " reached the sink twice");
      return;
    }
  }
  for (const item& it : sorted_delivered) {
    const auto found =
        std::lower_bound(sorted_expected.begin(), sorted_expected.end(), it, key_less);
    if (found == sorted_expected.end() || !(*found == it)) {
      bad.add(what + ": item " + std::to_string(it.key) +
              " reached the sink with a wrong key or trace");
      return;
    }
  }
  if (complete && sorted_delivered.size() != sorted_expected.size()) {
    bad.add(what + ": run() returned, but " + std::to_string(sorted_delivered.size()) + " of " +
            std::to_string(sorted_expected.size()) + " items reached the sink");
    return;
  }
  if (plan.keeps_order()) {
    // A subsequence of the input order, even when items were dropped.
    std::size_t next = 0;
    for (const item& it : delivered) {
      while (next < expected.size() && expected[next].key != it.key) ++next;
      if (next == expected.size()) {
        bad.add(what + ": item " + std::to_string(it.key) +
                " reached an order-keeping sink out of order");
        return;
      }
      ++next;
    }
  }
}

pipeline_plan random_plan(std::mt19937_64& rng, std::uint64_t id, bool faults, bool cancels) {
  pipeline_plan plan;
  plan.id = id;
  plan.salt = rng();
  plan.items =
      rng() % 4 == 0 ? rng() % 4 : 1 + static_cast<std::size_t>(rng() % (under_tsan ? 120 : 400));
  switch (rng() % 4) {
    case 0:
      plan.source = source_kind::lvalue_range;
      break;
    case 1:
      plan.source = source_kind::rvalue_range;
      break;
    case 2:
      plan.source = source_kind::generator;
      break;
    default:
      plan.source = source_kind::channel;
      break;
  }
  plan.source_channel_capacity = rng() % 9;
  const auto workers = [&] { return static_cast<std::size_t>(1 + rng() % 4); };
  // 0 makes a rendezvous channel.
  const auto buffer = [&] { return static_cast<std::size_t>(rng() % 9); };
  const std::size_t steps = rng() % 8 == 0 ? 0 : 1 + rng() % 3;
  for (std::size_t k = 0; k < steps; ++k) {
    step s;
    switch (rng() % 8) {
      case 0:
      case 1:
      case 2:
        s.kind = step_kind::map;
        break;
      case 3:
      case 4:
        s.kind = step_kind::filter;
        break;
      case 5:
      case 6:
        s.kind = step_kind::expand;
        break;
      default:
        s.kind = step_kind::batch;
        break;
    }
    s.options = {.workers = workers(),
                 .buffer = buffer(),
                 .ordered = rng() % 2 == 0,
                 .name = "step " + std::to_string(k)};
    s.takes_token = rng() % 3 == 0;
    s.batch_size = 1 + rng() % 5;
    s.batch_wait = random_deadline(rng);
    s.batch_buffer = buffer();
    plan.steps.push_back(std::move(s));
  }
  plan.batch_into_sink = rng() % 6 == 0;
  plan.sink_batch_size = 1 + rng() % 5;
  plan.sink_batch_wait = random_deadline(rng);
  plan.sink_options = {
      .workers = rng() % 2 == 0 ? 1 : workers(), .buffer = buffer(), .name = "the sink"};
  plan.sink_takes_token = rng() % 3 == 0;

  if (faults && rng() % 4 != 0) {
    const std::size_t first = plan.source == source_kind::generator ? 0 : 1;
    plan.fault_function = first + rng() % (plan.functions() - first);
    plan.fault_at = rng() % (plan.items + 2);  // may be past the last call: then nothing throws
    plan.fault_repeats = rng() % 3 == 0;
  }
  if (cancels) {
    plan.cancel = random_cancel_mode(rng);
    if (plan.cancel == cancel_mode::none) plan.cancel = cancel_mode::other_thread;
  }
  plan.cause = random_cause_kind(rng);
  plan.cancel_at = rng() % (plan.items * (plan.steps.size() + 2) + 1);
  plan.cancel_spins = random_spins(rng);
  plan.deadline = random_deadline(rng);
  plan.watch_stats = rng() % 2 == 0;
  return plan;
}

std::string describe(const pipeline_plan& plan) {
  std::string text = "run " + std::to_string(plan.id) + ": " + std::to_string(plan.items) +
                     " items from a " +
                     (plan.source == source_kind::lvalue_range   ? "range"
                      : plan.source == source_kind::rvalue_range ? "moved range"
                      : plan.source == source_kind::generator    ? "generator"
                                                                 : "channel");
  for (const step& s : plan.steps) {
    text += s.kind == step_kind::map      ? " -> map"
            : s.kind == step_kind::filter ? " -> filter"
            : s.kind == step_kind::expand ? " -> expand"
                                          : " -> batch(" + std::to_string(s.batch_size) + ")";
    text += "[w" + std::to_string(s.options.workers) + " b" + std::to_string(s.options.buffer) +
            (s.options.ordered ? " ordered" : "") + (s.takes_token ? " token" : "") + "]";
  }
  if (plan.batch_into_sink) text += " -> batch(" + std::to_string(plan.sink_batch_size) + ")";
  text += " -> sink[w" + std::to_string(plan.sink_options.workers) + "]";
  if (plan.fault_function) {
    text += ", fault in function " + std::to_string(*plan.fault_function) + " at call " +
            std::to_string(plan.fault_at) + (plan.fault_repeats ? " and later" : "");
  }
  const char* modes[] = {"none", "before", "other thread", "deadline", "from inside"};
  text += std::string(", cancel ") + modes[static_cast<int>(plan.cancel)];
  return text;
}

struct pipeline_tally {
  std::atomic<std::uint64_t> runs{0};
  std::atomic<std::uint64_t> returned{0};
  std::atomic<std::uint64_t> faults{0};
  std::atomic<std::uint64_t> causes{0};
  std::atomic<std::uint64_t> delivered{0};
};

// Runs the plan's pipeline once and checks everything that holds after it.
void run_pipeline(const pipeline_plan& plan, pipeline_record& record, violations& bad,
                  violations& skew, pipeline_tally& tally) {
  const auto expected = expected_output(plan);
  const auto roles = roles_of(plan);
  canceller cancel{plan.cancel, plan.cause, mix(plan.id ^ 0xca9ce1u), plan.cancel_spins,
                   plan.deadline};
  run_context context{plan, record, cancel, bad};
  const std::string what = describe(plan);

  std::vector<item> input;
  for (std::uint64_t id = 0; id < plan.items; ++id) input.push_back(source_item(id, plan.salt));
  weft::channel<item> source_channel{plan.source_channel_capacity, "stress source"};
  weft::cancel_source stop_feeding;
  std::thread feeder;

  std::optional<weft::pipeline<item>> built;
  switch (plan.source) {
    case source_kind::lvalue_range:
      built.emplace(input, "stress");
      break;
    case source_kind::rvalue_range:
      built.emplace(std::vector<item>(input), "stress");
      break;
    case source_kind::generator:
      built.emplace(
          [c = &context, next = std::uint64_t{0}]() mutable -> std::optional<item> {
            const call_scope call{*c, 0};
            if (next == c->plan.items) return std::nullopt;
            busy_work(mix(next ^ 0x9e9e9eu));
            return source_item(next++, c->plan.salt);
          },
          "stress");
      break;
    case source_kind::channel:
      built.emplace(source_channel, "stress");
      feeder = std::thread([&plan, &source_channel, token = stop_feeding.token()] {
        for (std::uint64_t id = 0; id < plan.items; ++id) {
          if (source_channel.send(source_item(id, plan.salt), token) != weft::wait_status::ok) {
            return;
          }
        }
        source_channel.close();
      });
      break;
  }
  weft::pipeline<item> p = std::move(*built);
  for (std::size_t k = 0; k < plan.steps.size(); ++k) p = add_step(std::move(p), &context, k);
  weft::runnable_pipeline runnable = add_sink(std::move(p), &context);

  std::atomic<bool> finished{false};
  std::thread watcher;
  if (plan.watch_stats) {
    watcher = std::thread([&] {
      std::optional<weft::pipeline_stats> previous;
      for (std::uint64_t i = 0; i < iteration_cap(20'000) * 10 && !finished.load(); ++i) {
        auto stats = runnable.stats();
        check_snapshot(stats, previous ? &*previous : nullptr, roles, what, bad, skew);
        const auto busiest = runnable.bottleneck();
        if (std::none_of(roles.begin(), roles.end(),
                         [&](const stage_role& r) { return r.name == busiest; })) {
          bad.add(what + ": bottleneck() named \"" + busiest + "\", not a stage");
        }
        previous = std::move(stats);
        std::this_thread::yield();
      }
    });
  }

  cancel.start();
  const outcome result = outcome_of([&] { runnable.run(cancel.token()); });
  // Nothing of the run may be running now, or run later.
  record.calls_at_return = record.calls.load();
  const auto in_flight = record.in_flight.load();
  cancel.finish();
  finished.store(true);
  if (watcher.joinable()) watcher.join();
  stop_feeding.cancel();
  if (feeder.joinable()) feeder.join();

  if (in_flight != 0) {
    bad.add(what + ": " + std::to_string(in_flight) + " calls still running when run() " +
            result.describe());
  }
  std::vector<std::uint64_t> thrown;
  std::vector<item> delivered;
  {
    std::lock_guard lock(record.mutex);
    thrown = record.thrown;
    delivered = record.delivered;
  }
  const bool returned = result.kind == outcome::returned;
  switch (result.kind) {
    case outcome::returned:
      if (!thrown.empty()) bad.add(what + ": run() returned although a function threw");
      if (record.saw_cancelled.load() != 0) {
        bad.add(what + ": run() returned although a function saw its token cancelled");
      }
      if (plan.cancel == cancel_mode::before) {
        bad.add(what + ": run() returned under a token cancelled before it");
      }
      break;
    case outcome::fault:
      if (!contains(thrown, result.value)) {
        bad.add(what + ": run() threw a fault that no function threw: " + result.what);
      }
      break;
    case outcome::marker:
    case outcome::system_error:
      if (!thrown.empty()) {
        bad.add(what + ": a function threw, but run() " + result.describe());
      } else if (!cancel.is_cause(result)) {
        bad.add(what + ": run() " + result.describe() + ", which is not the token's cause");
      }
      break;
    case outcome::rejected:
    case outcome::other:
      bad.add(what + ": run() " + result.describe());
      break;
  }
  if (thrown.empty() && plan.cancel == cancel_mode::none && record.saw_cancelled.load() != 0) {
    bad.add(what + ": a function saw its token cancelled, with nothing to cancel it");
  }
  if (plan.cancel == cancel_mode::before && record.calls.load() != 0) {
    bad.add(what + ": " + std::to_string(record.calls.load()) +
            " calls under a token cancelled before run()");
  }
  check_delivered(plan, expected, delivered, returned, what, bad);
  check_final_stats(runnable.stats(), roles, plan, record, returned, what, bad, skew);

  tally.runs.fetch_add(1);
  tally.delivered.fetch_add(delivered.size());
  (returned                        ? tally.returned
   : result.kind == outcome::fault ? tally.faults
                                   : tally.causes)
      .fetch_add(1);
}

// Runs rounds from `drivers` threads at once until the run budget is spent.
// run_round(rng, run_id) makes one run or call and returns its record; a
// function of a run that has returned must never be called again, so each
// record's call count is checked once the driver's next round is over, and
// the last ones once every driver has joined.
template <class Record, class RunRound>
void drive(int drivers, std::uint64_t seed, violations& bad, const std::string& what,
           RunRound run_round) {
  std::mutex last_mutex;
  std::vector<std::unique_ptr<Record>> last_records;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  const auto driver = [&](int index) {
    std::mt19937_64 rng{seed + static_cast<std::uint64_t>(index)};
    std::unique_ptr<Record> previous;
    for (std::uint64_t round = 0; round < iteration_cap(20'000); ++round) {
      if (std::chrono::steady_clock::now() >= until) break;
      std::unique_ptr<Record> record =
          run_round(rng, (static_cast<std::uint64_t>(index) << 32) | round);
      if (previous && previous->calls.load() != previous->calls_at_return) {
        bad.add("a function of an earlier " + what + " was called after it had returned");
      }
      previous = std::move(record);
    }
    std::lock_guard lock(last_mutex);
    if (previous) last_records.push_back(std::move(previous));
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < drivers; ++i) threads.emplace_back(driver, i);
  for (auto& t : threads) t.join();
  for (const auto& record : last_records) {
    if (record->calls.load() != record->calls_at_return) {
      bad.add("a function of a last " + what + " was called after it had returned");
    }
  }
}

// Runs random pipelines on `drivers` threads at once for the run budget.
void pipeline_scenario(std::uint64_t seed, int drivers, bool faults, bool cancels) {
  violations bad;
  violations skew;
  pipeline_tally tally;
  drive<pipeline_record>(drivers, seed + static_cast<std::uint64_t>(drivers) * 1000u, bad,
                         "pipeline run", [&](std::mt19937_64& rng, std::uint64_t id) {
                           const auto plan = random_plan(rng, id, faults, cancels);
                           auto record = std::make_unique<pipeline_record>(plan.functions());
                           run_pipeline(plan, *record, bad, skew, tally);
                           return record;
                         });

  CHECK_MESSAGE(bad.count() == 0, bad.count() << " violations; the first: " << bad.first());
  CHECK_MESSAGE(skew.count() == 0, skew.count()
                                       << " skewed stats snapshots; the first: " << skew.first());
  CHECK(tally.runs.load() > 0);
  MESSAGE(drivers << " drivers: " << tally.runs.load() << " runs, " << tally.returned.load()
                  << " returned, " << tally.faults.load() << " threw a fault, "
                  << tally.causes.load() << " threw the token's cause; " << tally.delivered.load()
                  << " items delivered");
}

// ---------------------------------------------------------------------------
// gather, parallel_map, for_each

// A result type with no default constructor: parallel_map keeps such results
// in optionals, a path of its own.
struct boxed {
  explicit boxed(std::uint64_t v) : value(v) {}
  std::uint64_t value;
};

// An element for for_each, which may change it: each is visited once, so the
// plain counter is written by one thread only.
struct cell {
  std::size_t index = 0;
  std::uint32_t visits = 0;
};

enum class fan_op { map_in_place, map_boxed, for_each_vector, for_each_list, gather, gather_for };

struct fan_plan {
  std::uint64_t id = 0;
  std::uint64_t salt = 0;
  fan_op op = fan_op::map_in_place;
  std::size_t count = 0;  // elements, or 4 calls for gather
  std::size_t limit = 0;
  std::optional<std::size_t> fault_index;  // the element (call) that throws
  bool fault_repeats = false;              // and every later one
  std::size_t nest_every = 0;  // 0: none; else element i nests when mix(i ^ salt) % nest_every == 0
  std::size_t inner_count = 0;
  std::size_t inner_limit = 0;
  std::optional<std::size_t> inner_fault_index;
  cancel_mode cancel = cancel_mode::none;
  cause_kind cause = cause_kind::plain;
  std::uint64_t cancel_at = 0;
  std::uint64_t cancel_spins = 0;
  std::chrono::microseconds deadline{0};
  std::chrono::microseconds gather_timeout{0};  // gather_for's
  // The pool is shut down: not at all, before the call, by another thread
  // after a random spin, or by the call numbered shutdown_at.
  cancel_mode shutdown = cancel_mode::none;
  std::uint64_t shutdown_at = 0;
  std::uint64_t shutdown_spins = 0;
};

// Calls of one fan-out call's function.
struct fan_record {
  explicit fan_record(std::size_t count) : calls_of(count) {}
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<std::int64_t> most_in_flight{0};
  std::atomic<std::uint64_t> calls{0};
  std::vector<std::atomic<std::uint32_t>> calls_of;
  std::uint64_t calls_at_return = 0;
};

// What every call of one top-level fan-out call (and of the calls nested in
// it) reaches.
struct fan_context {
  const fan_plan& plan;
  canceller& cancel;
  violations& bad;
  std::optional<weft::pool_executor> executor;  // empty: the default executor
  weft::worker_pool* pool;                      // the executor's, for shutdown tests
  std::atomic<std::uint64_t> calls{0};          // of every function, nested ones too
  std::atomic<bool> nested_threw_cause{false};
  std::mutex mutex;
  std::vector<std::uint64_t> thrown;  // under mutex: the faults thrown
};

// Counts a call in `record` while it lasts, and the most at once.
class fan_call_scope {
 public:
  fan_call_scope(fan_record& record, std::size_t i) : record_(record) {
    const auto now = record.in_flight.fetch_add(1) + 1;
    for (auto most = record.most_in_flight.load(); now > most;) {
      if (record.most_in_flight.compare_exchange_weak(most, now)) break;
    }
    record.calls.fetch_add(1);
    record.calls_of[i].fetch_add(1);
  }
  fan_call_scope(const fan_call_scope&) = delete;
  fan_call_scope& operator=(const fan_call_scope&) = delete;
  ~fan_call_scope() { record_.in_flight.fetch_sub(1); }

 private:
  fan_record& record_;
};

std::uint64_t element_value(const fan_plan& plan, std::size_t i, int depth) {
  return mix(i ^ plan.salt ^ (std::uint64_t(depth) << 60));
}

// What holds of a fan-out call's own counts, whatever it did: no element
// computed twice, none running once it is over, and no more at once than
// `most` (0: no bound).
void check_calls(const fan_record& record, std::size_t most, bool complete, const std::string& what,
                 violations& bad) {
  if (record.in_flight.load() != 0) {
    bad.add(what + ": " + std::to_string(record.in_flight.load()) + " calls still running");
  }
  for (std::size_t i = 0; i < record.calls_of.size(); ++i) {
    const auto calls = record.calls_of[i].load();
    if (calls > 1 || (complete && calls != 1)) {
      bad.add(what + ": element " + std::to_string(i) + " computed " + std::to_string(calls) +
              " times");
      return;
    }
  }
  if (most != 0 && record.most_in_flight.load() > static_cast<std::int64_t>(most)) {
    bad.add(what + ": " + std::to_string(record.most_in_flight.load()) +
            " calls at once, with a limit of " + std::to_string(most));
  }
}

std::uint64_t element_call(fan_context& context, fan_record& record, std::size_t i, int depth,
                           const weft::cancel_token& token);

// A parallel_map inside a call, on the same executor, under the caller's
// token: checked as a top-level call is, its exception passed on.
void nested_map(fan_context& context, const weft::cancel_token& token) {
  const fan_plan& plan = context.plan;
  std::vector<std::size_t> indices(plan.inner_count);
  for (std::size_t j = 0; j < indices.size(); ++j) indices[j] = j;
  fan_record record{plan.inner_count};
  const weft::fan_options options{
      .limit = plan.inner_limit, .token = token, .executor = context.executor};
  std::vector<std::uint64_t> results;
  try {
    results = weft::parallel_map(
        indices,
        [&](std::size_t j, const weft::cancel_token& inner) {
          return element_call(context, record, j, 1, inner);
        },
        options);
  } catch (const injected_fault&) {
    check_calls(record, plan.inner_limit, false, "a nested parallel_map that threw", context.bad);
    throw;
  } catch (...) {
    // The token's cause, thrown by the nested call, is then a call's
    // exception to the outer call: it may be the first, ahead of a fault.
    context.nested_threw_cause.store(true);
    check_calls(record, plan.inner_limit, false, "a nested parallel_map that threw", context.bad);
    throw;
  }
  check_calls(record, plan.inner_limit, true, "a nested parallel_map that returned", context.bad);
  for (std::size_t j = 0; j < results.size(); ++j) {
    if (results[j] != element_value(plan, j, 1)) {
      context.bad.add("a nested parallel_map's result " + std::to_string(j) + " is wrong");
      break;
    }
  }
}

// The call for element (or gather call) i at nesting depth `depth`: counted
// while it lasts; throws, or cancels the top-level token, as planned; at
// depth 0, some elements run a nested parallel_map.
std::uint64_t element_call(fan_context& context, fan_record& record, std::size_t i, int depth,
                           const weft::cancel_token& token) {
  const fan_plan& plan = context.plan;
  const fan_call_scope call{record, i};
  const auto overall = context.calls.fetch_add(1);
  if (plan.cancel == cancel_mode::from_inside && overall == plan.cancel_at) {
    context.cancel.cancel_now();
  }
  if (plan.shutdown == cancel_mode::from_inside && overall == plan.shutdown_at) {
    context.pool->shutdown();
  }
  const auto fault_index = depth == 0 ? plan.fault_index : plan.inner_fault_index;
  if (fault_index && (i == *fault_index || (plan.fault_repeats && i > *fault_index))) {
    const std::uint64_t value = mix(plan.id) ^ (std::uint64_t(depth) << 60) ^ (overall << 24) ^ i;
    {
      std::lock_guard lock(context.mutex);
      context.thrown.push_back(value);
    }
    throw injected_fault{value};
  }
  busy_work(mix(i ^ plan.salt ^ std::uint64_t(depth)));
  if (depth == 0 && plan.nest_every != 0 && mix(i ^ plan.salt) % plan.nest_every == 0) {
    nested_map(context, token);
  }
  return element_value(plan, i, depth);
}

fan_plan random_fan_plan(std::mt19937_64& rng, std::uint64_t id, bool gathers, bool on_default,
                         bool faults, bool cancels) {
  fan_plan plan;
  plan.id = id;
  plan.salt = rng();
  if (gathers) {
    plan.op = on_default && rng() % 2 == 0 ? fan_op::gather_for : fan_op::gather;
    plan.count = 4;
  } else {
    switch (rng() % 4) {
      case 0:
        plan.op = fan_op::map_in_place;
        break;
      case 1:
        plan.op = fan_op::map_boxed;
        break;
      case 2:
        plan.op = fan_op::for_each_vector;
        break;
      default:
        plan.op = fan_op::for_each_list;
        break;
    }
    plan.count = rng() % 4 == 0   ? static_cast<std::size_t>(rng() % 4)
                 : rng() % 4 == 0 ? 1 + static_cast<std::size_t>(rng() % (under_tsan ? 500 : 2000))
                                  : 1 + static_cast<std::size_t>(rng() % 64);
  }
  plan.limit = rng() % 3 == 0 ? 0 : 1 + static_cast<std::size_t>(rng() % 6);
  if (faults && rng() % 3 != 0) {
    plan.fault_index = static_cast<std::size_t>(rng() % (plan.count + 1));  // count: none throws
    plan.fault_repeats = rng() % 3 == 0;
  }
  if (plan.count <= 64 && rng() % 2 == 0) {
    plan.nest_every = 1 + static_cast<std::size_t>(rng() % 4);
    plan.inner_count = static_cast<std::size_t>(rng() % 16);
    plan.inner_limit = static_cast<std::size_t>(rng() % 4);
    if (faults && rng() % 4 == 0) {
      plan.inner_fault_index = static_cast<std::size_t>(rng() % (plan.inner_count + 1));
    }
  }
  if (cancels) plan.cancel = random_cancel_mode(rng);
  plan.cause = random_cause_kind(rng);
  plan.cancel_at = rng() % (2 * plan.count + 1);
  plan.cancel_spins = random_spins(rng);
  plan.deadline = random_deadline(rng);
  plan.gather_timeout = rng() % 2 == 0 ? random_deadline(rng) : std::chrono::microseconds{1h};
  return plan;
}

std::string describe(const fan_plan& plan) {
  const char* ops[] = {"parallel_map",
                       "parallel_map (no default constructor)",
                       "for_each (vector)",
                       "for_each (list)",
                       "gather",
                       "gather_for"};
  const char* modes[] = {"none", "before", "other thread", "deadline", "from inside"};
  std::string text = "call " + std::to_string(plan.id) + ": " + ops[static_cast<int>(plan.op)] +
                     " of " + std::to_string(plan.count) + ", limit " + std::to_string(plan.limit);
  if (plan.fault_index) {
    text += ", fault at " + std::to_string(*plan.fault_index) + (plan.fault_repeats ? "+" : "");
  }
  if (plan.nest_every != 0) {
    text += ", nested maps of " + std::to_string(plan.inner_count) + " (limit " +
            std::to_string(plan.inner_limit) + ") every " + std::to_string(plan.nest_every);
    if (plan.inner_fault_index) text += " fault at " + std::to_string(*plan.inner_fault_index);
  }
  text += std::string(", cancel ") + modes[static_cast<int>(plan.cancel)];
  return text;
}

struct fan_tally {
  std::atomic<std::uint64_t> calls{0};
  std::atomic<std::uint64_t> returned{0};
  std::atomic<std::uint64_t> faults{0};
  std::atomic<std::uint64_t> causes{0};
};

using gathered = std::tuple<std::uint64_t, std::monostate, std::string, boxed>;

// Makes the plan's fan-out call once and checks everything that holds after it.
void run_fan(const fan_plan& plan, std::optional<weft::pool_executor> executor,
             weft::worker_pool* pool, std::size_t pool_size, fan_record& record, violations& bad,
             fan_tally& tally) {
  canceller cancel{plan.cancel, plan.cause, mix(plan.id ^ 0xfa9u), plan.cancel_spins,
                   plan.deadline};
  fan_context context{plan, cancel, bad, executor, pool, {}, {}, {}, {}};
  const std::string what = describe(plan);

  std::vector<std::size_t> indices(plan.count);
  std::vector<cell> cells(plan.count);
  for (std::size_t i = 0; i < plan.count; ++i) indices[i] = cells[i].index = i;
  std::list<cell> cell_list(cells.begin(), cells.end());
  std::vector<std::uint64_t> mapped;
  std::vector<boxed> boxes;
  std::optional<gathered> results;
  const weft::fan_options options{
      .limit = plan.limit, .token = cancel.token(), .executor = executor};

  const auto visit = [&](cell& c, const weft::cancel_token& token) {
    (void)element_call(context, record, c.index, 0, token);
    ++c.visits;
  };
  const auto gather_a = [&](const weft::cancel_token& token) {
    return element_call(context, record, 0, 0, token);
  };
  const auto gather_b = [&] { (void)element_call(context, record, 1, 0, weft::cancel_token{}); };
  const auto gather_c = [&](const weft::cancel_token& token) {
    return std::to_string(element_call(context, record, 2, 0, token));
  };
  const auto gather_d = [&] { return boxed{element_call(context, record, 3, 0, {})}; };

  if (plan.shutdown == cancel_mode::before) pool->shutdown();
  const bool shut_down_before = pool != nullptr && pool->is_shutdown();
  std::thread shutter;
  if (plan.shutdown == cancel_mode::other_thread) {
    shutter = std::thread([&] {
      spin_then_yield(plan.shutdown_spins);
      pool->shutdown();
    });
  }
  cancel.start();
  const outcome result = outcome_of([&] {
    switch (plan.op) {
      case fan_op::map_in_place:
        mapped = weft::parallel_map(
            indices,
            [&](std::size_t i, const weft::cancel_token& token) {
              return element_call(context, record, i, 0, token);
            },
            options);
        break;
      case fan_op::map_boxed:
        boxes = weft::parallel_map(
            indices, [&](std::size_t i) { return boxed{element_call(context, record, i, 0, {})}; },
            options);
        break;
      case fan_op::for_each_vector:
        weft::for_each(cells, visit, options);
        break;
      case fan_op::for_each_list:
        weft::for_each(
            cell_list, [&](cell& c) { visit(c, weft::cancel_token{}); }, options);
        break;
      case fan_op::gather:
        if (executor) {
          results.emplace(
              weft::gather(*executor, cancel.token(), gather_a, gather_b, gather_c, gather_d));
        } else {
          results.emplace(weft::gather(cancel.token(), gather_a, gather_b, gather_c, gather_d));
        }
        break;
      case fan_op::gather_for:
        results.emplace(weft::gather_for(plan.gather_timeout, cancel.token(), gather_a, gather_b,
                                         gather_c, gather_d));
        break;
    }
  });
  // Nothing of the call may be running now, or run later.
  record.calls_at_return = record.calls.load();
  const auto in_flight = record.in_flight.load();
  cancel.finish();
  if (shutter.joinable()) shutter.join();
  if (in_flight != 0) {
    bad.add(what + ": " + std::to_string(in_flight) + " calls still running when it " +
            result.describe());
  }
  // An empty range too: the pool is checked before the range.
  if (shut_down_before && (record.calls.load() != 0 || result.kind != outcome::rejected)) {
    bad.add(what + ": on a pool shut down before the call, it made " +
            std::to_string(record.calls.load()) + " calls and " + result.describe());
  }

  std::vector<std::uint64_t> thrown;
  {
    std::lock_guard lock(context.mutex);
    thrown = context.thrown;
  }
  const bool gathering = plan.op == fan_op::gather || plan.op == fan_op::gather_for;
  const bool returned = result.kind == outcome::returned;
  const std::size_t most = gathering ? 0 : plan.limit != 0 ? plan.limit : pool_size + 1;
  check_calls(record, most, returned, what + " that " + result.describe(), bad);
  switch (result.kind) {
    case outcome::returned:
      if (!thrown.empty()) bad.add(what + ": returned although a call threw");
      if (plan.cancel == cancel_mode::before && plan.count != 0) {
        bad.add(what + ": returned under a token cancelled before the call");
      }
      break;
    case outcome::fault:
      if (!contains(thrown, result.value)) {
        bad.add(what + ": threw a fault that no call threw: " + result.what);
      }
      break;
    case outcome::marker:
    case outcome::system_error:
      if (!thrown.empty() && !context.nested_threw_cause.load()) {
        bad.add(what + ": a call threw, but it " + result.describe());
      } else if (!cancel.is_cause(result) &&
                 !(plan.op == fan_op::gather_for && result.kind == outcome::system_error &&
                   result.code == weft::make_error_code(weft::errc::deadline_exceeded))) {
        bad.add(what + ": " + result.describe() + ", which is not the token's cause");
      }
      break;
    case outcome::rejected:
      // Only a shutdown explains it: the call saw the pool shut down, or a
      // nested call did and its exception came through a call.
      if (plan.shutdown == cancel_mode::none) bad.add(what + ": " + result.describe());
      break;
    case outcome::other:
      bad.add(what + ": " + result.describe());
      break;
  }
  if (plan.cancel == cancel_mode::before && record.calls.load() != 0) {
    bad.add(what + ": " + std::to_string(record.calls.load()) +
            " calls under a token cancelled before the call");
  }
  for (const cell& c : cells) {
    if (c.visits > 1 || (returned && plan.op == fan_op::for_each_vector && c.visits != 1)) {
      bad.add(what + ": cell " + std::to_string(c.index) + " visited " + std::to_string(c.visits) +
              " times");
      break;
    }
  }
  for (const cell& c : cell_list) {
    if (c.visits > 1 || (returned && plan.op == fan_op::for_each_list && c.visits != 1)) {
      bad.add(what + ": list cell " + std::to_string(c.index) + " visited " +
              std::to_string(c.visits) + " times");
      break;
    }
  }
  if (returned) {
    bool right = true;
    switch (plan.op) {
      case fan_op::map_in_place:
        right = mapped.size() == plan.count;
        for (std::size_t i = 0; right && i < mapped.size(); ++i) {
          right = mapped[i] == element_value(plan, i, 0);
        }
        break;
      case fan_op::map_boxed:
        right = boxes.size() == plan.count;
        for (std::size_t i = 0; right && i < boxes.size(); ++i) {
          right = boxes[i].value == element_value(plan, i, 0);
        }
        break;
      case fan_op::gather:
      case fan_op::gather_for:
        right = results && std::get<0>(*results) == element_value(plan, 0, 0) &&
                std::get<2>(*results) == std::to_string(element_value(plan, 2, 0)) &&
                std::get<3>(*results).value == element_value(plan, 3, 0);
        break;
      default:
        break;
    }
    if (!right) bad.add(what + ": returned wrong or misplaced results");
  }

  tally.calls.fetch_add(1);
  (returned                        ? tally.returned
   : result.kind == outcome::fault ? tally.faults
                                   : tally.causes)
      .fetch_add(1);
}

// Makes random fan-out calls from `drivers` threads at once, for the run
// budget, on one executor: the default one (pool_workers 0) or a small pool.
void fan_scenario(std::uint64_t seed, int config, bool gathers, std::mt19937_64& setup) {
  const std::size_t pool_workers = config == 0 ? 0 : config == 1 ? 1 : 2 + setup() % 2;
  const std::size_t queue = 1 + setup() % (config == 1 ? 2 : 8);
  const weft::overflow policy = setup() % 3 == 0   ? weft::overflow::block
                                : setup() % 2 == 0 ? weft::overflow::reject
                                                   : weft::overflow::caller_runs;
  const int drivers = 2 + static_cast<int>(setup() % 5);
  CAPTURE(config);
  CAPTURE(pool_workers);
  CAPTURE(queue);
  CAPTURE(static_cast<int>(policy));
  CAPTURE(drivers);
  std::optional<weft::worker_pool> pool;
  std::optional<weft::pool_executor> executor;
  if (pool_workers != 0) {
    pool.emplace(weft::worker_pool_options{
        .workers = pool_workers, .queue_capacity = queue, .on_full = policy, .name = "fan stress"});
    executor = pool->executor();
  }
  const std::size_t pool_size = pool ? pool_workers : weft::default_executor().context().size();

  violations bad;
  fan_tally tally;
  drive<fan_record>(
      drivers, seed + static_cast<std::uint64_t>(config) * 1000u, bad, "fan-out call",
      [&](std::mt19937_64& rng, std::uint64_t id) {
        const auto plan = random_fan_plan(rng, id, gathers, !pool, rng() % 4 != 0, rng() % 2 == 0);
        auto record = std::make_unique<fan_record>(plan.count);
        run_fan(plan, executor, pool ? &*pool : nullptr, pool_size, *record, bad, tally);
        return record;
      });

  CHECK_MESSAGE(bad.count() == 0, bad.count() << " violations; the first: " << bad.first());
  CHECK(tally.calls.load() > 0);
  MESSAGE("executor " << config << " (" << pool_size << " workers), " << drivers
                      << " drivers: " << tally.calls.load() << " calls, " << tally.returned.load()
                      << " returned, " << tally.faults.load() << " threw a fault, "
                      << tally.causes.load() << " threw the token's cause");
}

// Makes fan-out calls from `drivers` threads at once, each on a small pool of
// its own that is shut down during the call (by another thread after a
// random spin, or by one of the calls), or before it.
void shutdown_scenario(std::uint64_t seed, int drivers) {
  violations bad;
  fan_tally tally;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  const auto driver = [&](int index) {
    std::mt19937_64 rng{seed + static_cast<std::uint64_t>(drivers) * 1000u +
                        static_cast<std::uint64_t>(index)};
    for (std::uint64_t round = 0; round < iteration_cap(20'000); ++round) {
      if (std::chrono::steady_clock::now() >= until) break;
      const std::size_t workers = 1 + rng() % 3;
      const weft::overflow policy = rng() % 3 == 0   ? weft::overflow::block
                                    : rng() % 2 == 0 ? weft::overflow::reject
                                                     : weft::overflow::caller_runs;
      weft::worker_pool pool{{.workers = workers,
                              .queue_capacity = 1 + rng() % 8,
                              .on_full = policy,
                              .name = "shutdown stress"}};
      auto plan = random_fan_plan(rng, (static_cast<std::uint64_t>(index) << 32) | round,
                                  rng() % 3 == 0, false, false, false);
      switch (rng() % 4) {
        case 0:
          plan.shutdown = cancel_mode::before;
          break;
        case 1:
          plan.shutdown = cancel_mode::from_inside;
          break;
        default:
          plan.shutdown = cancel_mode::other_thread;
          break;
      }
      // Often many tasks, and an early shutdown, so that it lands while the
      // call is still starting them.
      if (rng() % 2 == 0) plan.limit = 8 + rng() % 64;
      plan.shutdown_at = rng() % 2 == 0 ? rng() % 3 : rng() % (plan.count + 1);
      plan.shutdown_spins = rng() % (under_tsan ? 2'000 : 20'000);
      fan_record record{plan.count};
      run_fan(plan, pool.executor(), &pool, workers, record, bad, tally);
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < drivers; ++i) threads.emplace_back(driver, i);
  for (auto& t : threads) t.join();

  CHECK_MESSAGE(bad.count() == 0, bad.count() << " violations; the first: " << bad.first());
  CHECK(tally.calls.load() > 0);
  MESSAGE(drivers << " drivers: " << tally.calls.load() << " calls, " << tally.returned.load()
                  << " returned, " << tally.causes.load() << " threw weft::rejected");
}

}  // namespace

TEST_CASE(
    "pipeline stress: random shapes deliver every item exactly once, in order where "
    "promised, with stats in range" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  for (const int drivers : {1, 3, 6}) {
    CAPTURE(drivers);
    pipeline_scenario(seed, drivers, false, false);
  }
}

TEST_CASE(
    "pipeline stress: an exception from the source, a stage or the sink at a random item "
    "is what run() throws, and every stage is joined" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed() ^ 0xfa17u;
  INFO("replay with --seed " << weft_test::seed());
  for (const int drivers : {1, 3, 6}) {
    CAPTURE(drivers);
    pipeline_scenario(seed, drivers, true, false);
  }
}

TEST_CASE(
    "pipeline stress: a token cancelled at a random moment stops run() with its cause, "
    "and every stage is joined" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed() ^ 0xca9ce1u;
  INFO("replay with --seed " << weft_test::seed());
  std::mt19937_64 setup{seed};
  for (const int drivers : {1, 3, 6}) {
    CAPTURE(drivers);
    // Faults too, in one run of four: then run() throws a fault, never the cause.
    pipeline_scenario(seed, drivers, setup() % 4 == 0, true);
  }
}

TEST_CASE(
    "fan stress: parallel_map and for_each compute each element once, in order, under "
    "random limits, failures, cancellation and nesting" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  std::mt19937_64 setup{seed ^ 0x3a9u};
  for (int config = 0; config < 3; ++config) fan_scenario(seed, config, false, setup);
}

TEST_CASE(
    "fan stress: gather with nested parallel_map, on the default executor and on small "
    "pools, under random failures and cancellation" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed() ^ 0x9a7e5u;
  INFO("replay with --seed " << weft_test::seed());
  std::mt19937_64 setup{seed};
  for (int config = 0; config < 3; ++config) fan_scenario(seed, config, true, setup);
}

TEST_CASE(
    "fan stress: a pool shut down before or during parallel_map, for_each or gather: the "
    "call completes or throws weft::rejected, and no call outlives it" *
    doctest::timeout(300)) {
  const std::uint64_t seed = weft_test::seed() ^ 0x5407d0u;
  INFO("replay with --seed " << weft_test::seed());
  for (const int drivers : {1, 3, 6}) {
    CAPTURE(drivers);
    shutdown_scenario(seed, drivers);
  }
}
