// SPDX-License-Identifier: BSL-1.0
// Randomised stress scenarios for one class of use-after-free: a waiter
// whose wait another thread's call ended destroys the object at once, while
// that call may still be returning.
//
// Every blocking weft primitive lets its owner destroy it as soon as nobody
// waits on it or calls into it as far as the owner can tell. So when thread
// A waits, thread B's release / send / recv / close / done / lease return /
// cancel lets A through, and A then destroys the object, B must not touch
// the object after the step that let A go (wait_group's done() once did:
// see its "releasing mark"). Each scenario holds the object in a
// std::unique_ptr that A resets right after its wait returns, so
// AddressSanitizer sees any later touch by B and ThreadSanitizer sees it as
// a race with the free. B waits a random while first (nothing, a spin,
// yields, or until A is queued and then a little more), so its call meets A
// spinning, queueing, or asleep. A third thread C sometimes waits too and
// gives up by a short deadline or a cancelled token, so that B's call runs
// on a stale "waiters queued" mark; A destroys the object only after C's
// call has returned as well.
//
// Invariants checked besides "no use after free": every wait ends with the
// status its round implies (ok, closed or cancelled), the value a waiter
// receives is the one sent, a failed send keeps its value, permits and
// pool slots are all back when the owner destroys the object, and every
// resource opened is closed (every value sent is freed, which
// LeakSanitizer checks in the ASan builds).
//
// Every random choice comes from weft_test::seed(), which main.cpp prints;
// replay with
//
//   ./weft_stress --seed N --test-case="*destroyed by*"
//
// (the interleaving is up to the scheduler, so a replay repeats the choices,
// not necessarily the failure). --scale N runs each scenario N times longer.
// Several lanes (independent groups of threads, one object each) run at
// once, so that threads are preempted in the middle of their calls.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/object_pool.hpp>
#include <weft/resource_pool.hpp>
#include <weft/select.hpp>
#include <weft/semaphore.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::iteration_cap;
using weft_test::run_budget;
using weft_test::spin_for;
using weft_test::under_tsan;

using rng_type = std::mt19937_64;

std::uint64_t pick(rng_type& rng, std::uint64_t below) { return rng() % below; }
bool coin(rng_type& rng, std::uint64_t one_in = 2) { return pick(rng, one_in) == 0; }

// A deadline that never passes during a test (the form is what matters).
std::chrono::steady_clock::time_point far_deadline() {
  return std::chrono::steady_clock::now() + 1h;
}

// The pause before a releasing call: none, a short or long spin, a few
// yields, or until `queued()` says the waiter is in the queue (bounded: it
// may never queue) and then a little more, so that it may go to sleep.
template <class Queued>
void jitter(rng_type& rng, Queued queued) {
  switch (pick(rng, 6)) {
    case 0:
      break;
    case 1:
      spin_for(pick(rng, 64));
      break;
    case 2:
      spin_for(pick(rng, 4096));
      break;
    case 3:
      for (auto n = pick(rng, 4) + 1; n != 0; --n) std::this_thread::yield();
      break;
    default:
      for (int i = 0; i < 2000 && !queued(); ++i) std::this_thread::yield();
      spin_for(pick(rng, 2048));
      for (auto n = pick(rng, 3); n != 0; --n) std::this_thread::yield();
      break;
  }
}

void jitter(rng_type& rng) {
  jitter(rng, [] { return true; });
}

// Counts broken invariants; the first one's description is kept for the
// report.
class faults {
 public:
  void add(const char* what) noexcept {
    if (count_.fetch_add(1) == 0) first_.store(what);
  }
  void expect(bool condition, const char* what) noexcept {
    if (!condition) add(what);
  }
  std::uint64_t count() const noexcept { return count_.load(); }
  const char* first() const noexcept {
    const char* what = first_.load();
    return what != nullptr ? what : "none";
  }

 private:
  std::atomic<std::uint64_t> count_{0};
  std::atomic<const char*> first_{nullptr};
};

// Waits, yielding, until `flag` is set.
void await(const std::atomic<bool>& flag) {
  while (!flag.load(std::memory_order_acquire)) std::this_thread::yield();
}

