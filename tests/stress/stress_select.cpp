// SPDX-License-Identifier: BSL-1.0
// Hunting stress for weft::channel and weft::select (channel.hpp, select.hpp,
// detail/wait_queue.hpp, detail/bounded_ring.hpp), beyond what
// stress_channel.cpp covers (there: one-sided selects, no close until the end).
//
//  1. A mesh of four channels (a rendezvous, a ring of one, two random ones)
//     and many threads whose selects mix send and receive cases, on
//     overlapping channels, duplicated cases and both sides of one channel,
//     in all four forms (unbounded, token, deadline, try_), next to plain
//     operations. Per-thread quotas of sends and receives balance, and the
//     unbounded forms are chosen so that the run cannot deadlock unless a
//     wake-up is lost: a stall trips an internal watchdog that names each
//     thread's operation and aborts. Checked: every value a send reported as
//     sent is received exactly once, on the channel the sender reported;
//     nothing else is received; a select runs exactly one handler, the one it
//     reports, moves only the value of a send case it reports, and a
//     cancelled, timed-out or empty try_ select moves nothing and runs
//     nothing. Between rounds, at rest: no waiter left in any queue, stats'
//     counts equal the transfers made, size() is 0, and a try_send/try_recv
//     probe goes through (the "someone waits" marks did not stick).
//  2. close() racing blocked senders, receivers and selects (both sides of
//     one channel too), with a second concurrent close(), on rendezvous and
//     buffered channels: exactly one close() returns true; a send that
//     begins once the channel reads closed (or close() returned) fails with
//     its value intact; a receive that begins after another saw the end of
//     the stream gets nothing; a rendezvous receive that begins after
//     close() returned, or after closed() read true, takes no blocked
//     sender's value ("blocked and later sends fail"); every successful send
//     is received exactly once (receivers, then a final drain), every failed
//     one never; every waiter wakes (unbounded waits end only by close()).
//  3. A cancel token (chaos_sources) cancelled while a matching try_send,
//     try_recv or try_select completes the same parked waiter (plain recv or
//     send, or a select over one or two channels, both sides of a rendezvous
//     channel, or a deadline instead of a token): every value ends up in
//     exactly one place (received, buffered, or still with its owner), a
//     cancelled operation moved and received nothing, and at most one case
//     completed.
//  Throughout, a reader checks stats() and size() as the header promises:
//  size <= capacity (0 for a rendezvous, whose sent == received), received
//  <= sent, counts and blocked times never go back, closed stays closed,
//  waiter counts stay within the number of nodes that exist.
//
// Every random choice comes from weft_test::seed(); replay with
//   ./weft_stress --seed N --test-case="*select stress*"
// (the interleaving is the scheduler's, so a replay repeats the choices, not
// necessarily the failure). Deadlines are real steady_clock deadlines of at
// most a few hundred microseconds: timing out is part of the scenario, and no
// assertion depends on how long anything took.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/select.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"
#include "watchdog.hpp"

using namespace std::chrono_literals;
using weft::wait_status;

namespace {

using weft_test::chaos_sources;
using weft_test::iteration_cap;
using weft_test::run_budget;
using weft_test::thread_counts;
using weft_test::under_sanitizer;
using weft_test::under_tsan;

// ---------------------------------------------------------------------------
// A value whose moves show: moving leaves `none` behind, so a send that moved
// its value (or did not) can be told from the value alone. Live objects are
// counted, so a value the channels leak or destroy twice shows too.

std::atomic<long> g_live_items{0};

struct tracked_item {
  static constexpr std::int64_t none = -1;
  std::int64_t id = none;

  tracked_item() noexcept { g_live_items.fetch_add(1, std::memory_order_relaxed); }
  explicit tracked_item(std::int64_t value) noexcept : id(value) {
    g_live_items.fetch_add(1, std::memory_order_relaxed);
  }
  tracked_item(tracked_item&& other) noexcept : id(other.id) {
    other.id = none;
    g_live_items.fetch_add(1, std::memory_order_relaxed);
  }
  tracked_item& operator=(tracked_item&& other) noexcept {
    if (this != &other) {
      id = other.id;
      other.id = none;
    }
    return *this;
  }
  tracked_item(const tracked_item&) = delete;
  tracked_item& operator=(const tracked_item&) = delete;
  ~tracked_item() { g_live_items.fetch_sub(1, std::memory_order_relaxed); }
};

using chan = weft::channel<tracked_item>;

const char* name_of(wait_status status) {
  switch (status) {
    case wait_status::ok:
      return "ok";
    case wait_status::cancelled:
      return "cancelled";
    case wait_status::timeout:
      return "timeout";
    case wait_status::closed:
      return "closed";
  }
  return "?";
}

// What went wrong, from any thread; a test checks the count once and prints
// the first few.
class findings {
 public:
  void add(std::string what) {
    count_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(mutex_);
    if (first_.size() < 10) first_.push_back(std::move(what));
  }
  std::uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  std::string summary() const {
    std::lock_guard lock(mutex_);
    std::string text;
    for (const auto& line : first_) text += "\n  " + line;
    return text;
  }

 private:
  std::atomic<std::uint64_t> count_{0};
  mutable std::mutex mutex_;
  std::vector<std::string> first_;
};

void print_channel(const char* label, const chan& ch) {
  // size() and closed() first: they take no lock, stats() may.
  std::fprintf(stderr, "  %s: capacity %zu, size %zu, closed %d\n", label, ch.capacity(), ch.size(),
               static_cast<int>(ch.closed()));
  std::fflush(stderr);
  const auto s = ch.stats();
  std::fprintf(stderr, "    sent %llu, received %llu, waiting senders %zu, waiting receivers %zu\n",
               static_cast<unsigned long long>(s.sent), static_cast<unsigned long long>(s.received),
               s.waiting_senders, s.waiting_receivers);
}

// ---------------------------------------------------------------------------
// Checks stats() and size() snapshots against what channel.hpp promises, and
// against the previous snapshot this reader took of the same channel.

class stats_checker {
 public:
  stats_checker(std::size_t channels, std::size_t max_waiters)
      : previous_(channels), max_waiters_(max_waiters) {}

  void look(const chan& ch, std::size_t index, findings& out) {
    const std::size_t size_now = ch.size();
    const auto s = ch.stats();
    auto& prev = previous_[index];
    const auto problem = [&](const char* what) {
      out.add(std::string("stats of channel ") + std::to_string(index) + " (capacity " +
              std::to_string(s.capacity) + "): " + what + "; sent " + std::to_string(s.sent) +
              " received " + std::to_string(s.received) + " size " + std::to_string(s.size) +
              " size() " + std::to_string(size_now) + " waiting " +
              std::to_string(s.waiting_senders) + "/" + std::to_string(s.waiting_receivers) +
              "; before: sent " + std::to_string(prev.sent) + " received " +
              std::to_string(prev.received));
    };
    if (s.capacity != ch.capacity()) problem("capacity differs from capacity()");
    if (size_now > ch.capacity()) problem("size() above the capacity");
    if (s.size > s.capacity) problem("stats().size above the capacity");
    if (s.capacity == 0 && (s.size != 0 || size_now != 0))
      problem("a rendezvous channel reports a buffered value");
    if (s.capacity == 0 && s.sent != s.received)
      problem("a rendezvous channel's sent and received differ");
    if (s.received > s.sent) problem("more received than sent");
    if (s.sent < prev.sent || s.received < prev.received) problem("a count went back");
    if (prev.closed && !s.closed) problem("closed went back to open");
    if (s.waiting_senders > max_waiters_ || s.waiting_receivers > max_waiters_) {
      problem("more waiters than there are waiting nodes");
    }
    if (s.send_blocked.count() < 0 || s.recv_blocked.count() < 0 ||
        s.send_blocked < prev.send_blocked || s.recv_blocked < prev.recv_blocked) {
      problem("a blocked time is negative or went back");
    }
    prev = s;
  }

