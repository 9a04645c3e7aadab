// SPDX-License-Identifier: BSL-1.0
// weft::pipeline: a source, stages and a sink connected by bounded
// channels, each stage with its own workers; Go's pipeline of goroutines
// and channels, as one object.
//
//   auto ingest = weft::pipeline(lines)                        // a range, a channel, or a generator
//       .stage(parse, {.workers = 4, .ordered = true, .name = "parse"})
//       .stage(enrich, {.workers = 2, .buffer = 256, .name = "enrich"})
//       .batch(500, 50ms)                                     // std::vector<record> of up to 500
//       .sink(write_batch, {.name = "write"});
//   ingest.run(request_token);            // returns when every item reached the sink, or throws
//   std::cout << ingest.stats() << "bottleneck: " << ingest.bottleneck() << '\n';
//
// Go analogue: the pipelines and bounded parallelism of "Go Concurrency
// Patterns: Pipelines and cancellation". C++ alternatives:
// tbb::parallel_pipeline, hand-written threads and queues.
//
// Semantics:
//  - The source is a range (an rvalue one is moved into the pipeline, an
//    lvalue one must outlive run()), a weft::channel (read until closed and
//    drained), or a generator: a function returning std::optional<T>, called
//    until it returns an empty one.
//  - stage(f, options): `workers` tasks call f(item) (or f(item, token)).
//    f returning std::optional<U> makes a filter (empty: drop the item);
//    expand(f) takes f returning a range and sends each element (one to
//    many). Each stage has a bounded channel of `buffer` items in front of
//    it, so a slow stage makes every stage before it wait: memory never
//    grows. An ordered stage emits its outputs in its inputs' order even
//    with several workers; an unordered one does not pay for that.
//  - batch(n, max_wait) groups items into std::vector batches of at most n,
//    sending a partial batch once its first item has waited max_wait (one
//    past the clock's range, hours::max(), never), and what is left at the
//    end.
//  - sink(f, options) ends the pipeline (ordered only with one worker: a
//    sink has no output to put in order); run(token) runs it once: it returns
//    when the source is exhausted and every item reached the sink. The first
//    exception (from the source, a stage or the sink) cancels the whole
//    pipeline, every stage is joined, and run() rethrows it; a cancelled
//    token stops it the same way and run() throws the token's cause. Items
//    in flight when it stops are dropped.
//  - Every stage runs as tasks of a worker pool run() makes with one worker
//    per task (stages block on their channels, so they must not share
//    workers), named after the pipeline: the task registry lists them, and
//    a stage blocked on its input shows as `channel "<pipeline>/<stage>" recv`.
//
// Stats: stats() per stage (live while it runs): items in and out, busy time
// (spent in f, sampled on one call in 16 and scaled), time blocked waiting
// for input (its input channel's receivers' queued time) and blocked handing
// output on (its output channel's senders' queued time). bottleneck() names
// the stage busiest per worker. The source's busy time is not measured (it
// shows 0): a slow source shows as every stage waiting for input.
//
// Thread safety: building and run() from one thread; stats() and
// bottleneck() from any thread, also while it runs.
//
// Cost: per item and stage, one channel send and one receive (lock-free
// while the channel is neither full nor empty) and, on one call in 16, two
// clock reads. An ordered stage adds a lock around its receive and a wait
// for the item's turn to send.
#pragma once

#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <ranges>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft {

struct stage_options {
  std::size_t workers = 1;
  // Capacity of the channel in front of the stage.
  std::size_t buffer = 64;
  bool ordered = false;
  std::string name{};
};

struct stage_stats {
  std::string name;
  std::size_t workers = 0;
  std::uint64_t items_in = 0;
  std::uint64_t items_out = 0;
  std::chrono::nanoseconds busy{0};
  std::chrono::nanoseconds waiting_for_input{0};
  std::chrono::nanoseconds waiting_to_send{0};
};

struct pipeline_stats {
  std::vector<stage_stats> stages;
  std::chrono::nanoseconds elapsed{0};  // of run(), so far
};