// Runs `lanes` independent groups of `roles` threads. Each round of a lane:
// the owner (role 0) makes the objects (make), every role takes its part
// of the setup (setup), every role acts (act: the owner waits and destroys,
// the others release), and the owner checks the round (check). Rounds go
// on until the time budget or the iteration cap. Returns the rounds run.
template <class Scenario>
std::uint64_t run_lanes(std::uint64_t seed, int lanes, int roles, Scenario& scenario,
                        std::uint64_t per_scale) {
  using lane_type = typename Scenario::lane;
  const auto until = std::chrono::steady_clock::now() + run_budget();
  const auto cap = iteration_cap(per_scale);
  struct lane_slot {
    explicit lane_slot(int roles) : barrier(static_cast<std::size_t>(roles)) {}
    weft_test::round_barrier barrier;
    std::atomic<bool> go{false};
    lane_type state;
  };
  std::deque<lane_slot> slots;
  for (int l = 0; l < lanes; ++l) slots.emplace_back(roles);
  std::atomic<std::uint64_t> rounds{0};
  std::vector<std::thread> threads;
  for (int l = 0; l < lanes; ++l) {
    for (int role = 0; role < roles; ++role) {
      threads.emplace_back([&, l, role] {
        auto& slot = slots[static_cast<std::size_t>(l)];
        rng_type rng{seed ^
                     (0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(l * 16 + role + 1))};
        for (std::uint64_t round = 0;; ++round) {
          if (role == 0) {
            const bool go = round < cap && std::chrono::steady_clock::now() < until;
            if (go) scenario.make(slot.state, rng);
            slot.go.store(go, std::memory_order_relaxed);
          }
          slot.barrier.arrive_and_wait();
          if (!slot.go.load(std::memory_order_relaxed)) return;
          scenario.setup(role, slot.state, rng);
          slot.barrier.arrive_and_wait();
          scenario.act(role, slot.state, rng);
          slot.barrier.arrive_and_wait();
          if (role == 0) {
            scenario.check(slot.state);
            rounds.fetch_add(1, std::memory_order_relaxed);
          }
        }
      });
    }
  }
  for (auto& t : threads) t.join();
  return rounds.load();
}

// One lane alone, then three at once (more threads than cores).
template <class Scenario>
void run_scenario(const char* what, int roles, std::uint64_t per_scale, std::uint64_t salt) {
  const std::uint64_t seed = weft_test::seed();
  INFO("replay with --seed " << seed);
  for (const int lanes : {1, 3}) {
    CAPTURE(lanes);
    Scenario scenario;
    const auto rounds = run_lanes(seed ^ salt, lanes, roles, scenario, per_scale);
    INFO("first fault: " << std::string(scenario.broken.first()));
    CHECK(scenario.broken.count() == 0);
    CHECK(rounds > 0);
    scenario.finish();
    MESSAGE(std::string(what) << ": " << lanes << " lanes, " << rounds << " rounds");
  }
}

constexpr int owner = 0;      // waits, then destroys the object
constexpr int releaser = 1;   // lets the owner through
constexpr int bystander = 2;  // waits too, and gives up (or passes on what it got)

// ---------------------------------------------------------------- semaphore

struct semaphore_scenario {
  struct lane {
    std::unique_ptr<weft::semaphore> sem;
    weft::semaphore* target = nullptr;  // B's and C's view: never through the unique_ptr
    std::ptrdiff_t capacity = 1;
    std::ptrdiff_t need = 1;
    bool in_pieces = false;
    int owner_form = 0;
    bool bystander_active = false;
    int bystander_form = 0;
    std::atomic<bool> bystander_done{false};
    weft::cancel_source never;  // for the owner's token form
    std::optional<weft::cancel_source> bystander_source;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    l.capacity = static_cast<std::ptrdiff_t>(pick(rng, 4) + 1);
    l.sem = std::make_unique<weft::semaphore>(l.capacity);
    l.target = l.sem.get();
    l.in_pieces = coin(rng);
    // Released in pieces, the owner needs them all, so that only the last
    // piece lets it through (else B would legitimately call into a
    // destroyed semaphore).
    l.need =
        l.in_pieces
            ? l.capacity
            : static_cast<std::ptrdiff_t>(pick(rng, static_cast<std::uint64_t>(l.capacity)) + 1);
    l.owner_form = static_cast<int>(pick(rng, 6));
    l.bystander_active = coin(rng);
    l.bystander_form = static_cast<int>(pick(rng, 3));
    l.bystander_done.store(!l.bystander_active);
    l.bystander_source.reset();
    if (l.bystander_active && l.bystander_form == 1) l.bystander_source.emplace();
  }