 private:
  std::vector<weft::channel_stats> previous_;
  std::size_t max_waiters_;
};

// What one select's handlers did.
struct select_probe {
  int fired = -1;
  int fires = 0;
  std::optional<tracked_item> got;
  void fire(int index) noexcept {
    fired = index;
    ++fires;
  }
};

// One case of a select, as the checks after it need it.
struct case_info {
  bool send = false;
  int channel = 0;
  tracked_item* value = nullptr;         // send cases: the caller's value
  std::int64_t id = tracked_item::none;  // its id before the select
};

enum class form { unbounded, token, deadline, poll };

const char* name_of(form f) {
  switch (f) {
    case form::unbounded:
      return "unbounded";
    case form::token:
      return "token";
    case form::deadline:
      return "deadline";
    case form::poll:
      return "try_select";
  }
  return "?";
}

// ===========================================================================
// Scenario 1: the mesh.

constexpr int mesh_channels = 4;

struct mesh_round_state {
  std::vector<std::atomic<int>> sent_on;   // channel a value's send reported, or -1
  std::vector<std::atomic<int>> received;  // how many times it was received
  std::vector<std::atomic<int>> received_on;
  // Plain memory the maker of a value writes before sending it and its
  // receiver reads: a send must happen-before the receive (TSan checks).
  std::vector<std::int64_t> payload;
  explicit mesh_round_state(std::size_t ids)
      : sent_on(ids), received(ids), received_on(ids), payload(ids) {
    reset();
  }
  void reset() {
    for (std::size_t i = 0; i < sent_on.size(); ++i) {
      payload[i] = 0;
      sent_on[i].store(-1, std::memory_order_relaxed);
      received[i].store(0, std::memory_order_relaxed);
      received_on[i].store(-1, std::memory_order_relaxed);
    }
  }
};

// Splits `total` among `n` quotas of at most `cap` each, unevenly, with some
// zeros.
std::vector<int> split(int total, int n, int cap, std::mt19937_64& rng) {
  std::vector<int> quotas(static_cast<std::size_t>(n), total / n);
  quotas[0] += total - (total / n) * n;
  for (int move = 0; move < 3 * n; ++move) {
    auto& from = quotas[rng() % quotas.size()];
    auto& to = quotas[rng() % quotas.size()];
    if (&from == &to || from == 0) continue;
    int amount =
        rng() % 3 == 0 ? from : static_cast<int>(rng() % static_cast<std::uint64_t>(from + 1));
    amount = std::min(amount, cap - to);
    from -= amount;
    to += amount;
  }
  return quotas;
}

void run_mesh(int threads) {
  const std::uint64_t seed = weft_test::seed();
  std::mt19937_64 setup{seed ^ (0x5e1ec7ULL * static_cast<std::uint64_t>(threads))};
  const auto n = static_cast<std::size_t>(threads);

  // Channel 0 a rendezvous, 1 a ring of one; 2 and 3 random.
  const std::size_t caps[mesh_channels] = {0, 1, std::array<std::size_t, 3>{0, 2, 3}[setup() % 3],
                                           std::array<std::size_t, 3>{0, 1, 4}[setup() % 3]};
  std::vector<std::unique_ptr<chan>> channels;
  std::vector<int> buffered;
  for (int c = 0; c < mesh_channels; ++c) {
    channels.push_back(std::make_unique<chan>(caps[c], "mesh"));
    if (caps[c] != 0) buffered.push_back(c);
  }
  CAPTURE(threads);
  CAPTURE(caps[2]);
  CAPTURE(caps[3]);

  const int per_thread = under_tsan        ? 12
                         : under_sanitizer ? 24
                                           : 48;  // sends and receives per thread per round
  const int quota_cap = 3 * per_thread;
  const auto stride = static_cast<std::size_t>(quota_cap + 4);  // ids a thread may make in a round
  mesh_round_state round_state(n * stride);
  std::vector<int> send_quota(n);
  std::vector<int> recv_quota(n);
  std::array<std::atomic<std::uint64_t>, mesh_channels> total_sent{};
  std::array<std::atomic<std::uint64_t>, mesh_channels> total_received{};

  findings found;
  chaos_sources chaos{8};
  std::atomic<bool> finished{false};
  std::atomic<bool> stop_helpers{false};
  weft_test::round_barrier start(n + 1);
  weft_test::round_barrier end(n + 1);
  std::atomic<std::uint64_t> select_count{0};

  weft_test::watchdog dog("stress_select", "select stress: mesh", n + 1, [&] {
    for (int c = 0; c < mesh_channels; ++c)
      print_channel("mesh channel", *channels[static_cast<std::size_t>(c)]);
  });

  std::thread chaos_thread([&] {
    std::mt19937_64 rng{seed + 17};
    while (!stop_helpers.load(std::memory_order_relaxed)) {
      chaos.cancel_and_replace(rng(), rng() % 4 == 0);
      std::this_thread::yield();
    }
  });
  std::thread reader([&] {
    stats_checker checker(mesh_channels, 6 * n + 2);
    while (!stop_helpers.load(std::memory_order_relaxed)) {
      for (std::size_t c = 0; c < mesh_channels; ++c) checker.look(*channels[c], c, found);
      std::this_thread::yield();
    }
  });

  const auto worker = [&](std::size_t t) {
    std::mt19937_64 rng{seed + 1000 * static_cast<std::uint64_t>(threads) + t};
    const auto base = static_cast<std::int64_t>(t * stride);
    std::int64_t next = 0;
    const auto fresh = [&] {
      if (static_cast<std::size_t>(next) >= stride) {
        found.add("test bug: a thread ran out of ids");
        return tracked_item{base};
      }
      const std::int64_t id = base + next++;
      round_state.payload[static_cast<std::size_t>(id)] = 7 * id + 1;
      return tracked_item{id};
    };
    const auto any_channel = [&] { return static_cast<int>(rng() % mesh_channels); };
    const auto buffered_channel = [&] { return buffered[rng() % buffered.size()]; };
    const auto micros = [&] { return std::chrono::microseconds(rng() % 300); };

    for (;;) {
      start.arrive_and_wait();
      if (finished.load()) break;
      int sends = send_quota[t];
      int recvs = recv_quota[t];
      next = 0;  // ids restart each round
      std::array<tracked_item, 2> pending;
      for (auto& value : pending) value = fresh();

      const auto record_sent = [&](const tracked_item& value_before, int c) {
        const auto index = static_cast<std::size_t>(value_before.id);
        if (round_state.sent_on[index].exchange(c) != -1)
          found.add("a value was reported sent twice");
        total_sent[static_cast<std::size_t>(c)].fetch_add(1, std::memory_order_relaxed);
        --sends;
      };
      const auto record_received = [&](const tracked_item& value, int c) {
        if (value.id < 0 || static_cast<std::size_t>(value.id) >= round_state.received.size()) {
          found.add("received a value nobody made: id " + std::to_string(value.id));
          return;
        }
        const auto index = static_cast<std::size_t>(value.id);
        if (round_state.payload[index] != 7 * value.id + 1)
          found.add("a received value's payload was not visible");
        round_state.received[index].fetch_add(1);
        round_state.received_on[index].store(c);
        total_received[static_cast<std::size_t>(c)].fetch_add(1, std::memory_order_relaxed);
        --recvs;
      };

      const auto recv_case = [&](select_probe& probe, int k, int c) {
        return weft::on_recv(*channels[static_cast<std::size_t>(c)],
                             [&probe, k](std::optional<tracked_item> value) {
                               probe.fire(k);
                               probe.got = std::move(value);
                             });
      };
      const auto send_case = [&](select_probe& probe, int k, int c, tracked_item& value) {
        return weft::on_send(*channels[static_cast<std::size_t>(c)], value,
                             [&probe, k] { probe.fire(k); });
      };
      const auto run = [&](form f, auto&&... cases) -> weft::select_result {
        switch (f) {
          case form::unbounded:
            return weft::select(std::forward<decltype(cases)>(cases)...);
          case form::token:
            return weft::select(chaos.token(rng()), std::forward<decltype(cases)>(cases)...);
          case form::deadline:
            return weft::select_for(micros(), std::forward<decltype(cases)>(cases)...);
          case form::poll:
            return weft::try_select(std::forward<decltype(cases)>(cases)...);
        }
        return {};
      };
      // The checks after a select: exactly one handler, the reported one;
      // only the reported send case's value moved; a value for a receive.
      const auto settle = [&](const weft::select_result& result, select_probe& probe,
                              const case_info* infos, int count, form f) {
        select_count.fetch_add(1, std::memory_order_relaxed);
        if (result.index == weft::select_result::none) {
          const bool expected = (f == form::poll && result.status == wait_status::ok) ||
                                (f == form::token && result.status == wait_status::cancelled) ||
                                (f == form::deadline && result.status == wait_status::timeout);
          if (!expected) {
            found.add(std::string("a ") + name_of(f) + " select completed no case with status " +
                      name_of(result.status));
          }
          if (probe.fires != 0)
            found.add(std::string("a ") + name_of(f) +
                      " select that completed no case ran a handler");
          for (int k = 0; k < count; ++k) {
            if (infos[k].send && infos[k].value->id != infos[k].id) {
              found.add(std::string("a ") + name_of(f) +
                        " select that completed no case moved a send case's value");
            }
          }
          return;
        }
        if (result.index >= static_cast<std::size_t>(count)) {
          found.add("a select reported a case it does not have");
          return;
        }
        if (result.status != wait_status::ok) {
          found.add(std::string("a select case ended ") + name_of(result.status) +
                    " on an open channel");
        }
        if (probe.fires != 1 || probe.fired != static_cast<int>(result.index)) {
          found.add("a select ran " + std::to_string(probe.fires) +
                    " handlers, the last for case " + std::to_string(probe.fired) +
                    ", and reported case " + std::to_string(result.index));
        }
        for (int k = 0; k < count; ++k) {
          const auto& info = infos[k];
          if (k == static_cast<int>(result.index)) {
            if (info.send) {
              if (info.value->id != tracked_item::none) {
                found.add("a select reported a send case taken but its value was not moved");
              } else {
                record_sent(tracked_item{info.id}, info.channel);
              }
            } else if (!probe.got) {
              found.add("a receive case completed without a value on an open channel");
            } else {
              record_received(*probe.got, info.channel);
            }
          } else if (info.send && info.value->id != info.id) {
            found.add("a send case that did not complete moved its value");
          }
        }
      };
      const auto refill = [&] {
        for (auto& value : pending) {
          if (value.id == tracked_item::none && sends > 0) value = fresh();
        }
      };
      const auto bounded_form = [&] {
        return std::array<form, 3>{form::token, form::deadline, form::poll}[rng() % 3];
      };
      const auto any_form = [&] {
        return std::array<form, 5>{form::unbounded, form::unbounded, form::token, form::deadline,
                                   form::poll}[rng() % 5];
      };

      for (std::uint64_t step = 0; (sends > 0 || recvs > 0) && step < iteration_cap(1'000'000);
           ++step) {
        refill();
        select_probe probe;
        const unsigned roll = static_cast<unsigned>(rng() % 10);
        if (roll < 5) {
          // The shapes that may wait without a bound (see the top comment:
          // with these, every parked party can be matched).
          const form f = any_form();
          if (recvs > 0 && sends == 0) {
            if (rng() % 2 == 0) {
              dog.note(t, "select: receive on all four channels");
              const case_info infos[4] = {{false, 0}, {false, 1}, {false, 2}, {false, 3}};
              const auto result = run(f, recv_case(probe, 0, 0), recv_case(probe, 1, 1),
                                      recv_case(probe, 2, 2), recv_case(probe, 3, 3));
              settle(result, probe, infos, 4, f);
            } else {
              dog.note(t, "select: receive on all four channels, one twice");
              const int dup = any_channel();
              const case_info infos[5] = {
                  {false, 0}, {false, 1}, {false, 2}, {false, 3}, {false, dup}};
              const auto result =
                  run(f, recv_case(probe, 0, 0), recv_case(probe, 1, 1), recv_case(probe, 2, 2),
                      recv_case(probe, 3, 3), recv_case(probe, 4, dup));
              settle(result, probe, infos, 5, f);
            }
          } else if (recvs > 0) {
            const int b = buffered_channel();
            if (sends >= 2 && rng() % 2 == 0) {
              dog.note(t, "select: receive on all four, send on a ring and on any channel");
              const int other = any_channel();
              const case_info infos[6] = {{false, 0},
                                          {false, 1},
                                          {false, 2},
                                          {false, 3},
                                          {true, b, &pending[0], pending[0].id},
                                          {true, other, &pending[1], pending[1].id}};
              const auto result =
                  run(f, recv_case(probe, 0, 0), recv_case(probe, 1, 1), recv_case(probe, 2, 2),
                      recv_case(probe, 3, 3), send_case(probe, 4, b, pending[0]),
                      send_case(probe, 5, other, pending[1]));
              settle(result, probe, infos, 6, f);
            } else {
              dog.note(t, "select: receive on all four, send on a ring");
              const case_info infos[5] = {{false, 0},
                                          {false, 1},
                                          {false, 2},
                                          {false, 3},
                                          {true, b, &pending[0], pending[0].id}};
              const auto result =
                  run(f, send_case(probe, 0, b, pending[0]), recv_case(probe, 1, 0),
                      recv_case(probe, 2, 1), recv_case(probe, 3, 2), recv_case(probe, 4, 3));
              // (argument order differs from infos' on purpose: remap)
              const case_info ordered[5] = {infos[4], infos[0], infos[1], infos[2], infos[3]};
              settle(result, probe, ordered, 5, f);
            }
          } else {
            // Sends only.
            const int a = any_channel();
            if (sends >= 2 && rng() % 2 == 0) {
              dog.note(t, "select: send on two channels");
              const int b = any_channel();
              const case_info infos[2] = {{true, a, &pending[0], pending[0].id},
                                          {true, b, &pending[1], pending[1].id}};
              const auto result =
                  run(f, send_case(probe, 0, a, pending[0]), send_case(probe, 1, b, pending[1]));
              settle(result, probe, infos, 2, f);
            } else if (rng() % 2 == 0) {
              dog.note(t, "select: send on one channel");
              const case_info infos[1] = {{true, a, &pending[0], pending[0].id}};
              const auto result = run(f, send_case(probe, 0, a, pending[0]));
              settle(result, probe, infos, 1, f);
            } else {
              dog.note(t, "plain send, unbounded");
              const std::int64_t id = pending[0].id;
              const auto status =
                  channels[static_cast<std::size_t>(a)]->send(std::move(pending[0]));
              if (status != wait_status::ok || pending[0].id != tracked_item::none) {
                found.add(std::string("an unbounded send on an open channel ended ") +
                          name_of(status) +
                          (pending[0].id == id ? " (value kept)" : " (value moved)"));
              } else {
                record_sent(tracked_item{id}, a);
              }
            }
          }
        } else if (roll < 8) {
          // Bounded selects of random shapes: any channels, duplicates, and
          // both sides of one channel.
          const form f = bounded_form();
          const int a = any_channel();
          const int b = rng() % 3 == 0 ? a : any_channel();
          const unsigned shape = static_cast<unsigned>(rng() % 4);
          if (shape == 0 && recvs > 0) {
            dog.note(t, "bounded select: receive, receive");
            const case_info infos[2] = {{false, a}, {false, b}};
            settle(run(f, recv_case(probe, 0, a), recv_case(probe, 1, b)), probe, infos, 2, f);
          } else if (shape == 1 && recvs > 0 && sends > 0) {
            dog.note(t, "bounded select: send, receive");
            const case_info infos[2] = {{true, a, &pending[0], pending[0].id}, {false, b}};
            settle(run(f, send_case(probe, 0, a, pending[0]), recv_case(probe, 1, b)), probe, infos,
                   2, f);
          } else if (shape == 2 && sends >= 2) {
            dog.note(t, "bounded select: send, send");
            const case_info infos[2] = {{true, a, &pending[0], pending[0].id},
                                        {true, b, &pending[1], pending[1].id}};
            settle(run(f, send_case(probe, 0, a, pending[0]), send_case(probe, 1, b, pending[1])),
                   probe, infos, 2, f);
          } else if (recvs > 0 && sends > 0) {
            dog.note(t, "bounded select: receive, send, receive");
            const int c = any_channel();
            const case_info infos[3] = {
                {false, a}, {true, b, &pending[0], pending[0].id}, {false, c}};
            settle(run(f, recv_case(probe, 0, a), send_case(probe, 1, b, pending[0]),
                       recv_case(probe, 2, c)),
                   probe, infos, 3, f);
          }
        } else {
          // Plain operations, all bounded.
          const int c = any_channel();
          auto& ch = *channels[static_cast<std::size_t>(c)];
          const unsigned which = static_cast<unsigned>(rng() % 3);
          if (recvs > 0 && (sends == 0 || rng() % 2 == 0)) {
            if (which == 0) {
              dog.note(t, "recv with a token");
              auto result = ch.recv(chaos.token(rng()));
              if (result) {
                record_received(*result, c);
              } else if (result.status() != wait_status::cancelled) {
                found.add(std::string("recv(token) on an open channel ended ") +
                          name_of(result.status()));
              }
            } else if (which == 1) {
              dog.note(t, "recv_for");
              auto result = ch.recv_for(micros());
              if (result) {
                record_received(*result, c);
              } else if (result.status() != wait_status::timeout) {
                found.add(std::string("recv_for on an open channel ended ") +
                          name_of(result.status()));
              }
            } else {
              dog.note(t, "try_recv");
              if (auto value = ch.try_recv()) record_received(*value, c);
            }
          } else if (sends > 0) {
            const std::int64_t id = pending[0].id;
            wait_status status = wait_status::ok;
            if (which == 0) {
              dog.note(t, "send with a token");
              status = ch.send(std::move(pending[0]), chaos.token(rng()));
            } else if (which == 1) {
              dog.note(t, "send_for");
              status = ch.send_for(std::move(pending[0]), micros());
            } else {
              dog.note(t, "try_send");
              status = ch.try_send(std::move(pending[0])) ? wait_status::ok : wait_status::timeout;
            }
            const bool moved = pending[0].id == tracked_item::none;
            if (status == wait_status::ok && moved) {
              record_sent(tracked_item{id}, c);
            } else if (status == wait_status::ok || moved || status == wait_status::closed) {
              found.add(std::string("a bounded send ended ") + name_of(status) + " and " +
                        (moved ? "moved" : "kept") + " its value");
            }
          }
        }
      }
      if (sends != 0 || recvs != 0) found.add("a thread hit its iteration cap with quota left");
      dog.note(t, "at the end-of-round barrier");
      end.arrive_and_wait();
    }
    dog.note(t, "finished");
  };

  std::vector<std::thread> workers;
  for (std::size_t t = 0; t < n; ++t) workers.emplace_back(worker, t);

  const auto until = std::chrono::steady_clock::now() + run_budget() / 2;
  std::uint64_t rounds = 0;
  std::uint64_t probes = 0;
  for (;;) {
    const int total = threads * per_thread;
    auto sends = split(total, threads, quota_cap, setup);
    auto recvs = split(total, threads, quota_cap, setup);
    for (std::size_t t = 0; t < n; ++t) {
      send_quota[t] = sends[t];
      recv_quota[t] = recvs[t];
    }
    round_state.reset();
    dog.note(n, "coordinator: round running");
    start.arrive_and_wait();
    end.arrive_and_wait();
    ++rounds;
    dog.note(n, "coordinator: checking a round");

    // At rest: every value sent was received once, on its channel.
    std::size_t lost = 0;
    std::size_t doubled = 0;
    std::size_t invented = 0;
    std::size_t misrouted = 0;
    for (std::size_t id = 0; id < round_state.sent_on.size(); ++id) {
      const int on = round_state.sent_on[id].load();
      const int times = round_state.received[id].load();
      if (on >= 0) {
        lost += times == 0;
        doubled += times > 1;
        misrouted += times == 1 && round_state.received_on[id].load() != on;
      } else {
        invented += times != 0;
      }
    }
    CAPTURE(rounds);
    CHECK(lost == 0);
    CHECK(doubled == 0);
    CHECK(invented == 0);
    CHECK(misrouted == 0);
    for (std::size_t c = 0; c < mesh_channels; ++c) {
      auto& ch = *channels[c];
      CAPTURE(c);
      const auto s = ch.stats();
      CHECK(s.waiting_senders == 0);
      CHECK(s.waiting_receivers == 0);
      CHECK(s.size == 0);
      CHECK(ch.size() == 0);
      CHECK_FALSE(s.closed);
      CHECK(s.sent == total_sent[c].load());
      CHECK(s.received == total_received[c].load());
      // The "someone waits" marks must follow the (now empty) queues: a
      // ring with room takes a try_send, and gives it back to a try_recv.
      tracked_item probe{-100 - static_cast<std::int64_t>(c)};
      const bool taken = ch.try_send(std::move(probe));
      if (ch.capacity() == 0) {
        CHECK_FALSE(taken);
        CHECK(probe.id == -100 - static_cast<std::int64_t>(c));
        CHECK_FALSE(ch.try_recv().has_value());
      } else {
        CHECK(taken);
        auto back = ch.try_recv();
        CHECK((back.has_value() && back->id == -100 - static_cast<std::int64_t>(c)));
        if (taken) total_sent[c].fetch_add(1);
        if (back) total_received[c].fetch_add(1);
        ++probes;
      }
    }
    if (std::chrono::steady_clock::now() >= until || rounds >= iteration_cap(400))
      finished.store(true);
    if (finished.load()) {
      start.arrive_and_wait();
      break;
    }
  }
  for (auto& w : workers) w.join();
  stop_helpers.store(true);
  chaos_thread.join();
  reader.join();
  INFO("first findings:" << found.summary());
  CHECK(found.count() == 0);
  MESSAGE("mesh, ", threads, " threads, capacities 0/1/", caps[2], "/", caps[3], ": ", rounds,
          " rounds, ", select_count.load(), " selects, sent per channel ", total_sent[0].load(),
          "/", total_sent[1].load(), "/", total_sent[2].load(), "/", total_sent[3].load());
}

// ===========================================================================
// Scenario 2: close() racing blocked senders, receivers and selects.

struct close_round_result {
  std::uint64_t sent = 0;
  std::uint64_t refused = 0;
  std::uint64_t received = 0;
  std::uint64_t drained = 0;
};

close_round_result run_close_round(int threads, std::size_t capacity, std::uint64_t round_seed,
                                   findings& found, findings& window) {
  std::mt19937_64 setup{round_seed};
  chan main_ch{capacity, "closing"};
  chan idle{0, "idle"};  // nobody sends on it: its receive cases never complete
  const auto n = static_cast<std::size_t>(threads);
  const std::size_t stride = 2048;  // ids per thread; a sender that runs out stops sending
  std::vector<std::atomic<int>> sent(n * stride);
  std::vector<std::atomic<int>> received(n * stride);
  for (std::size_t i = 0; i < sent.size(); ++i) {
    sent[i].store(0, std::memory_order_relaxed);
    received[i].store(0, std::memory_order_relaxed);
  }
  std::atomic<std::uint64_t> transfers{0};
  std::atomic<std::uint64_t> attempts{0};
  std::atomic<bool> close_returned{false};  // the close() that returned true has returned
  std::atomic<bool> end_seen{false};        // a receive has reported the end of the stream
  std::atomic<int> close_trues{0};
  std::atomic<int> threads_done{0};
  std::atomic<std::uint64_t> received_count{0};
  std::atomic<std::uint64_t> refused_count{0};
  chaos_sources chaos{4};
  weft_test::round_barrier go(n + 2);

  weft_test::watchdog dog("stress_select", "select stress: close racing blocked waiters", n + 2,
                          [&] {
                            print_channel("closing channel", main_ch);
                            print_channel("idle channel", idle);
                          });

  const auto record_received = [&](const tracked_item& value, const char* how, bool ended_before,
                                   bool close_done_before, bool looked_closed_before) {
    if (value.id < 0 || static_cast<std::size_t>(value.id) >= received.size()) {
      found.add(std::string(how) + " received a value nobody made");
      return;
    }
    received[static_cast<std::size_t>(value.id)].fetch_add(1);
    received_count.fetch_add(1, std::memory_order_relaxed);
    if (ended_before) {
      found.add(std::string(how) +
                " began after another receive saw the end of the stream, and got a value");
    }
    if (capacity == 0 && close_done_before) {
      found.add(std::string(how) +
                " on a rendezvous channel began after close() returned, and took a value");
    } else if (capacity == 0 && looked_closed_before) {
      window.add(std::string(how) +
                 " on a rendezvous channel began after closed() read true, and took a blocked "
                 "sender's value");
    }
  };

  // Chooses a role per thread: 0 sender, 1 receiver, 2 both in one select.
  std::vector<int> roles(n);
  for (auto& role : roles) role = static_cast<int>(setup() % 5 == 0 ? 2 : setup() % 2);

  const auto worker = [&](std::size_t t) {
    std::mt19937_64 rng{round_seed * 31 + t + 1};
    const auto base = static_cast<std::int64_t>(t * stride);
    std::int64_t next = 0;
    const auto fresh = [&] {
      if (static_cast<std::size_t>(next) + 1 >= stride) return tracked_item{base + next};
      return tracked_item{base + next++};
    };
    const auto exhausted = [&] { return static_cast<std::size_t>(next) + 4 >= stride; };
    const auto micros = [&] { return std::chrono::microseconds(rng() % 200); };
    const int role = roles[t];
    std::array<tracked_item, 2> pending{fresh(), fresh()};
    bool send_done = role == 1;
    bool recv_done = role == 0;
    go.arrive_and_wait();

    // The checks of a send's outcome; true when the thread saw `closed`.
    const auto after_send = [&](wait_status status, tracked_item& value, std::int64_t id,
                                bool close_done_before, bool looked_closed_before,
                                const char* how) {
      const bool moved = value.id == tracked_item::none;
      if (status == wait_status::ok) {
        if (!moved) found.add(std::string(how) + " reported ok and kept its value");
        if (close_done_before)
          found.add(std::string(how) + " began after close() returned, and succeeded");
        if (looked_closed_before)
          found.add(std::string(how) + " began after closed() read true, and succeeded");
        sent[static_cast<std::size_t>(id)].store(1);
        transfers.fetch_add(1, std::memory_order_relaxed);
        value = fresh();
        return false;
      }
      if (moved)
        found.add(std::string(how) + " failed (" + name_of(status) + ") and moved its value");
      refused_count.fetch_add(1, std::memory_order_relaxed);
      return status == wait_status::closed;
    };

    for (std::uint64_t step = 0; !(send_done && recv_done) && step < iteration_cap(200'000);
         ++step) {
      if (role != 1 && exhausted()) {
        // Out of ids: stop sending, and wait for the close like a blocked
        // sender would.
        weft_test::spin_until([&] { return close_returned.load(); });
        send_done = recv_done = true;
        break;
      }
      attempts.fetch_add(1, std::memory_order_relaxed);
      const bool ended_before = end_seen.load();
      const bool close_done_before = close_returned.load();
      const bool looked_closed_before = main_ch.closed();
      if (role == 2) {
        // Both sides of the closing channel in one select.
        select_probe probe;
        const std::int64_t id = pending[0].id;
        const unsigned which = static_cast<unsigned>(rng() % 3);
        dog.note(t, which == 0   ? "select: send and receive on the closing channel, unbounded"
                    : which == 1 ? "select: send and receive on the closing channel, token"
                                 : "try_select: send and receive on the closing channel");
        auto send = weft::on_send(main_ch, pending[0], [&probe] { probe.fire(0); });
        auto recv = weft::on_recv(main_ch, [&probe](std::optional<tracked_item> value) {
          probe.fire(1);
          probe.got = std::move(value);
        });
        const auto result = which == 0 ? weft::select(std::move(send), std::move(recv))
                            : which == 1
                                ? weft::select(chaos.token(rng()), std::move(send), std::move(recv))
                                : weft::try_select(std::move(send), std::move(recv));
        if (result.index == 0) {
          if (probe.fires != (result.status == wait_status::ok ? 1 : 0)) {
            found.add("a send case ran its handler on a failed send, or not on a good one");
          }
          if (after_send(result.status, pending[0], id, close_done_before, looked_closed_before,
                         "a select send case")) {
            send_done = true;
          }
        } else if (result.index == 1) {
          if (probe.fires != 1 || probe.fired != 1)
            found.add("a receive case ran the wrong handlers");
          if (pending[0].id != id) found.add("a select that received moved its send case's value");
          if (probe.got) {
            record_received(*probe.got, "a select receive case", ended_before, close_done_before,
                            looked_closed_before);
          } else if (result.status == wait_status::closed) {
            end_seen.store(true);
            recv_done = true;
          } else {
            found.add("a receive case completed with no value and no end of stream");
          }
        } else {
          if (probe.fires != 0 || pending[0].id != id)
            found.add("a select that completed no case had an effect");
        }
        if (send_done || recv_done) {
          send_done = recv_done = true;
        }
        continue;
      }
      if (role == 0) {
        const std::int64_t id = pending[0].id;
        wait_status status = wait_status::ok;
        const unsigned which = static_cast<unsigned>(rng() % 7);
        const char* how = "a send";
        switch (which) {
          case 0:
            dog.note(t, how = "send, unbounded");
            status = main_ch.send(std::move(pending[0]));
            break;
          case 1:
            dog.note(t, how = "send with a token");
            status = main_ch.send(std::move(pending[0]), chaos.token(rng()));
            break;
          case 2:
            dog.note(t, how = "send_for");
            status = main_ch.send_for(std::move(pending[0]), micros());
            break;
          case 3:
            dog.note(t, how = "try_send");
            status = main_ch.try_send(std::move(pending[0])) ? wait_status::ok
                     : main_ch.closed()                      ? wait_status::closed
                                                             : wait_status::timeout;
            break;
          case 4: {
            dog.note(
                t, how = "select: send on the closing channel, receive on the idle one, unbounded");
            select_probe probe;
            const auto result = weft::select(
                weft::on_send(main_ch, pending[0], [&probe] { probe.fire(0); }),
                weft::on_recv(idle, [&probe](std::optional<tracked_item>) { probe.fire(1); }));
            if (result.index != 0) found.add("an idle channel's receive case completed");
            if (probe.fires != (result.status == wait_status::ok ? 1 : 0)) {
              found.add("a send case's handler ran on failure, or not on success");
            }
            status = result.status;
            break;
          }
          case 5: {
            const bool with_token = rng() % 2 == 0;
            dog.note(t, how = with_token ? "select with a token: two values to the closing channel"
                                         : "select_for: two values to the closing channel");
            select_probe probe;
            const std::int64_t id1 = pending[1].id;
            auto first = weft::on_send(main_ch, pending[0], [&probe] { probe.fire(0); });
            auto second = weft::on_send(main_ch, pending[1], [&probe] { probe.fire(1); });
            const auto result =
                with_token ? weft::select(chaos.token(rng()), std::move(first), std::move(second))
                           : weft::select_for(micros(), std::move(first), std::move(second));
            if (result.index == 1) {
              // The second value went (or was refused): check it, and the
              // first stays with the thread.
              if (pending[0].id != id)
                found.add("a send case that did not complete moved its value");
              if (after_send(result.status, pending[1], id1, close_done_before,
                             looked_closed_before, "a select send case")) {
                send_done = true;
              }
              continue;
            }
            if (result.index == weft::select_result::none) {
              if (pending[1].id != id1 || pending[0].id != id || probe.fires != 0) {
                found.add("a cancelled select had an effect");
              }
              status = result.status;
            } else {
              if (pending[1].id != id1)
                found.add("a send case that did not complete moved its value");
              status = result.status;
            }
            break;
          }
          default: {
            dog.note(t, how = "try_select: send on the closing channel, receive on the idle one");
            select_probe probe;
            const auto result = weft::try_select(
                weft::on_send(main_ch, pending[0], [&probe] { probe.fire(0); }),
                weft::on_recv(idle, [&probe](std::optional<tracked_item>) { probe.fire(1); }));
            if (result.index == 1) found.add("an idle channel's receive case completed");
            status =
                result.index == weft::select_result::none ? wait_status::timeout : result.status;
          }
        }
        if (after_send(status, pending[0], id, close_done_before, looked_closed_before, how))
          send_done = true;
        continue;
      }
      // role 1: receive.
      const unsigned which = static_cast<unsigned>(rng() % 7);
      std::optional<tracked_item> got;
      bool ended = false;
      const char* how = "a receive";
      switch (which) {
        case 0: {
          dog.note(t, how = "recv, unbounded");
          got = main_ch.recv();
          ended = !got;
          break;
        }
        case 1: {
          dog.note(t, how = "recv with a token");
          auto result = main_ch.recv(chaos.token(rng()));
          ended = result.status() == wait_status::closed;
          got = std::move(result).value();
          break;
        }
        case 2: {
          dog.note(t, how = "recv_for");
          auto result = main_ch.recv_for(micros());
          ended = result.status() == wait_status::closed;
          got = std::move(result).value();
          break;
        }
        case 3: {
          dog.note(t, how = "try_recv");
          got = main_ch.try_recv();
          break;
        }
        case 4: {
          dog.note(t, how = "select: receive on the closing and the idle channel, unbounded");
          select_probe probe;
          const auto result = weft::select(
              weft::on_recv(main_ch,
                            [&probe](std::optional<tracked_item> value) {
                              probe.fire(0);
                              probe.got = std::move(value);
                            }),
              weft::on_recv(idle, [&probe](std::optional<tracked_item>) { probe.fire(1); }));
          if (result.index != 0 || probe.fires != 1)
            found.add("select over closing and idle: wrong case or handlers");
          ended = result.status == wait_status::closed;
          if (ended == probe.got.has_value())
            found.add("a receive case's status and value disagree");
          got = std::move(probe.got);
          break;
        }
        case 5: {
          const bool with_token = rng() % 2 == 0;
          dog.note(t, how = with_token ? "select with a token: receive twice on the closing channel"
                                       : "select_for: receive twice on the closing channel");
          select_probe probe;
          const auto handler = [&probe](int k) {
            return [&probe, k](std::optional<tracked_item> value) {
              probe.fire(k);
              probe.got = std::move(value);
            };
          };
          const auto result =
              with_token ? weft::select(chaos.token(rng()), weft::on_recv(main_ch, handler(0)),
                                        weft::on_recv(main_ch, handler(1)))
                         : weft::select_for(micros(), weft::on_recv(main_ch, handler(0)),
                                            weft::on_recv(main_ch, handler(1)));
          if (result.index == weft::select_result::none) {
            if (probe.fires != 0 ||
                result.status != (with_token ? wait_status::cancelled : wait_status::timeout)) {
              found.add("a select that gave up had an effect, or the wrong status");
            }
          } else {
            if (probe.fires != 1 || probe.fired != static_cast<int>(result.index)) {
              found.add("a select ran the wrong handlers");
            }
            ended = result.status == wait_status::closed;
            if (ended == probe.got.has_value())
              found.add("a receive case's status and value disagree");
            got = std::move(probe.got);
          }
          break;
        }
        default: {
          dog.note(t, how = "try_select: receive on the closing and the idle channel");
          select_probe probe;
          const auto result = weft::try_select(
              weft::on_recv(main_ch,
                            [&probe](std::optional<tracked_item> value) {
                              probe.fire(0);
                              probe.got = std::move(value);
                            }),
              weft::on_recv(idle, [&probe](std::optional<tracked_item>) { probe.fire(1); }));
          if (result.index == 1) found.add("an idle channel's receive case completed");
          if (result.index == 0) {
            ended = result.status == wait_status::closed;
            got = std::move(probe.got);
          } else if (probe.fires != 0) {
            found.add("a try_select that completed no case ran a handler");
          }
        }
      }
      if (got) {
        record_received(*got, how, ended_before, close_done_before, looked_closed_before);
      } else if (ended) {
        end_seen.store(true);
        recv_done = true;
      } else if (which == 3 && main_ch.closed()) {
        // try_recv found nothing on a closed channel (it may pass over
        // values while another receiver is queued): a recv, which must not
        // wait, takes what is left or confirms the end.
        const bool ended_again = end_seen.load();
        const bool close_done_again = close_returned.load();
        if (auto last = main_ch.recv()) {
          record_received(*last, "recv after an empty try_recv", ended_again, close_done_again,
                          true);
        } else {
          end_seen.store(true);
          recv_done = true;
        }
      }
    }
    // A thread that saw the end tries once more: a closed channel refuses a
    // send and keeps the value, and reports the end again.
    if (role != 1) {
      const std::int64_t id = pending[0].id;
      if (main_ch.try_send(std::move(pending[0])) || pending[0].id != id) {
        found.add("try_send after the channel reported closed succeeded or moved its value");
      }
      if (main_ch.send(std::move(pending[0])) != wait_status::closed || pending[0].id != id) {
        found.add("send after the channel reported closed did not fail with closed, value kept");
      }
    }
    if (role != 0 && end_seen.load()) {
      if (main_ch.try_recv()) found.add("try_recv after the end of the stream got a value");
    }
    if (!(send_done && recv_done))
      found.add("a thread hit its iteration cap before the channel closed");
    threads_done.fetch_add(1);
    dog.note(t, "finished");
  };

  const unsigned mode = static_cast<unsigned>(setup() % 4);
  const std::uint64_t target = setup() % 48;
  const bool second_closer = setup() % 3 == 0;
  std::atomic<bool> closing{false};
  const auto closer = [&](std::size_t who, bool primary) {
    stats_checker checker(1, 2 * n + 2);
    go.arrive_and_wait();
    if (primary) {
      // Wait (bounded) for the moment chosen: at once, after some
      // transfers, with waiters parked, or after some attempts.
      dog.note(who, "closer: waiting for its moment");
      const auto give_up = std::chrono::steady_clock::now() + 20ms;
      for (std::uint64_t spin = 0; spin < 20'000; ++spin) {
        if (mode == 0) break;
        if (threads_done.load() == threads) break;
        if (mode == 1 && transfers.load() >= target) break;
        if (mode == 3 && attempts.load() >= target) break;
        if (mode == 2) {
          const auto s = main_ch.stats();
          if (s.waiting_senders + s.waiting_receivers >= std::max<std::size_t>(1, target % n))
            break;
        }
        if ((spin & 31) == 0) {
          checker.look(main_ch, 0, found);
          if (std::chrono::steady_clock::now() >= give_up) break;
        }
        std::this_thread::yield();
      }
      closing.store(true);
    } else {
      weft_test::spin_until([&] { return closing.load(); });
    }
    dog.note(who, "closer: close()");
    const bool first = main_ch.close();
    if (first) {
      close_returned.store(true);
      close_trues.fetch_add(1);
    }
    checker.look(main_ch, 0, found);
    if (!main_ch.closed()) found.add("closed() is false after close() returned");
    dog.note(who, "closer: done");
  };

  std::vector<std::thread> all;
  for (std::size_t t = 0; t < n; ++t) all.emplace_back(worker, t);
  all.emplace_back(closer, n, true);
  all.emplace_back([&] {
    if (second_closer) {
      closer(n + 1, false);
    } else {
      go.arrive_and_wait();
      weft_test::spin_until([&] { return close_returned.load(); });
      if (main_ch.close()) found.add("a second close() returned true");
    }
  });
  for (auto& thread : all) thread.join();

  close_round_result result;
  if (close_trues.load() != 1)
    found.add("close() returned true " + std::to_string(close_trues.load()) + " times");
  // Values already in the channel are still received; then nothing.
  const bool ended = end_seen.load();
  while (auto value = main_ch.try_recv()) {
    ++result.drained;
    if (ended)
      found.add("a value remained in the channel after a receive saw the end of the stream");
    record_received(*value, "the final drain", false, false, false);
  }
  if (main_ch.recv().has_value()) found.add("recv on a closed, drained channel got a value");
  for (std::size_t id = 0; id < sent.size(); ++id) {
    const int times = received[id].load();
    if (sent[id].load() == 1) {
      if (times != 1)
        found.add("a value sent before the close was received " + std::to_string(times) + " times");
      ++result.sent;
    } else if (times != 0) {
      found.add("a value whose send failed was received");
    }
  }
  const auto s = main_ch.stats();
  const auto si = idle.stats();
  if (!s.closed || s.waiting_senders != 0 || s.waiting_receivers != 0 ||
      si.waiting_receivers != 0 || si.waiting_senders != 0) {
    found.add("after the close: waiters left (" + std::to_string(s.waiting_senders) + " senders, " +
              std::to_string(s.waiting_receivers) + " receivers, idle " +
              std::to_string(si.waiting_receivers) + ") or not closed");
  }
  if (s.size != 0 || s.sent != result.sent || s.received != received_count.load()) {
    found.add("after the close: stats say sent " + std::to_string(s.sent) + " received " +
              std::to_string(s.received) + " size " + std::to_string(s.size) + ", the threads " +
              std::to_string(result.sent) + " / " + std::to_string(received_count.load()));
  }
  if (main_ch.close()) found.add("close() on a closed channel returned true");
  result.refused = refused_count.load();
  result.received = received_count.load();
  return result;
}

// ===========================================================================
// Scenario 3: a cancel racing a matching operation on one parked waiter.

enum class race_kind {
  recv,               // W: recv(token) on A;            M: try_send on A
  send,               // W: send(v, token) on A;         M: try_recv on A
  select_recv_recv,   // W: select(token, recv A, recv B); M: try_send A and B
  select_send_recv,   // W: select(token, send A, recv B); M: try_recv A, try_send B
  select_send_send,   // W: select(token, send A, send B); M: try_recv A and B
  select_both_sides,  // W: select(token, send A, recv A), A a rendezvous; M: one of try_recv,
                      // try_send
  deadline,           // W: select_for(send A, recv B) or recv_for; M: as above; no cancel
  count
};

const char* name_of(race_kind kind) {
  switch (kind) {
    case race_kind::recv:
      return "recv(token) against try_send";
    case race_kind::send:
      return "send(token) against try_recv";
    case race_kind::select_recv_recv:
      return "select(token, recv, recv) against try_send, try_send";
    case race_kind::select_send_recv:
      return "select(token, send, recv) against try_recv, try_send";
    case race_kind::select_send_send:
      return "select(token, send, send) against try_recv, try_recv";
    case race_kind::select_both_sides:
      return "select(token, send and recv on one rendezvous) against a try_";
    case race_kind::deadline:
      return "select_for / recv_for against try_ forms";
    case race_kind::count:
      break;
  }
  return "?";
}

struct race_round {
  race_kind kind = race_kind::recv;
  std::unique_ptr<chan> a;
  std::unique_ptr<chan> b;
  std::uint64_t token_index = 0;
  weft::cancel_token token;  // taken from chaos before the round starts
  bool wait_for_park = true;
  bool matcher_first = false;    // matcher's two operations, in which order
  bool both_sides_send = false;  // select_both_sides: the matcher receives (else sends)
  std::chrono::microseconds deadline{0};

  // The values, by owner. Ids: W's 1 and 2, M's 3 and 4, fillers 5 and 6.
  std::array<tracked_item, 2> waiter_values;
  std::array<tracked_item, 2> matcher_values;
  std::optional<tracked_item> waiter_got;
  std::vector<tracked_item> matcher_got;
  weft::select_result waiter_result;
  wait_status waiter_status = wait_status::ok;
  int waiter_fires = 0;
  int waiter_fired = -1;
  bool waiter_done = false;
};

void run_cancel_races(std::uint64_t seed, std::chrono::steady_clock::duration budget,
                      findings& found,
                      std::array<std::uint64_t, static_cast<std::size_t>(race_kind::count)>& runs) {
  chaos_sources chaos{4};
  race_round round;
  std::atomic<std::uint64_t> epoch{0};
  std::atomic<int> finished_count{0};  // of the three threads, this epoch
  std::atomic<bool> waiter_returned{false};
  std::atomic<bool> fire{false};
  std::atomic<bool> quit{false};

  weft_test::watchdog dog("stress_select", "select stress: cancel racing a matching operation", 4,
                          [&] {
                            std::fprintf(stderr, "  round kind: %s\n", name_of(round.kind));
                            if (round.a) print_channel("A", *round.a);
                            if (round.b) print_channel("B", *round.b);
                          });

  const auto parked = [&] {
    std::size_t waiting = 0;
    for (const chan* ch : {round.a.get(), round.b.get()}) {
      if (ch != nullptr) {
        const auto s = ch->stats();
        waiting += s.waiting_senders + s.waiting_receivers;
      }
    }
    return waiting > 0;
  };

  // Waits for the next epoch (or quit); returns false on quit.
  const auto next_epoch = [&](std::uint64_t& seen) {
    weft_test::spin_until([&] { return quit.load() || epoch.load() != seen; });
    seen = epoch.load();
    return !quit.load();
  };

  std::thread waiter([&] {
    std::uint64_t seen = 0;
    while (next_epoch(seen)) {
      auto& r = round;
      dog.note(0, "waiter: parked in its operation");
      const auto& token = r.token;
      select_probe probe;
      const auto recv_handler = [&probe](int k) {
        return [&probe, k](std::optional<tracked_item> value) {
          probe.fire(k);
          probe.got = std::move(value);
        };
      };
      const auto send_handler = [&probe](int k) { return [&probe, k] { probe.fire(k); }; };
      bool is_select = true;
      switch (r.kind) {
        case race_kind::recv: {
          is_select = false;
          auto result = r.a->recv(token);
          r.waiter_status = result.status();
          r.waiter_got = std::move(result).value();
          break;
        }
        case race_kind::send:
          is_select = false;
          r.waiter_status = r.a->send(std::move(r.waiter_values[0]), token);
          break;
        case race_kind::select_recv_recv:
          r.waiter_result = weft::select(token, weft::on_recv(*r.a, recv_handler(0)),
                                         weft::on_recv(*r.b, recv_handler(1)));
          break;
        case race_kind::select_send_recv:
          r.waiter_result =
              weft::select(token, weft::on_send(*r.a, r.waiter_values[0], send_handler(0)),
                           weft::on_recv(*r.b, recv_handler(1)));
          break;
        case race_kind::select_send_send:
          r.waiter_result =
              weft::select(token, weft::on_send(*r.a, r.waiter_values[0], send_handler(0)),
                           weft::on_send(*r.b, r.waiter_values[1], send_handler(1)));
          break;
        case race_kind::select_both_sides:
          r.waiter_result =
              weft::select(token, weft::on_send(*r.a, r.waiter_values[0], send_handler(0)),
                           weft::on_recv(*r.a, recv_handler(1)));
          break;
        case race_kind::deadline:
          if (r.b) {
            r.waiter_result = weft::select_for(
                r.deadline, weft::on_send(*r.a, r.waiter_values[0], send_handler(0)),
                weft::on_recv(*r.b, recv_handler(1)));
          } else {
            is_select = false;
            auto result = r.a->recv_for(r.deadline);
            r.waiter_status = result.status();
            r.waiter_got = std::move(result).value();
          }
          break;
        case race_kind::count:
          break;
      }
      if (is_select) {
        r.waiter_fires = probe.fires;
        r.waiter_fired = probe.fired;
        if (probe.got) r.waiter_got = std::move(probe.got);
        r.waiter_status = r.waiter_result.status;
      }
      waiter_returned.store(true);
      dog.note(0, "waiter: done");
      finished_count.fetch_add(1);
    }
  });

  std::thread matcher([&] {
    std::uint64_t seen = 0;
    while (next_epoch(seen)) {
      auto& r = round;
      dog.note(1, "matcher: waiting for the waiter to park");
      if (r.wait_for_park)
        weft_test::spin_until([&] { return parked() || waiter_returned.load(); });
      fire.store(true);
      dog.note(1, "matcher: matching");
      const auto give = [&](chan& ch, tracked_item& value) { (void)ch.try_send(std::move(value)); };
      const auto take = [&](chan& ch) {
        if (auto value = ch.try_recv()) r.matcher_got.push_back(std::move(*value));
      };
      switch (r.kind) {
        case race_kind::recv:
          give(*r.a, r.matcher_values[0]);
          break;
        case race_kind::send:
          take(*r.a);
          break;
        case race_kind::select_recv_recv:
          if (r.matcher_first) {
            give(*r.a, r.matcher_values[0]);
            give(*r.b, r.matcher_values[1]);
          } else {
            give(*r.b, r.matcher_values[1]);
            give(*r.a, r.matcher_values[0]);
          }
          break;
        case race_kind::select_send_recv:
        case race_kind::deadline:
          if (r.kind == race_kind::deadline && !r.b) {
            give(*r.a, r.matcher_values[0]);
          } else if (r.matcher_first) {
            take(*r.a);
            give(*r.b, r.matcher_values[1]);
          } else {
            give(*r.b, r.matcher_values[1]);
            take(*r.a);
          }
          break;
        case race_kind::select_send_send:
          if (r.matcher_first) {
            take(*r.a);
            take(*r.b);
          } else {
            take(*r.b);
            take(*r.a);
          }
          break;
        case race_kind::select_both_sides:
          if (r.both_sides_send) {
            take(*r.a);
          } else {
            give(*r.a, r.matcher_values[0]);
          }
          break;
        case race_kind::count:
          break;
      }
      dog.note(1, "matcher: done");
      finished_count.fetch_add(1);
    }
  });

  std::thread canceller([&] {
    std::uint64_t seen = 0;
    while (next_epoch(seen)) {
      dog.note(2, "canceller: waiting for the matcher");
      weft_test::spin_until([&] { return fire.load(); });
      dog.note(2, "canceller: cancelling");
      if (round.kind != race_kind::deadline)
        chaos.cancel_and_replace(round.token_index, seen % 2 == 0);
      finished_count.fetch_add(1);
    }
  });

  std::mt19937_64 rng{seed ^ 0xca9ce1ULL};
  const auto until = std::chrono::steady_clock::now() + budget;
  for (std::uint64_t index = 0; index < iteration_cap(20'000); ++index) {
    if ((index & 7) == 0 && std::chrono::steady_clock::now() >= until) break;
    dog.note(3, "coordinator: setting up a round");
    auto& r = round;
    r.kind = static_cast<race_kind>(rng() % static_cast<std::uint64_t>(race_kind::count));
    const auto make_channel = [&](bool for_send, std::int64_t filler_base) {
      // A send waits on a rendezvous or a full ring (full of fillers); a
      // receive on a rendezvous or an empty ring.
      const std::size_t capacity = rng() % 2 == 0 ? 0 : 1 + rng() % 2;
      auto ch = std::make_unique<chan>(capacity);
      if (for_send && capacity != 0) {
        for (std::size_t i = 0; i < capacity; ++i) {
          if (!ch->try_send(tracked_item{filler_base + static_cast<std::int64_t>(i)})) {
            found.add("test bug: a filler did not fit");
          }
        }
      }
      return ch;
    };
    const bool a_sends = r.kind == race_kind::send || r.kind == race_kind::select_send_recv ||
                         r.kind == race_kind::select_send_send;
    r.a.reset();
    r.b.reset();
    if (r.kind == race_kind::select_both_sides) {
      r.a = std::make_unique<chan>(0);
    } else if (r.kind == race_kind::deadline) {
      const bool select_form = rng() % 2 == 0;
      r.a = make_channel(select_form, 5);
      if (select_form) r.b = make_channel(false, 7);
    } else {
      r.a = make_channel(a_sends, 5);
      if (r.kind == race_kind::select_recv_recv || r.kind == race_kind::select_send_recv)
        r.b = make_channel(false, 7);
      if (r.kind == race_kind::select_send_send) r.b = make_channel(true, 7);
    }
    r.token_index = index;
    r.token = chaos.token(index);
    r.wait_for_park = rng() % 4 != 0;
    r.matcher_first = rng() % 2 == 0;
    r.both_sides_send = rng() % 2 == 0;
    r.deadline = std::chrono::microseconds(rng() % 60);
    r.waiter_values = {tracked_item{1}, tracked_item{2}};
    r.matcher_values = {tracked_item{3}, tracked_item{4}};
    r.waiter_got.reset();
    r.matcher_got.clear();
    r.waiter_result = {};
    r.waiter_status = wait_status::ok;
    r.waiter_fires = 0;
    r.waiter_fired = -1;
    waiter_returned.store(false);
    fire.store(false);
    finished_count.store(0);
    ++runs[static_cast<std::size_t>(r.kind)];

    epoch.fetch_add(1);
    dog.note(3, "coordinator: waiting for matcher and canceller");
    weft_test::spin_until([&] { return finished_count.load() >= 2; });
    // The waiter returns by the canceller's cancel or its deadline.
    weft_test::spin_until([&] { return finished_count.load() == 3; });
    dog.note(3, "coordinator: checking a round");

    // Every value in exactly one place.
    std::array<int, 9> places{};
    std::string where;
    const auto place = [&](const tracked_item& value, const char* what) {
      if (value.id == tracked_item::none) return;
      if (value.id < 1 || value.id > 8) {
        found.add(std::string("a value with an id nobody made, in ") + what);
        return;
      }
      ++places[static_cast<std::size_t>(value.id)];
      where += std::string(" ") + std::to_string(value.id) + "@" + what;
    };
    for (const auto& value : r.waiter_values) place(value, "waiter's hands");
    for (const auto& value : r.matcher_values) place(value, "matcher's hands");
    if (r.waiter_got) place(*r.waiter_got, "waiter's receive");
    for (const auto& value : r.matcher_got) place(value, "matcher's receive");
    for (chan* ch : {r.a.get(), r.b.get()}) {
      if (ch == nullptr) continue;
      const auto s = ch->stats();
      if (s.waiting_senders != 0 || s.waiting_receivers != 0)
        found.add(std::string(name_of(r.kind)) + ": a waiter left queued");
      while (auto value = ch->try_recv())
        place(*value, ch == r.a.get() ? "A's buffer" : "B's buffer");
    }
    const bool b_filled = r.b && r.kind == race_kind::select_send_send && r.b->capacity() != 0;
    const bool a_filled = a_sends || (r.kind == race_kind::deadline && r.b);
    for (std::int64_t id = 1; id <= 8; ++id) {
      bool made = id <= 4;
      if (id == 5 || id == 6) made = a_filled && r.a->capacity() > static_cast<std::size_t>(id - 5);
      if (id == 7 || id == 8) made = b_filled && r.b->capacity() > static_cast<std::size_t>(id - 7);
      const int count = places[static_cast<std::size_t>(id)];
      if (made && count != 1) {
        found.add(std::string(name_of(r.kind)) + ": value " + std::to_string(id) + " found in " +
                  std::to_string(count) + " places:" + where + " (waiter " +
                  name_of(r.waiter_status) + ")");
      } else if (!made && count != 0) {
        found.add(std::string(name_of(r.kind)) + ": value " + std::to_string(id) +
                  " appeared from nowhere");
      }
    }
    // The waiter's own effects agree with its result.
    const bool select_form = r.kind != race_kind::recv && r.kind != race_kind::send &&
                             !(r.kind == race_kind::deadline && !r.b);
    const bool gave_up =
        r.waiter_status == wait_status::cancelled || r.waiter_status == wait_status::timeout;
    if (r.waiter_status == wait_status::closed)
      found.add(std::string(name_of(r.kind)) + ": closed on an open channel");
    if (r.kind == race_kind::deadline ? r.waiter_status == wait_status::cancelled
                                      : r.waiter_status == wait_status::timeout) {
      found.add(std::string(name_of(r.kind)) + ": the wrong kind of giving up");
    }
    if (gave_up) {
      if (r.waiter_got) found.add(std::string(name_of(r.kind)) + ": gave up but received a value");
      if (r.waiter_values[0].id != 1 || r.waiter_values[1].id != 2) {
        found.add(std::string(name_of(r.kind)) + ": gave up but moved a value");
      }
      if (select_form &&
          (r.waiter_fires != 0 || r.waiter_result.index != weft::select_result::none)) {
        found.add(std::string(name_of(r.kind)) + ": gave up but ran a handler or named a case");
      }
    } else if (select_form) {
      const auto index = r.waiter_result.index;
      if (index > 1 || r.waiter_fires != 1 || r.waiter_fired != static_cast<int>(index)) {
        found.add(std::string(name_of(r.kind)) + ": a select completed case " +
                  std::to_string(index) + " but ran " + std::to_string(r.waiter_fires) +
                  " handlers");
      }
      const bool sent0 = r.waiter_values[0].id == tracked_item::none;
      const bool sent1 = r.waiter_values[1].id == tracked_item::none;
      if (sent0 + sent1 + r.waiter_got.has_value() != 1) {
        found.add(std::string(name_of(r.kind)) + ": a select had " +
                  std::to_string(sent0 + sent1 + r.waiter_got.has_value()) + " effects");
      }
    } else {
      const bool effect = r.waiter_got.has_value() || r.waiter_values[0].id == tracked_item::none;
      if (!effect) found.add(std::string(name_of(r.kind)) + ": ok but nothing moved");
    }
    r.a.reset();
    r.b.reset();
    // Fillers the waiter or matcher still hold are destroyed here, as all
    // values are before the next round.
    r.waiter_got.reset();
    r.matcher_got.clear();
  }
  quit.store(true);
  waiter.join();
  matcher.join();
  canceller.join();
}

// ===========================================================================
// Scenario 4: the window in close() on a rendezvous channel.

// Senders park on a rendezvous channel; receivers spin until closed() reads
// true and then try to receive at once, racing close()'s sweep of the queue,
// while a reader calls stats() (which locks the same queue). channel.hpp:
// "Blocked and later sends fail with wait_status::closed", and a rendezvous
// holds no values, so nothing may be received once the channel reads closed.
// The threads live across rounds (a barrier between rounds), so that many
// rounds fit in the budget.
void run_rendezvous_close_window(std::uint64_t seed, std::chrono::steady_clock::duration budget,
                                 findings& found, std::uint64_t& rounds_out,
                                 std::uint64_t& taken_out) {
  constexpr int senders = 3;
  constexpr int receivers = 2;
  std::mt19937_64 rng{seed ^ 0x3e3d3e3dULL};
  std::unique_ptr<chan> ch;
  std::atomic<int> sent{0};
  std::atomic<int> taken{0};
  std::atomic<int> done{0};  // senders and receivers finished this round
  std::atomic<bool> quit{false};
  std::atomic<bool> use_select{false};
  weft_test::round_barrier begin(senders + receivers + 2);
  weft_test::round_barrier finish(senders + receivers + 2);

  weft_test::watchdog dog("stress_select", "select stress: rendezvous close window",
                          senders + receivers + 2, [&] { print_channel("rendezvous", *ch); });

  std::vector<std::thread> threads;
  for (int s = 0; s < senders; ++s) {
    threads.emplace_back([&, s] {
      const auto who = static_cast<std::size_t>(s);
      for (;;) {
        begin.arrive_and_wait();
        if (quit.load()) break;
        dog.note(who, "sender: blocked in send until close()");
        tracked_item value{s};
        if (ch->send(std::move(value)) == wait_status::ok) sent.fetch_add(1);
        done.fetch_add(1);
        dog.note(who, "sender: at the end-of-round barrier");
        finish.arrive_and_wait();
      }
    });
  }
  for (int r = 0; r < receivers; ++r) {
    threads.emplace_back([&, r] {
      const auto who = static_cast<std::size_t>(senders + r);
      for (;;) {
        begin.arrive_and_wait();
        if (quit.load()) break;
        dog.note(who, "receiver: waiting for closed()");
        weft_test::spin_until([&] { return ch->closed(); });
        dog.note(who, "receiver: receiving after closed()");
        if (use_select.load()) {
          bool got = false;
          (void)weft::try_select(weft::on_recv(
              *ch, [&](std::optional<tracked_item> value) { got = value.has_value(); }));
          if (got) taken.fetch_add(1);
        } else if (ch->try_recv()) {
          taken.fetch_add(1);
        }
        done.fetch_add(1);
        dog.note(who, "receiver: at the end-of-round barrier");
        finish.arrive_and_wait();
      }
    });
  }
  threads.emplace_back([&] {
    const auto who = static_cast<std::size_t>(senders + receivers);
    stats_checker checker(1, senders);
    for (;;) {
      begin.arrive_and_wait();
      if (quit.load()) break;
      dog.note(who, "stats reader");
      while (done.load() != senders + receivers) {
        checker.look(*ch, 0, found);
        std::this_thread::yield();
      }
      checker = stats_checker(1, senders);
      finish.arrive_and_wait();
    }
  });

  const auto until = std::chrono::steady_clock::now() + budget;
  const auto coordinator = static_cast<std::size_t>(senders + receivers + 1);
  for (std::uint64_t round = 0; round < iteration_cap(20'000); ++round) {
    if (std::chrono::steady_clock::now() >= until) break;
    ++rounds_out;
    ch = std::make_unique<chan>(0, "rendezvous");
    sent.store(0);
    taken.store(0);
    done.store(0);
    use_select.store(rng() % 2 == 0);
    dog.note(coordinator, "coordinator: waiting for the senders to park");
    begin.arrive_and_wait();
    weft_test::spin_until(
        [&] { return ch->stats().waiting_senders == static_cast<std::size_t>(senders); });
    dog.note(coordinator, "coordinator: close()");
    ch->close();
    dog.note(coordinator, "coordinator: at the end-of-round barrier");
    finish.arrive_and_wait();
    if (sent.load() != taken.load()) found.add("test bug: sends and receives disagree");
    if (taken.load() != 0) {
      taken_out += static_cast<std::uint64_t>(taken.load());
      found.add("round " + std::to_string(round) + ": " + std::to_string(taken.load()) +
                " blocked sends completed after closed() read true (" +
                (use_select.load() ? "try_select" : "try_recv") + ")");
    }
    const auto s = ch->stats();
    if (s.waiting_senders != 0 || s.waiting_receivers != 0) found.add("waiters left after close()");
  }
  quit.store(true);
  begin.arrive_and_wait();
  for (auto& thread : threads) thread.join();
}

}  // namespace

TEST_CASE(
    "select stress: mixed send and receive selects over overlapping channels move every value "
    "exactly once" *
    doctest::timeout(240)) {
  INFO("replay with --seed " << weft_test::seed());
  const long live_before = g_live_items.load();
  for (const int threads : thread_counts()) run_mesh(threads);
  CHECK(g_live_items.load() == live_before);
}

TEST_CASE(
    "select stress: close racing blocked senders, receivers and selects keeps the closed contract "
    "exactly" *
    doctest::timeout(240)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  const long live_before = g_live_items.load();
  for (const int threads : thread_counts()) {
    CAPTURE(threads);
    findings found;
    findings window;
    std::mt19937_64 rng{seed + static_cast<std::uint64_t>(threads)};
    const auto until = std::chrono::steady_clock::now() + run_budget() / 2;
    std::uint64_t rounds = 0;
    close_round_result totals;
    std::array<std::uint64_t, 4> by_capacity{};
    while (std::chrono::steady_clock::now() < until && rounds < iteration_cap(2'000)) {
      const std::size_t capacity = std::array<std::size_t, 4>{0, 1, 2, 3}[rng() % 4];
      const auto r = run_close_round(threads, capacity, rng(), found, window);
      ++by_capacity[capacity];
      totals.sent += r.sent;
      totals.refused += r.refused;
      totals.received += r.received;
      totals.drained += r.drained;
      ++rounds;
    }
    INFO("first findings:" << found.summary());
    CHECK(found.count() == 0);
    INFO("rendezvous receives after closed() read true:" << window.summary());
    CHECK(window.count() == 0);
    MESSAGE("close races, ", threads, " threads: ", rounds,
            " rounds (capacity 0/1/2/3: ", by_capacity[0], "/", by_capacity[1], "/", by_capacity[2],
            "/", by_capacity[3], "), ", totals.sent, " sent, ", totals.refused, " refused, ",
            totals.received, " received (", totals.drained, " in final drains)");
  }
  CHECK(g_live_items.load() == live_before);
}

TEST_CASE(
    "select stress: a cancel racing a matching try_ operation on one parked waiter loses and "
    "doubles nothing" *
    doctest::timeout(240)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  const long live_before = g_live_items.load();
  findings found;
  std::array<std::uint64_t, static_cast<std::size_t>(race_kind::count)> runs{};
  run_cancel_races(seed, run_budget() * 3 / 2, found, runs);
  INFO("first findings:" << found.summary());
  CHECK(found.count() == 0);
  CHECK(g_live_items.load() == live_before);
  std::string per_kind;
  for (std::size_t k = 0; k < runs.size(); ++k) {
    per_kind += std::string(" ") + name_of(static_cast<race_kind>(k)) + ": " +
                std::to_string(runs[k]) + ";";
  }
  MESSAGE("cancel races:", per_kind);
}

TEST_CASE(
    "select stress: no receive on a rendezvous channel takes a blocked sender's value once "
    "closed() is true" *
    doctest::timeout(240)) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  findings found;
  std::uint64_t rounds = 0;
  std::uint64_t taken = 0;
  run_rendezvous_close_window(seed, run_budget(), found, rounds, taken);
  INFO("first findings:" << found.summary());
  CHECK(found.count() == 0);
  MESSAGE("rendezvous close window: ", rounds, " rounds, ", taken, " values taken after closed()");
}