inline std::ostream& operator<<(std::ostream& out, const pipeline_stats& stats) {
  const auto ms = [](std::chrono::nanoseconds d) { return std::chrono::duration<double, std::milli>(d).count(); };
  out << "pipeline: " << ms(stats.elapsed) << " ms\n";
  for (const auto& stage : stats.stages) {
    out << "  " << stage.name << " (" << stage.workers << (stage.workers == 1 ? " worker" : " workers")
        << "): in " << stage.items_in << ", out " << stage.items_out << ", busy " << ms(stage.busy)
        << " ms, waiting for input " << ms(stage.waiting_for_input) << " ms, waiting to send "
        << ms(stage.waiting_to_send) << " ms\n";
  }
  return out;
}

namespace detail {

// How a stage's run went: whether cancellation (rather than the end of its
// input) stopped it, and its sampled busy time.
struct stage_progress {
  std::atomic<bool> interrupted{false};  // stopped by cancellation, not by the end of its input
  std::atomic<std::int64_t> busy_ns{0};
};

// Times one call in `every` of f, and scales: two clock reads on every call
// would cost more than a small stage's work.
class busy_sampler {
 public:
  static constexpr unsigned every = 16;

  template <class F>
  decltype(auto) measure(std::atomic<std::int64_t>& total, F&& f) {
    if (++calls_ % every != 0) return std::forward<F>(f)();
    const auto start = std::chrono::steady_clock::now();
    struct add_on_exit {
      std::atomic<std::int64_t>& total;
      std::chrono::steady_clock::time_point start;
      ~add_on_exit() {
        const auto took = std::chrono::steady_clock::now() - start;
        total.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(took).count() * every,
                        std::memory_order_relaxed);
      }
    } guard{total, start};
    return std::forward<F>(f)();
  }

 private:
  unsigned calls_ = 0;
};

class stage_base {
 public:
  stage_base(std::string name, std::size_t workers) : name_(std::move(name)), workers_(workers) {}
  stage_base(const stage_base&) = delete;
  stage_base& operator=(const stage_base&) = delete;
  virtual ~stage_base() = default;

  // Starts the stage's tasks in `group`.
  virtual void start(task_group& group) = 0;
  virtual stage_stats stats() const = 0;

  const std::string& name() const noexcept { return name_; }
  std::size_t workers() const noexcept { return workers_; }
  bool interrupted() const noexcept { return progress_.interrupted.load(std::memory_order_relaxed); }

 protected:
  // A stage between two channels: what it took from one and sent into the
  // other, and how long it waited on each.
  template <class In, class Out>
  stage_stats between_stats(const basic_channel<In>& input, const basic_channel<Out>& output) const {
    auto s = base_stats();
    // The output first: what a stage has sent, it received before, so the
    // input read after it has counted those items too (the fence orders the
    // reads), and a stage that sends at most one item per item never shows
    // more out than in. Read the other way round, items that passed through
    // between the two reads were counted out and not in.
    const auto out = output.stats();
    std::atomic_thread_fence(std::memory_order_acquire);
    const auto in = input.stats();
    s.items_in = in.received;
    s.items_out = out.sent;
    s.waiting_for_input = in.recv_blocked;
    s.waiting_to_send = out.send_blocked;
    return s;
  }

  stage_stats base_stats() const {
    stage_stats s;
    s.name = name_;
    s.workers = workers_;
    s.busy = std::chrono::nanoseconds{progress_.busy_ns.load(std::memory_order_relaxed)};
    return s;
  }

  std::string name_;
  std::size_t workers_;
  stage_progress progress_;
};

// The channel a stage sends into, set when the next stage is added.
template <class T>
struct stage_output {
  std::shared_ptr<basic_channel<T>> channel;
  std::atomic<std::size_t> running{0};  // the last worker to return closes the channel

  void worker_started() noexcept { running.fetch_add(1, std::memory_order_relaxed); }