  void setup(int role, lane& l, rng_type&) {
    if (role == releaser) {
      broken.expect(l.target->try_acquire(l.capacity),
                    "semaphore: B could not take every permit at the start");
    }
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      auto& sem = *l.sem;
      weft::wait_status status = weft::wait_status::ok;
      switch (l.owner_form) {
        case 0:
          sem.acquire(l.need);
          break;
        case 1:
          status = sem.acquire(l.need, l.never.token());
          break;
        case 2:
          status = sem.acquire_until(l.need, far_deadline());
          break;
        case 3: {
          auto held = sem.acquire_permit(l.need);
          (void)held.detach();  // destroyed with the semaphore, not returned to it
          break;
        }
        case 4:
          while (!sem.try_acquire(l.need)) {
            if (coin(rng, 8)) std::this_thread::yield();
          }
          break;
        default: {
          auto held = sem.acquire_permit_for(l.need, 1h);
          if (!held) status = weft::wait_status::timeout;
          (void)held.detach();
          break;
        }
      }
      broken.expect(status == weft::wait_status::ok,
                    "semaphore: the owner's acquire did not end ok");
      await(l.bystander_done);
      broken.expect(sem.available() == l.capacity - l.need, "semaphore: permits not conserved");
      broken.expect(sem.waiters() == 0, "semaphore: a waiter left in the queue");
      l.sem.reset();
    } else if (role == releaser) {
      auto* sem = l.target;
      const bool cancel_first = coin(rng);
      if (l.bystander_source && cancel_first) {
        jitter(rng);
        l.bystander_source->cancel();
      }
      jitter(rng, [&] { return sem->waiters() > 0; });
      if (l.in_pieces) {
        std::ptrdiff_t left = l.capacity;
        while (left > 0) {
          const auto piece =
              static_cast<std::ptrdiff_t>(pick(rng, static_cast<std::uint64_t>(left)) + 1);
          left -= piece;
          if (left > 0) {
            sem->release(piece);
            jitter(rng, [&] { return sem->waiters() > 0; });
          } else {
            sem->release(piece);  // may let the owner through: the last touch
          }
        }
      } else {
        sem->release(l.capacity);
      }
      if (l.bystander_source && !cancel_first) {
        jitter(rng);
        l.bystander_source->cancel();
      }
    } else if (role == bystander && l.bystander_active) {
      auto* sem = l.target;
      const auto n =
          static_cast<std::ptrdiff_t>(pick(rng, static_cast<std::uint64_t>(l.capacity)) + 1);
      weft::wait_status status = weft::wait_status::ok;
      switch (l.bystander_form) {
        case 0:
          status = sem->acquire_for(n, std::chrono::microseconds{pick(rng, 200)});
          break;
        case 1:
          status = sem->acquire(n, l.bystander_source->token());
          break;
        default: {
          auto source =
              weft::with_timeout(l.never.token(), std::chrono::microseconds{pick(rng, 200)});
          status = sem->acquire(n, source.token());
          break;
        }
      }
      if (status == weft::wait_status::ok) sem->release(n);
      l.bystander_done.store(true, std::memory_order_release);
    }
  }

  void check(lane& l) { broken.expect(l.sem == nullptr, "semaphore: not destroyed"); }
  void finish() {}
};