  // Held by a worker task while it runs. The last worker to return closes
  // the channel: the next stage's input has ended. A worker that throws
  // leaves it open. Closed, it would tell the next stage that its input had
  // ended before the group has recorded the failure and cancelled the token
  // that stops every stage, and batch() would send its partial batch on.
  class worker_scope {
   public:
    explicit worker_scope(stage_output& output) noexcept : output_(output) {}
    worker_scope(const worker_scope&) = delete;
    worker_scope& operator=(const worker_scope&) = delete;
    ~worker_scope() {
      if (std::uncaught_exceptions() == exceptions_ &&
          output_.running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        output_.channel->close();
      }
    }

   private:
    stage_output& output_;
    const int exceptions_ = std::uncaught_exceptions();
  };
};

template <class T>
class source_stage final : public stage_base {
 public:
  using produce_function = std::function<bool(basic_channel<T>& out, const cancel_token& token)>;

  explicit source_stage(produce_function produce) : stage_base("source", 1), produce_(std::move(produce)) {}

  stage_output<T>& output() noexcept { return output_; }

  void start(task_group& group) override {
    output_.worker_started();
    group.go([this](const cancel_token& token) {
      const typename stage_output<T>::worker_scope running{output_};
      if (!produce_(*output_.channel, token)) progress_.interrupted.store(true, std::memory_order_relaxed);
    });
  }

  stage_stats stats() const override {
    auto s = base_stats();
    const auto out = output_.channel->stats();
    s.items_in = s.items_out = out.sent;
    s.waiting_to_send = out.send_blocked;
    return s;
  }

 private:
  produce_function produce_;
  stage_output<T> output_;
};

// map: f returns the item to send (or std::optional, to filter); expand: f
// returns a range of items to send.
enum class stage_kind { map, expand };

template <class R>
inline constexpr bool is_optional = false;
template <class U>
inline constexpr bool is_optional<std::optional<U>> = true;

template <class In, class Out, class F, stage_kind Kind>
class map_stage final : public stage_base {
 public:
  map_stage(std::shared_ptr<basic_channel<In>> input, F f, const stage_options& options)
      : stage_base(options.name, options.workers), input_(std::move(input)), f_(std::move(f)), ordered_(options.ordered) {}

  stage_output<Out>& output() noexcept { return output_; }

  void start(task_group& group) override {
    for (std::size_t i = 0; i < workers_; ++i) {
      output_.worker_started();
      group.go([this](const cancel_token& token) {
        const typename stage_output<Out>::worker_scope running{output_};
        work(token);
      });
    }
  }

  stage_stats stats() const override { return between_stats(*input_, *output_.channel); }

 private:
  void work(const cancel_token& token) {
    busy_sampler sampler;
    for (;;) {
      std::uint64_t turn = 0;
      auto item = recv_result<In>::failed(wait_status::closed);
      if (ordered_) {
        std::lock_guard lock(read_mutex_);
        item = input_->recv(token);
        if (item) turn = next_turn_++;
      } else {
        item = input_->recv(token);
      }
      if (!item) {
        if (item.status() != wait_status::closed) progress_.interrupted.store(true, std::memory_order_relaxed);
        return;
      }
      bool sent = true;
      if (!ordered_) {
        sent = process(sampler, std::move(*item), token);
      } else {
        // The item's turn comes after every earlier one has been sent (or
        // dropped): pass it on even when f throws, or later items would
        // wait for it forever.
        struct pass_turn {
          map_stage& self;
          std::uint64_t turn;
          ~pass_turn() { self.end_turn(turn); }
        } on_exit{*this, turn};
        auto results = collect(sampler, std::move(*item), token);
        wait_turn(turn, token);
        for (auto& result : results) {
          if (!sent || output_.channel->send(std::move(result), token) != wait_status::ok) sent = false;
        }
      }
      if (!sent) {
        progress_.interrupted.store(true, std::memory_order_relaxed);
        return;
      }
    }
  }

  decltype(auto) call(busy_sampler& sampler, In&& item, const cancel_token& token) {
    return sampler.measure(progress_.busy_ns, [&]() -> decltype(auto) {
      if constexpr (std::is_invocable_v<F&, In&&, const cancel_token&>) {
        return f_(std::move(item), token);
      } else {
        return f_(std::move(item));
      }
    });
  }

  // Unordered: sends each result as soon as it is made.
  bool process(busy_sampler& sampler, In&& item, const cancel_token& token) {
    auto result = call(sampler, std::move(item), token);
    if constexpr (Kind == stage_kind::expand) {
      for (auto&& element : result) {
        if (output_.channel->send(Out(std::move(element)), token) != wait_status::ok) return false;
      }
      return true;
    } else if constexpr (is_optional<decltype(result)>) {
      return !result || output_.channel->send(Out(std::move(*result)), token) == wait_status::ok;
    } else {
      return output_.channel->send(Out(std::move(result)), token) == wait_status::ok;
    }
  }

  // Ordered: the results, to send in the item's turn.
  std::vector<Out> collect(busy_sampler& sampler, In&& item, const cancel_token& token) {
    std::vector<Out> out;
    auto result = call(sampler, std::move(item), token);
    if constexpr (Kind == stage_kind::expand) {
      for (auto&& element : result) out.emplace_back(std::move(element));
    } else if constexpr (is_optional<decltype(result)>) {
      if (result) out.emplace_back(std::move(*result));
    } else {
      out.emplace_back(std::move(result));
    }
    return out;
  }

  void wait_turn(std::uint64_t turn, const cancel_token& token) {
    std::unique_lock lock(turn_mutex_);
    turn_changed_.wait(lock, [&] { return sent_turns_ == turn || token.cancelled(); });
  }

  void end_turn(std::uint64_t turn) {
    {
      std::lock_guard lock(turn_mutex_);
      done_turns_.push_back(turn);
      // Turns may end out of order when the token is cancelled; advance
      // over every contiguous one.
      for (auto found = std::find(done_turns_.begin(), done_turns_.end(), sent_turns_); found != done_turns_.end();
           found = std::find(done_turns_.begin(), done_turns_.end(), sent_turns_)) {
        done_turns_.erase(found);
        ++sent_turns_;
      }
    }
    turn_changed_.notify_all();
  }

  std::shared_ptr<basic_channel<In>> input_;
  F f_;
  const bool ordered_;
  stage_output<Out> output_;
  // Ordered stages only.
  std::mutex read_mutex_;
  std::uint64_t next_turn_ = 0;  // under read_mutex_
  std::mutex turn_mutex_;
  std::condition_variable turn_changed_;
  std::uint64_t sent_turns_ = 0;         // under turn_mutex_
  std::vector<std::uint64_t> done_turns_;  // under turn_mutex_
};

// Wait: the std::chrono::duration batch() was given, kept as it is so that
// with_timeout saturates a long one (hours::max(): no time limit) instead
// of its conversion to nanoseconds overflowing into the past.
template <class T, class Wait>
class batch_stage final : public stage_base {
 public:
  batch_stage(std::shared_ptr<basic_channel<T>> input, std::size_t size, Wait max_wait)
      : stage_base("batch", 1), input_(std::move(input)), size_(size), max_wait_(max_wait) {}

  stage_output<std::vector<T>>& output() noexcept { return output_; }

  void start(task_group& group) override {
    output_.worker_started();
    group.go([this](const cancel_token& token) {
      const typename stage_output<std::vector<T>>::worker_scope running{output_};
      if (!work(token)) progress_.interrupted.store(true, std::memory_order_relaxed);
    });
  }

  stage_stats stats() const override { return between_stats(*input_, *output_.channel); }

 private:
  // Room made up front for a batch: a size meant as "no limit but time"
  // must not allocate that much before the first item.
  static constexpr std::size_t most_reserved = 1024;