TEST_CASE("semaphore destroyed by the waiter its release let through" * doctest::timeout(120)) {
  run_scenario<semaphore_scenario>("semaphore", 3, 200'000, 0x53e7u);
}

// ------------------------------------------------------------------ channel

using boxed_value = std::unique_ptr<std::uint64_t>;

struct channel_scenario {
  enum mode_kind {
    owner_receives,
    owner_sends,
    owner_receives_close,
    owner_sends_close,
    mode_count
  };
  struct lane {
    std::unique_ptr<weft::channel<boxed_value>> ch;
    weft::channel<boxed_value>* target = nullptr;
    std::size_t capacity = 0;
    int mode = owner_receives;
    int owner_form = 0;
    int releaser_form = 0;
    std::uint64_t tag = 0;
    bool bystander_active = false;
    std::atomic<bool> bystander_done{false};
    weft::cancel_source never;
  };
  faults broken;

  static constexpr int recv_forms = 7;  // the last one polls
  static constexpr int send_forms = 5;  // the last one polls

  void make(lane& l, rng_type& rng) {
    static constexpr std::size_t capacities[] = {0, 1, 2, 4};
    l.capacity = capacities[pick(rng, 4)];
    l.ch = std::make_unique<weft::channel<boxed_value>>(l.capacity);
    l.target = l.ch.get();
    l.mode = static_cast<int>(pick(rng, mode_count));
    l.tag = rng() | 1;
    const bool owner_recv = l.mode == owner_receives || l.mode == owner_receives_close;
    // On a rendezvous channel whichever side comes second completes the
    // other, so the owner may destroy the channel only if it came first: it
    // never polls there (a polling owner would complete a queued B, which is
    // then still inside its call), and B waits until the owner is queued.
    const int owner_forms = owner_recv ? recv_forms : send_forms;
    l.owner_form = static_cast<int>(
        pick(rng, static_cast<std::uint64_t>(owner_forms - (l.capacity == 0 ? 1 : 0))));
    const int releaser_forms = owner_recv ? send_forms : recv_forms;
    l.releaser_form = static_cast<int>(pick(rng, static_cast<std::uint64_t>(releaser_forms)));
    if (!owner_recv && l.capacity > 0) {
      // The owner's send must wait: fill the ring.
      for (std::size_t i = 0; i < l.capacity; ++i) {
        broken.expect(l.ch->try_send(std::make_unique<std::uint64_t>(0)),
                      "channel: could not fill the ring");
      }
    }
    // Not on a rendezvous channel: B could then meet C (which may leave) instead of the owner.
    l.bystander_active = l.mode == owner_receives && l.capacity > 0 && coin(rng, 3);
    l.bystander_done.store(!l.bystander_active);
  }

  void setup(int, lane&, rng_type&) {}

  // The owner's receive, in one of its forms.
  std::optional<boxed_value> receive(lane& l, rng_type& rng, weft::wait_status& status) {
    auto& ch = *l.ch;
    std::optional<boxed_value> got;
    switch (l.owner_form) {
      case 0:
        got = ch.recv();
        if (!got) status = weft::wait_status::closed;
        break;
      case 1: {
        auto r = ch.recv(l.never.token());
        status = r.status();
        got = std::move(r).value();
        break;
      }
      case 2: {
        auto r = ch.recv_until(far_deadline());
        status = r.status();
        got = std::move(r).value();
        break;
      }
      case 3: {
        auto it = ch.begin();
        if (it == ch.end()) {
          status = weft::wait_status::closed;
        } else {
          got = std::move(*it);
        }
        break;
      }
      case 4: {
        auto r = weft::select(
            weft::on_recv(ch, [&](std::optional<boxed_value> v) { got = std::move(v); }));
        status = r.status;
        if (status == weft::wait_status::ok && !got) status = weft::wait_status::closed;
        break;
      }
      case 5: {
        auto r = weft::select(l.never.token(), weft::on_recv(ch, [&](std::optional<boxed_value> v) {
                                got = std::move(v);
                              }));
        status = r.status;
        if (status == weft::wait_status::ok && !got) status = weft::wait_status::closed;
        break;
      }
      default:
        for (;;) {
          if ((got = ch.try_recv())) break;
          if (ch.closed()) {
            // Closed: what try_recv gives now is all there will be.
            if (!(got = ch.try_recv())) status = weft::wait_status::closed;
            break;
          }
          if (coin(rng, 8)) std::this_thread::yield();
        }
        break;
    }
    return got;
  }

  weft::wait_status send(lane& l, rng_type& rng, boxed_value& value) {
    auto& ch = *l.ch;
    switch (l.owner_form) {
      case 0:
        return ch.send(std::move(value));
      case 1:
        return ch.send(std::move(value), l.never.token());
      case 2:
        return ch.send_until(std::move(value), far_deadline());
      case 3: {
        auto r = weft::select(weft::on_send(ch, value));
        return r.status;
      }
      default:
        for (;;) {
          if (ch.try_send(std::move(value))) return weft::wait_status::ok;
          if (ch.closed()) return weft::wait_status::closed;
          if (coin(rng, 8)) std::this_thread::yield();
        }
    }
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      weft::wait_status status = weft::wait_status::ok;
      if (l.mode == owner_receives || l.mode == owner_receives_close) {
        auto got = receive(l, rng, status);
        if (l.mode == owner_receives) {
          broken.expect(status == weft::wait_status::ok,
                        "channel: the owner's receive did not end ok");
          broken.expect(got && *got && **got == l.tag,
                        "channel: the owner received the wrong value");
        } else {
          broken.expect(status == weft::wait_status::closed,
                        "channel: the owner's receive did not see the close");
          broken.expect(!got, "channel: a value from nowhere after close");
        }
      } else {
        auto value = std::make_unique<std::uint64_t>(l.tag);
        status = send(l, rng, value);
        if (l.mode == owner_sends) {
          broken.expect(status == weft::wait_status::ok,
                        "channel: the owner's send did not end ok");
        } else {
          broken.expect(status == weft::wait_status::closed,
                        "channel: the owner's send did not see the close");
          broken.expect(value && *value == l.tag, "channel: a failed send lost its value");
        }
      }
      await(l.bystander_done);
      l.ch.reset();
    } else if (role == releaser) {
      auto* ch = l.target;
      const bool towards_receivers = l.mode == owner_receives || l.mode == owner_receives_close;
      const auto owner_queued = [&] {
        const auto s = ch->stats();
        return (towards_receivers ? s.waiting_receivers : s.waiting_senders) > 0;
      };
      if (l.capacity == 0) {
        while (!owner_queued()) std::this_thread::yield();
      }
      jitter(rng, owner_queued);
      if (l.mode == owner_receives_close || l.mode == owner_sends_close) {
        broken.expect(ch->close(), "channel: close said it was closed already");
      } else if (l.mode == owner_receives) {
        auto value = std::make_unique<std::uint64_t>(l.tag);
        weft::wait_status status = weft::wait_status::ok;
        switch (l.releaser_form) {
          case 0:
            status = ch->send(std::move(value));
            break;
          case 1:
            status = ch->send(std::move(value), l.never.token());
            break;
          case 2:
            status = ch->send_until(std::move(value), far_deadline());
            break;
          case 3:
            status = weft::select(weft::on_send(*ch, value)).status;
            break;
          default:
            while (!ch->try_send(std::move(value))) {
              if (coin(rng, 8)) std::this_thread::yield();
            }
            break;
        }
        broken.expect(status == weft::wait_status::ok, "channel: B's send did not end ok");
      } else {
        std::optional<boxed_value> got;
        switch (l.releaser_form) {
          case 0:
            got = ch->recv();
            break;
          case 1:
            got = std::move(ch->recv(l.never.token())).value();
            break;
          case 2:
            got = std::move(ch->recv_until(far_deadline())).value();
            break;
          case 3: {
            auto it = ch->begin();
            if (it != ch->end()) got = std::move(*it);
            break;
          }
          case 4:
          case 5:
            (void)weft::select(
                weft::on_recv(*ch, [&](std::optional<boxed_value> v) { got = std::move(v); }));
            break;
          default:
            while (!(got = ch->try_recv())) {
              if (coin(rng, 8)) std::this_thread::yield();
            }
            break;
        }
        broken.expect(got && *got, "channel: B's receive got nothing");
        if (got && *got)
          broken.expect(**got == (l.capacity == 0 ? l.tag : 0),
                        "channel: B received the wrong value");
      }
    } else if (role == bystander && l.bystander_active) {
      // A receiver that gives up quickly; if it took B's value after all,
      // it passes it on to the owner.
      auto* ch = l.target;
      std::optional<boxed_value> got;
      if (coin(rng)) {
        got = std::move(ch->recv_for(std::chrono::microseconds{pick(rng, 200)})).value();
      } else {
        auto source =
            weft::with_timeout(l.never.token(), std::chrono::microseconds{pick(rng, 200)});
        got = std::move(ch->recv(source.token())).value();
      }
      if (got)
        broken.expect(ch->send(std::move(*got)) == weft::wait_status::ok,
                      "channel: C could not pass on");
      l.bystander_done.store(true, std::memory_order_release);
    }
  }

  void check(lane& l) { broken.expect(l.ch == nullptr, "channel: not destroyed"); }
  void finish() {}
};