  // False when cancelled.
  bool work(const cancel_token& token) {
    const std::size_t reserved = std::min(size_, most_reserved);
    std::vector<T> batch;
    std::optional<cancel_source> flush_at;  // the first item's deadline
    const auto flush = [&] {
      if (batch.empty()) return true;
      flush_at.reset();
      auto full = std::exchange(batch, {});
      batch.reserve(reserved);
      return output_.channel->send(std::move(full), token) == wait_status::ok;
    };
    batch.reserve(reserved);
    for (;;) {
      auto item = input_->recv(flush_at ? flush_at->token() : token);
      if (item) {
        if (batch.empty()) flush_at.emplace(with_timeout(token, max_wait_));
        batch.push_back(std::move(*item));
        if (batch.size() == size_ && !flush()) return false;
        continue;
      }
      if (token.cancelled()) return false;
      if (item.status() == wait_status::closed) return flush();
      if (!flush()) return false;  // the batch's deadline passed
    }
  }

  std::shared_ptr<basic_channel<T>> input_;
  const std::size_t size_;
  const Wait max_wait_;
  stage_output<std::vector<T>> output_;
};

template <class T, class F>
class sink_stage final : public stage_base {
 public:
  sink_stage(std::shared_ptr<basic_channel<T>> input, F f, const stage_options& options)
      : stage_base(options.name, options.workers), input_(std::move(input)), f_(std::move(f)) {}

  void start(task_group& group) override {
    for (std::size_t i = 0; i < workers_; ++i) {
      group.go([this](const cancel_token& token) {
        busy_sampler sampler;
        for (;;) {
          auto item = input_->recv(token);
          if (!item) {
            if (item.status() != wait_status::closed) progress_.interrupted.store(true, std::memory_order_relaxed);
            return;
          }
          sampler.measure(progress_.busy_ns, [&] {
            if constexpr (std::is_invocable_v<F&, T&&, const cancel_token&>) {
              f_(std::move(*item), token);
            } else {
              f_(std::move(*item));
            }
          });
          consumed_.fetch_add(1, std::memory_order_release);  // see between_stats
        }
      });
    }
  }

  stage_stats stats() const override {
    auto s = base_stats();
    s.items_out = consumed_.load(std::memory_order_relaxed);  // first, as in between_stats
    std::atomic_thread_fence(std::memory_order_acquire);
    const auto in = input_->stats();
    s.items_in = in.received;
    s.waiting_for_input = in.recv_blocked;
    return s;
  }

 private:
  std::shared_ptr<basic_channel<T>> input_;
  F f_;
  std::atomic<std::uint64_t> consumed_{0};
};

template <class T>
inline constexpr bool is_channel = false;
template <class T, class Clock>
inline constexpr bool is_channel<basic_channel<T, Clock>> = true;

template <class T>
struct generator_value {};
template <class U>
struct generator_value<std::optional<U>> {
  using type = U;
};

}  // namespace detail

// A pipeline with its sink: ready to run once.
class runnable_pipeline {
 public:
  runnable_pipeline(runnable_pipeline&&) noexcept = default;
  runnable_pipeline& operator=(runnable_pipeline&&) noexcept = default;

  // Runs every stage until the source is exhausted and every item reached
  // the sink; throws the first exception, or the token's cause when it was
  // cancelled first. A pipeline runs once: a second run() throws
  // std::logic_error.
  void run(const cancel_token& token = {}) {
    check_not_moved_from("run");
    if (state_->ran.exchange(true)) {
      throw std::logic_error("weft::pipeline \"" + state_->name + "\": run() was already called; a pipeline runs once");
    }
    std::size_t tasks = 0;
    for (const auto& stage : state_->stages) {
      // A sum that wrapped would size the pool below the stages' workers,
      // which all wait on each other: a hang instead of an error.
      if (stage->workers() > std::numeric_limits<std::size_t>::max() - tasks) {
        throw std::invalid_argument(
            "weft::pipeline \"" + state_->name +
            "\": the stages' workers add up to more than a std::size_t holds");
      }
      tasks += stage->workers();
    }
    worker_pool pool{{.workers = tasks, .queue_capacity = tasks, .name = state_->name}};
    state_->started_ns.store(now_ns(), std::memory_order_relaxed);
    const auto record_end = [&] { state_->finished_ns.store(now_ns(), std::memory_order_relaxed); };
    task_group group{pool.executor(), token};
    try {
      for (auto& stage : state_->stages) stage->start(group);
      group.wait();
    } catch (...) {
      record_end();
      throw;
    }
    record_end();
    const bool interrupted = std::any_of(state_->stages.begin(), state_->stages.end(),
                                         [](const auto& stage) { return stage->interrupted(); });
    if (interrupted) group.token().cause().rethrow();
  }

  pipeline_stats stats() const {
    check_not_moved_from("stats");
    pipeline_stats s;
    for (const auto& stage : state_->stages) s.stages.push_back(stage->stats());
    const auto started = state_->started_ns.load(std::memory_order_relaxed);
    if (started != 0) {
      const auto finished = state_->finished_ns.load(std::memory_order_relaxed);
      s.elapsed = std::chrono::nanoseconds{(finished != 0 ? finished : now_ns()) - started};
    }
    return s;
  }

  // The stage busiest per worker: the one that limits throughput.
  std::string bottleneck() const {
    const auto s = stats();
    const stage_stats* busiest = nullptr;
    double most = -1;
    for (const auto& stage : s.stages) {
      const double per_worker = static_cast<double>(stage.busy.count()) / static_cast<double>(stage.workers);
      if (per_worker > most) {
        most = per_worker;
        busiest = &stage;
      }
    }
    return busiest != nullptr ? busiest->name : std::string{};
  }

 private:
  template <class>
  friend class pipeline;

  struct shared_state {
    std::string name;
    std::vector<std::unique_ptr<detail::stage_base>> stages;
    std::atomic<bool> ran{false};
    std::atomic<std::int64_t> started_ns{0};
    std::atomic<std::int64_t> finished_ns{0};
  };

  explicit runnable_pipeline(std::unique_ptr<shared_state> state) : state_(std::move(state)) {}

  void check_not_moved_from(const char* what) const {
    if (!state_) {
      throw std::logic_error(std::string("weft::runnable_pipeline::") + what + ": this pipeline was moved from");
    }
  }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  std::unique_ptr<shared_state> state_;
};

// A pipeline being built; T is the type of the items its last stage sends.
template <class T>
class pipeline {
 public:
  // From a range: each element, in order (moved out of a range moved in).
  template <std::ranges::input_range Range>
    requires(!detail::is_channel<std::remove_cvref_t<Range>> &&
             std::is_convertible_v<std::conditional_t<std::is_lvalue_reference_v<Range>,
                                                      std::ranges::range_reference_t<Range>,
                                                      std::ranges::range_rvalue_reference_t<Range>>,
                                   T>)
  explicit pipeline(Range&& range, std::string name = "pipeline") : pipeline(std::move(name), 0) {
    if constexpr (std::is_lvalue_reference_v<Range>) {
      add_source([source = &range](basic_channel<T>& out, const cancel_token& token) {
        return send_all<forwarded_elements>(*source, out, token);
      });
    } else {
      add_source([source = std::make_shared<std::remove_cvref_t<Range>>(std::move(range))](
                     basic_channel<T>& out, const cancel_token& token) {
        return send_all<moved_elements>(*source, out, token);
      });
    }
  }

  // From a channel (of any clock, and of items convertible to T): each
  // value until it is closed and drained.
  template <class U, class Clock>
    requires std::is_convertible_v<U, T>
  explicit pipeline(basic_channel<U, Clock>& channel, std::string name = "pipeline") : pipeline(std::move(name), 0) {
    add_source([&channel](basic_channel<T>& out, const cancel_token& token) {
      for (;;) {
        auto value = channel.recv(token);
        if (!value) return value.status() == wait_status::closed;
        if (out.send(T(std::move(*value)), token) != wait_status::ok) return false;
      }
    });
  }