TEST_CASE("channel destroyed by the waiter a send, receive or close let through" *
          doctest::timeout(120)) {
  run_scenario<channel_scenario>("channel", 3, 200'000, 0xc4a7u);
}

// ------------------------------------------------------------------- select

// The owner selects on two channels; B sends on one (plainly or by a select
// of its own) or closes it; the owner destroys both.
struct select_scenario {
  struct lane {
    std::unique_ptr<weft::channel<boxed_value>> first;
    std::unique_ptr<weft::channel<boxed_value>> second;
    weft::channel<boxed_value>* target = nullptr;
    std::size_t which = 0;
    bool closes = false;
    int owner_form = 0;
    bool releaser_selects = false;
    std::uint64_t tag = 0;
    weft::cancel_source never;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    l.first = std::make_unique<weft::channel<boxed_value>>(pick(rng, 3));
    l.second = std::make_unique<weft::channel<boxed_value>>(pick(rng, 3));
    l.which = pick(rng, 2);
    l.closes = coin(rng, 4);
    l.owner_form = static_cast<int>(pick(rng, 3));
    l.releaser_selects = coin(rng);
    l.tag = rng() | 1;
  }

  void setup(int role, lane& l, rng_type&) {
    if (role == releaser) l.target = l.which == 0 ? l.first.get() : l.second.get();
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      std::optional<boxed_value> got;
      bool handled = false;
      const auto handler = [&](std::optional<boxed_value> v) {
        got = std::move(v);
        handled = true;
      };
      weft::select_result r;
      switch (l.owner_form) {
        case 0:
          r = weft::select(weft::on_recv(*l.first, handler), weft::on_recv(*l.second, handler));
          break;
        case 1:
          r = weft::select(l.never.token(), weft::on_recv(*l.first, handler),
                           weft::on_recv(*l.second, handler));
          break;
        default:
          r = weft::select_for(1h, weft::on_recv(*l.first, handler),
                               weft::on_recv(*l.second, handler));
          break;
      }
      broken.expect(r.index == l.which, "select: the wrong case completed");
      broken.expect(handled, "select: the handler did not run");
      if (l.closes) {
        broken.expect(r.status == weft::wait_status::closed && !got,
                      "select: the close was not seen");
      } else {
        broken.expect(r.status == weft::wait_status::ok && got && *got && **got == l.tag,
                      "select: the value was not received");
      }
      l.first.reset();
      l.second.reset();
    } else if (role == releaser) {
      auto* ch = l.target;
      const auto owner_queued = [&] { return ch->stats().waiting_receivers > 0; };
      // On a rendezvous channel B's send must find the owner queued, or the
      // owner's select would complete B's send while B is still inside it.
      if (ch->capacity() == 0 && !l.closes) {
        while (!owner_queued()) std::this_thread::yield();
      }
      jitter(rng, owner_queued);
      if (l.closes) {
        ch->close();
      } else if (l.releaser_selects) {
        auto value = std::make_unique<std::uint64_t>(l.tag);
        broken.expect(static_cast<bool>(weft::select(weft::on_send(*ch, value))),
                      "select: B's send case failed");
      } else {
        broken.expect(ch->send(std::make_unique<std::uint64_t>(l.tag)) == weft::wait_status::ok,
                      "select: B's send failed");
      }
    }
  }

  void check(lane& l) {
    broken.expect(l.first == nullptr && l.second == nullptr, "select: not destroyed");
  }
  void finish() {}
};

TEST_CASE("select on two channels destroyed by the waiter a send or close let through" *
          doctest::timeout(120)) {
  run_scenario<select_scenario>("select", 2, 200'000, 0x5e1eu);
}

// ------------------------------------------------------------ resource_pool

// B holds every slot; the owner waits for them one by one as B returns its
// leases (or discards them); with all of them, it returns them and destroys
// the pool.
struct resource_pool_scenario {
  using pool_type = weft::resource_pool<int>;
  struct lane {
    std::unique_ptr<pool_type> pool;
    pool_type* target = nullptr;
    std::size_t max_open = 1;
    int owner_form = 0;
    std::vector<pool_type::lease> held;  // B's
    bool bystander_active = false;
    std::atomic<bool> bystander_done{false};
    std::atomic<std::uint64_t> opened{0};
    std::atomic<std::uint64_t> closed{0};
    weft::cancel_source never;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    l.max_open = pick(rng, 3) + 1;
    weft::resource_pool_options options;
    options.max_open = l.max_open;
    options.max_idle = pick(rng, l.max_open + 1);
    l.pool = std::make_unique<pool_type>(
        options, [&l] { return static_cast<int>(l.opened.fetch_add(1)); },
        [&l](int&) { l.closed.fetch_add(1); });
    l.target = l.pool.get();
    l.owner_form = static_cast<int>(pick(rng, 5));
    l.bystander_active = coin(rng);
    l.bystander_done.store(!l.bystander_active);
  }

  void setup(int role, lane& l, rng_type&) {
    if (role == releaser) {
      for (std::size_t i = 0; i < l.max_open; ++i) {
        auto lease = l.target->try_acquire();
        broken.expect(static_cast<bool>(lease),
                      "resource_pool: B could not take every slot at the start");
        l.held.push_back(std::move(lease));
      }
    }
  }

  pool_type::lease take(lane& l, rng_type& rng) {
    auto& pool = *l.pool;
    switch (l.owner_form) {
      case 0:
        return pool.acquire();
      case 1:
        return pool.acquire(l.never.token());
      case 2:
        return pool.acquire_until(far_deadline());
      case 3:
        return pool.acquire_for(1h);
      default:
        for (;;) {
          if (auto lease = pool.try_acquire()) return lease;
          if (coin(rng, 8)) std::this_thread::yield();
        }
    }
  }

  static void give_back(pool_type::lease& lease, rng_type& rng) {
    switch (pick(rng, 3)) {
      case 0:
        lease.release();
        break;
      case 1:
        lease.discard();
        break;
      default:
        lease = pool_type::lease{};
        break;
    }
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      std::vector<pool_type::lease> mine;
      for (std::size_t i = 0; i < l.max_open; ++i) {
        auto lease = take(l, rng);
        broken.expect(static_cast<bool>(lease), "resource_pool: the owner's acquire failed");
        mine.push_back(std::move(lease));
      }
      std::shuffle(mine.begin(), mine.end(), rng);
      for (auto& lease : mine) give_back(lease, rng);
      await(l.bystander_done);
      const auto s = l.pool->stats();
      broken.expect(s.in_use == 0 && s.waiting == 0,
                    "resource_pool: a lease or a waiter left at the end");
      l.pool.reset();
    } else if (role == releaser) {
      auto* pool = l.target;
      std::shuffle(l.held.begin(), l.held.end(), rng);
      for (auto& lease : l.held) {
        jitter(rng, [&] { return pool->stats().waiting > 0; });
        give_back(lease, rng);  // the last one may let the owner through: its last touch
      }
      l.held.clear();
    } else if (role == bystander && l.bystander_active) {
      auto* pool = l.target;
      pool_type::lease lease;
      if (coin(rng)) {
        lease = pool->acquire_for(std::chrono::microseconds{pick(rng, 200)});
      } else {
        auto source =
            weft::with_timeout(l.never.token(), std::chrono::microseconds{pick(rng, 200)});
        lease = pool->acquire(source.token());
      }
      if (lease) give_back(lease, rng);
      l.bystander_done.store(true, std::memory_order_release);
    }
  }

  void check(lane& l) {
    broken.expect(l.pool == nullptr, "resource_pool: not destroyed");
    broken.expect(l.opened.load() == l.closed.load(),
                  "resource_pool: a resource opened was never closed");
  }
  void finish() {}
};