  // From a generator: calls it until it returns an empty optional.
  template <class Generator>
    requires std::is_same_v<std::invoke_result_t<Generator&>, std::optional<T>>
  explicit pipeline(Generator generator, std::string name = "pipeline") : pipeline(std::move(name), 0) {
    add_source([generator = std::make_shared<Generator>(std::move(generator))](basic_channel<T>& out,
                                                                                const cancel_token& token) {
      while (auto value = (*generator)()) {
        if (out.send(std::move(*value), token) != wait_status::ok) return false;
      }
      return true;
    });
  }

  pipeline(pipeline&&) noexcept = default;
  pipeline& operator=(pipeline&&) noexcept = default;

  // f(T) -> U, or -> std::optional<U> to filter; f may take a cancel_token
  // after the item.
  template <class F>
  auto stage(F f, stage_options options = {}) && {
    check_not_consumed("stage");
    using result = typename decltype(stage_result<F>())::type;
    static_assert(!std::is_void_v<result>, "weft::pipeline::stage: f returns nothing; end the pipeline with sink(f)");
    using out = typename output_of<result>::type;
    return std::move(*this).template add_stage<out, detail::stage_kind::map>(std::move(f), std::move(options));
  }

  // One to many: f(T) returns a range; each of its elements is sent on.
  template <class F>
  auto expand(F f, stage_options options = {}) && {
    check_not_consumed("expand");
    using result = typename decltype(stage_result<F>())::type;
    static_assert(std::ranges::input_range<result>, "weft::pipeline::expand: f must return a range");
    using out = std::ranges::range_value_t<result>;
    return std::move(*this).template add_stage<out, detail::stage_kind::expand>(std::move(f), std::move(options));
  }

  // Batches of at most `size` items; a partial batch goes once its first item
  // has waited `max_wait`.
  template <class Rep, class Period>
  pipeline<std::vector<T>> batch(std::size_t size, std::chrono::duration<Rep, Period> max_wait,
                                 std::size_t buffer = 64) && {
    if (size == 0) throw std::invalid_argument("weft::pipeline::batch: size must be at least 1");
    check_not_consumed("batch");
    auto input = connect(buffer, "batch");
    auto stage = std::make_unique<detail::batch_stage<T, std::chrono::duration<Rep, Period>>>(std::move(input), size,
                                                                                              max_wait);
    auto* output = &stage->output();
    state_->stages.push_back(std::move(stage));
    return pipeline<std::vector<T>>{std::move(state_), output};
  }

  // Ends the pipeline: `workers` tasks call f(item) (or f(item, token)).
  template <class F>
  runnable_pipeline sink(F f, stage_options options = {}) && {
    static_assert(std::is_invocable_v<F&, T&&> || std::is_invocable_v<F&, T&&, const cancel_token&>,
                  "weft::pipeline::sink: f must be callable with the item (and optionally a cancel_token)");
    check_not_consumed("sink");
    check(options, "sink");
    if (options.ordered && options.workers > 1) {
      throw std::invalid_argument(
          "weft::pipeline::sink: ordered needs a single worker (a sink's workers cannot keep their calls in input "
          "order)");
    }
    if (options.name.empty()) options.name = "sink";
    auto input = connect(options.buffer, options.name);
    state_->stages.push_back(std::make_unique<detail::sink_stage<T, F>>(std::move(input), std::move(f), options));
    return runnable_pipeline{std::move(state_)};
  }

 private:
  template <class>
  friend class pipeline;

  using shared_state = runnable_pipeline::shared_state;

  pipeline(std::string name, int) : state_(std::make_unique<shared_state>()) { state_->name = std::move(name); }
  pipeline(std::unique_ptr<shared_state> state, detail::stage_output<T>* tail) noexcept
      : state_(std::move(state)), tail_(tail) {}