TEST_CASE("resource_pool destroyed by the waiter a returned lease let through" *
          doctest::timeout(120)) {
  run_scenario<resource_pool_scenario>("resource_pool", 3, 200'000, 0x9001u);
}

// ------------------------------------------------------------------- cancel

// The owner waits on the token of a source, or of its child or grandchild,
// in one of the waits that take a token; B cancels the source or one of its
// ancestors through the owner's own cancel_source object (holding no
// reference of its own) or through a copy; the owner drops every reference
// at once, in a random order.
struct cancel_scenario {
  struct lane {
    lane() {
      (void)held_permit.try_acquire();
      busy.add(1);
    }
    ~lane() { busy.done(); }
    std::vector<std::unique_ptr<weft::cancel_source>> chain;  // root first
    std::unique_ptr<weft::cancel_token> token;                // of the last
    weft::cancel_source* target = nullptr;
    std::optional<weft::cancel_source> copy;  // B's, in the copy form
    std::size_t which = 0;
    bool through_copy = false;
    int owner_form = 0;
    // Lane-long objects the owner's token waits on.
    weft::semaphore held_permit{1};
    weft::channel<int> empty{1};
    weft::wait_group busy;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    l.chain.clear();
    l.chain.push_back(std::make_unique<weft::cancel_source>());
    for (auto depth = pick(rng, 3); depth != 0; --depth) {
      l.chain.push_back(std::make_unique<weft::cancel_source>(l.chain.back()->token().child()));
    }
    l.token = std::make_unique<weft::cancel_token>(l.chain.back()->token());
    l.which = pick(rng, l.chain.size());
    l.through_copy = coin(rng, 3);
    l.owner_form = static_cast<int>(pick(rng, 6));
  }

  void setup(int role, lane& l, rng_type&) {
    if (role == releaser) {
      l.target = l.chain[l.which].get();
      if (l.through_copy) l.copy.emplace(*l.target);
    }
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      const auto& token = *l.token;
      weft::wait_status status = weft::wait_status::ok;
      weft::wait_status expected = weft::wait_status::cancelled;
      switch (l.owner_form) {
        case 0:
          status = token.wait();
          expected = weft::wait_status::ok;
          break;
        case 1:
          status = token.wait_until(far_deadline());
          expected = weft::wait_status::ok;
          break;
        case 2:
          status = l.held_permit.acquire(1, token);
          break;
        case 3:
          status = l.empty.recv(token).status();
          break;
        case 4:
          status = l.busy.wait(token);
          break;
        default:
          status = weft::select(token, weft::on_recv(l.empty, [](std::optional<int>) {})).status;
          break;
      }
      broken.expect(status == expected, "cancel: the owner's wait did not end as cancelled");
      // Every reference the owner holds goes, in a random order.
      std::vector<int> order(l.chain.size() + 1);
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
      std::shuffle(order.begin(), order.end(), rng);
      for (const int i : order) {
        if (i == static_cast<int>(l.chain.size())) {
          l.token.reset();
        } else {
          l.chain[static_cast<std::size_t>(i)].reset();
        }
      }
    } else if (role == releaser) {
      jitter(rng);
      if (l.through_copy) {
        l.copy->cancel();
        l.copy.reset();
      } else {
        l.target->cancel();  // the owner's object: the owner may drop it as soon as its wait ends
      }
    }
  }

  void check(lane& l) {
    broken.expect(l.token == nullptr, "cancel: token not dropped");
    broken.expect(l.held_permit.waiters() == 0, "cancel: a waiter left in the semaphore");
  }
  void finish() {}
};

TEST_CASE("cancel_source destroyed by the waiter its cancel let through" * doctest::timeout(120)) {
  run_scenario<cancel_scenario>("cancel", 2, 200'000, 0xca9cu);
}

// --------------------------------------------------------------- wait_group

// The fixed bug's own scenario, kept next to its relatives: B and C share
// the done() calls; the owner destroys the group when its wait returns.
struct wait_group_scenario {
  struct lane {
    std::unique_ptr<weft::wait_group> group;
    weft::wait_group* target = nullptr;
    int count = 1;
    int by_releaser = 1;
    int owner_form = 0;
    weft::cancel_source never;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    l.group = std::make_unique<weft::wait_group>();
    l.target = l.group.get();
    l.count = static_cast<int>(pick(rng, 4)) + 1;
    l.by_releaser = static_cast<int>(pick(rng, static_cast<std::uint64_t>(l.count) + 1));
    l.group->add(l.count);
    l.owner_form = static_cast<int>(pick(rng, 3));
  }

  void setup(int, lane&, rng_type&) {}

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      weft::wait_status status = weft::wait_status::ok;
      switch (l.owner_form) {
        case 0:
          l.group->wait();
          break;
        case 1:
          status = l.group->wait(l.never.token());
          break;
        default:
          status = l.group->wait_until(far_deadline());
          break;
      }
      broken.expect(status == weft::wait_status::ok, "wait_group: the wait did not end ok");
      l.group.reset();
    } else {
      const int mine = role == releaser ? l.by_releaser : l.count - l.by_releaser;
      auto* group = l.target;
      for (int i = 0; i < mine; ++i) {
        jitter(rng, [&] { return group->stats().waiters > 0; });
        group->done();  // the last of all may let the owner through
      }
    }
  }

  void check(lane& l) { broken.expect(l.group == nullptr, "wait_group: not destroyed"); }
  void finish() {}
};