  // A range the pipeline owns gives up its elements; one it only refers to
  // gives what its iterators give (copies of lvalues).
  static constexpr bool moved_elements = true;
  static constexpr bool forwarded_elements = false;

  template <bool Move, class Range>
  static bool send_all(Range& range, basic_channel<T>& out, const cancel_token& token) {
    for (auto&& element : range) {
      if constexpr (Move) {
        if (out.send(T(std::move(element)), token) != wait_status::ok) return false;
      } else {
        if (out.send(T(std::forward<decltype(element)>(element)), token) != wait_status::ok) return false;
      }
    }
    return true;
  }

  template <class Produce>
  void add_source(Produce produce) {
    auto source = std::make_unique<detail::source_stage<T>>(std::move(produce));
    tail_ = &source->output();
    state_->stages.push_back(std::move(source));
  }

  // The type f returns for an item, as std::type_identity.
  template <class F>
  static auto stage_result() {
    if constexpr (std::is_invocable_v<F&, T&&, const cancel_token&>) {
      return std::type_identity<std::remove_cvref_t<std::invoke_result_t<F&, T&&, const cancel_token&>>>{};
    } else {
      static_assert(std::is_invocable_v<F&, T&&>,
                    "weft::pipeline: a stage must be callable with the item (and optionally a cancel_token)");
      return std::type_identity<std::remove_cvref_t<std::invoke_result_t<F&, T&&>>>{};
    }
  }

  template <class R>
  struct output_of {
    using type = R;
  };
  template <class U>
  struct output_of<std::optional<U>> {
    using type = U;
  };

  // stage(), expand(), batch() and sink() move the pipeline on into the
  // object they return.
  void check_not_consumed(const char* what) const {
    if (!state_) {
      throw std::logic_error(std::string("weft::pipeline::") + what +
                             ": this pipeline was moved from (stage(), expand(), batch() and sink() move it on into "
                             "the pipeline they return)");
    }
  }

  static void check(const stage_options& options, const char* what) {
    if (options.workers == 0) {
      throw std::invalid_argument(std::string("weft::pipeline::") + what + ": workers must be at least 1");
    }
  }

  // The channel in front of the next stage, as the current last stage's output.
  std::shared_ptr<basic_channel<T>> connect(std::size_t buffer, const std::string& stage_name) {
    auto channel = std::make_shared<basic_channel<T>>(buffer, state_->name + "/" + stage_name);
    tail_->channel = channel;
    return channel;
  }

  template <class Out, detail::stage_kind Kind, class F>
  pipeline<Out> add_stage(F f, stage_options options) && {
    check(options, "stage");
    if (options.name.empty()) options.name = "stage " + std::to_string(state_->stages.size());
    auto input = connect(options.buffer, options.name);
    auto stage = std::make_unique<detail::map_stage<T, Out, F, Kind>>(std::move(input), std::move(f), options);
    auto* output = &stage->output();
    state_->stages.push_back(std::move(stage));
    return pipeline<Out>{std::move(state_), output};
  }

  std::unique_ptr<shared_state> state_;
  detail::stage_output<T>* tail_ = nullptr;
};

template <std::ranges::input_range Range>
pipeline(Range&&) -> pipeline<std::ranges::range_value_t<Range>>;
template <std::ranges::input_range Range>
pipeline(Range&&, std::string) -> pipeline<std::ranges::range_value_t<Range>>;
template <class T, class Clock>
pipeline(basic_channel<T, Clock>&) -> pipeline<T>;
template <class T, class Clock>
pipeline(basic_channel<T, Clock>&, std::string) -> pipeline<T>;
template <class Generator>
  requires(!std::ranges::input_range<Generator>)
pipeline(Generator) -> pipeline<typename detail::generator_value<std::invoke_result_t<Generator&>>::type>;
template <class Generator>
  requires(!std::ranges::input_range<Generator>)
pipeline(Generator, std::string) -> pipeline<typename detail::generator_value<std::invoke_result_t<Generator&>>::type>;

}  // namespace weft