TEST_CASE("wait_group destroyed by the waiter the last done let through" * doctest::timeout(120)) {
  run_scenario<wait_group_scenario>("wait_group", 3, 200'000, 0x3a17u);
}

// -------------------------------------------------------------- worker_pool

// Brief: the pool's destructor joins, so a worker that signalled the owner
// is done with the pool by the time the destructor returns. The owner waits
// for a task (a future, or a wait_group the task calls done() on), or for
// room in a full queue, and destroys the pool at once.
struct worker_pool_scenario {
  struct lane {
    std::unique_ptr<weft::worker_pool> pool;
    int form = 0;
  };
  faults broken;
  std::atomic<std::uint64_t> ran{0};

  void make(lane& l, rng_type& rng) {
    weft::worker_pool_options options;
    options.workers = pick(rng, 2) + 1;
    options.queue_capacity = pick(rng, 2) + 1;
    options.on_full = weft::overflow::block;
    l.pool = std::make_unique<weft::worker_pool>(std::move(options));
    l.form = static_cast<int>(pick(rng, 3));
  }

  void setup(int, lane&, rng_type&) {}

  void act(int role, lane& l, rng_type& rng) {
    if (role != owner) return;
    auto& pool = *l.pool;
    switch (l.form) {
      case 0: {
        auto result = pool.submit([this, spins = pick(rng, 2048)] {
          spin_for(spins);
          ran.fetch_add(1);
          return 7;
        });
        broken.expect(result.get() == 7, "worker_pool: the future's value is wrong");
        l.pool.reset();
        break;
      }
      case 1: {
        weft::wait_group done;
        done.add(1);
        pool.post([&done, this, spins = pick(rng, 2048)] {
          spin_for(spins);
          ran.fetch_add(1);
          done.done();
        });
        done.wait();
        l.pool.reset();
        break;
      }
      default: {
        // Fill every worker and the queue with tasks that wait at a gate,
        // then post one more, which waits for room.
        std::atomic<bool> gate{false};
        const auto blockers = 4;  // at most 2 workers + 2 queued
        for (int i = 0; i < blockers; ++i) {
          (void)pool.try_post([&gate, this] {
            await(gate);
            ran.fetch_add(1);
          });
        }
        std::thread opener([&gate, &rng] {
          jitter(rng);
          gate.store(true, std::memory_order_release);
        });
        pool.post([this] { ran.fetch_add(1); });
        opener.join();
        l.pool.reset();  // runs what is queued, while the gate still exists
        break;
      }
    }
  }

  void check(lane& l) { broken.expect(l.pool == nullptr, "worker_pool: not destroyed"); }
  void finish() { CHECK(ran.load() > 0); }
};

TEST_CASE("worker_pool destroyed as soon as a task signalled its owner" * doctest::timeout(120)) {
  run_scenario<worker_pool_scenario>("worker_pool", 1, 20'000, 0x6001u);
}

// -------------------------------------------------------------- object_pool

// Brief: no wait here, but the same race: B returns an object (a handle's
// destructor) while the owner destroys the pool, which the header allows.
// Every object made is destroyed by the end.
struct counted_object {
  static inline std::atomic<std::int64_t> alive{0};
  counted_object() { alive.fetch_add(1); }
  counted_object(const counted_object&) = delete;
  counted_object& operator=(const counted_object&) = delete;
  ~counted_object() { alive.fetch_sub(1); }
  std::uint64_t payload = 0;
};

struct object_pool_scenario {
  using pool_type = weft::object_pool<counted_object>;
  struct lane {
    std::unique_ptr<pool_type> pool;
    std::optional<pool_type::handle> held;  // B's
    bool owner_gets = false;
  };
  faults broken;

  void make(lane& l, rng_type& rng) {
    weft::object_pool_options options;
    options.max_cached_per_thread = pick(rng, 4) + 1;
    options.max_shared = pick(rng, 4);
    l.pool = std::make_unique<pool_type>(options);
    l.owner_gets = coin(rng);
  }

  void setup(int role, lane& l, rng_type& rng) {
    if (role == releaser) {
      l.held.emplace(l.pool->get());
      (*l.held)->payload = rng();
    }
  }

  void act(int role, lane& l, rng_type& rng) {
    if (role == owner) {
      if (l.owner_gets) {
        auto mine = l.pool->get();
        mine->payload = rng();
      }
      jitter(rng);
      l.pool.reset();
    } else if (role == releaser) {
      jitter(rng);
      l.held.reset();
    }
  }

  void check(lane& l) { broken.expect(l.pool == nullptr, "object_pool: not destroyed"); }
  void finish() {}
};

TEST_CASE("object_pool destroyed while another thread returns a handle" * doctest::timeout(120)) {
  run_scenario<object_pool_scenario>("object_pool", 2, 200'000, 0x0b1eu);
  // Threads that kept caches of destroyed pools have exited: nothing is left.
  CHECK(counted_object::alive.load() == 0);
}

}  // namespace
