// SPDX-License-Identifier: BSL-1.0
// Tests for weft::select (weft/select.hpp): a ready case completes at once,
// a uniform random choice among ready cases, try_select as Go's `default`
// (also while a sender is between claiming a slot and publishing), waiting
// for a case on buffered and rendezvous channels, select against select on
// a rendezvous channel, closed channels, cancellation and deadlines (on a
// manual clock). The randomised every-value-exactly-once check is in
// tests/stress/stress_channel.cpp.
//
// Hand-offs: a select is parked once every channel it waits on counts it
// among its waiters (stats()). Nothing here sleeps.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/detail/futex.hpp>
#include <weft/manual_clock.hpp>
#include <weft/select.hpp>

#include <atomic>
#include <chrono>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;
using weft::wait_status;
using weft_test::spin_until;

TEST_CASE("select: completes the ready case, and only that one") {
  weft::channel<int> empty{1};
  weft::channel<int> ready{1};
  REQUIRE(ready.send(5) == wait_status::ok);
  weft::channel<int> full{1};
  REQUIRE(full.send(0) == wait_status::ok);
  int from_empty = 0;
  int from_ready = 0;
  int value = 9;
  bool sent = false;
  const auto result = weft::select(weft::on_recv(empty, [&](std::optional<int>) { ++from_empty; }),
                                   weft::on_send(full, value, [&] { sent = true; }),
                                   weft::on_recv(ready, [&](std::optional<int> v) { from_ready = *v; }));
  CHECK(result.index == 2);
  CHECK(result.status == wait_status::ok);
  CHECK(result);
  CHECK(from_ready == 5);
  CHECK(from_empty == 0);
  CHECK_FALSE(sent);
  CHECK(value == 9);  // the send case did not complete: its value stays
  CHECK(full.size() == 1);
  CHECK(empty.stats().waiting_receivers == 0);  // nothing left queued
  CHECK(full.stats().waiting_senders == 0);
}

TEST_CASE("select: chooses at random among ready cases, so none starves") {
  weft::channel<int> first{1};
  weft::channel<int> second{1};
  int counts[2] = {0, 0};
  for (int round = 0; round < 400; ++round) {
    if (first.size() == 0) REQUIRE(first.send(1) == wait_status::ok);
    if (second.size() == 0) REQUIRE(second.send(2) == wait_status::ok);
    const auto result = weft::select(weft::on_recv(first, [](std::optional<int>) {}),
                                     weft::on_recv(second, [](std::optional<int>) {}));
    ++counts[result.index];
  }
  // Each has probability 1/2 per round; fewer than 100 of 400 has
  // probability below 1e-24.
  CHECK(counts[0] > 100);
  CHECK(counts[1] > 100);
}

// Go picks uniformly among the ready cases. A random rotation picked the
// ready case after a run of unready ones four times in five here.
TEST_CASE("select: the choice among ready cases is uniform, wherever they stand") {
  weft::channel<int> a{1};
  weft::channel<int> b{1};
  weft::channel<int> c{1};
  weft::channel<int> d{1};
  weft::channel<int> e{1};
  const auto ignore = [](std::optional<int>) {};
  int first = 0;
  int last = 0;
  constexpr int rounds = 4000;
  for (int round = 0; round < rounds; ++round) {
    if (a.size() == 0) REQUIRE(a.send(1) == wait_status::ok);
    if (e.size() == 0) REQUIRE(e.send(5) == wait_status::ok);
    const auto result =
        weft::select(weft::on_recv(a, ignore), weft::on_recv(b, ignore), weft::on_recv(c, ignore),
                     weft::on_recv(d, ignore), weft::on_recv(e, ignore));
    REQUIRE((result.index == 0 || result.index == 4));
    ++(result.index == 0 ? first : last);
  }
  // Each has probability 1/2 per round: the standard deviation of a count
  // is about 32, and 40% is 12 of them below the mean.
  CHECK(first > rounds * 4 / 10);
  CHECK(last > rounds * 4 / 10);
}

// A select past its deadline used to spin until the sender published; it
// now ends at its deadline. try_select waits the publication out, as the
// channel's try_recv does: a send that came after this one may already have
// returned (the channel tests show why a try must not miss it).
TEST_CASE(
    "a value a sender has claimed a slot for: select_until past its deadline does not wait, "
    "try_select does" *
    doctest::timeout(60)) {
  weft::channel<weft_test::stalling_move> ch{2};
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};
  std::thread sender([&] {
    weft_test::stalling_move value{7};
    value.arm(1, entered, released);
    CHECK(ch.try_send(std::move(value)));
  });
  spin_until([&] { return entered.load(); });
  std::optional<weft_test::stalling_move> got;
  const auto take = [&](std::optional<weft_test::stalling_move> v) { got = std::move(v); };
  const auto result = weft::select_until(weft::manual_clock::now(), weft::on_recv(ch, take));
  CHECK(result.index == weft::select_result::none);
  CHECK(result.status == wait_status::timeout);
  CHECK_FALSE(got.has_value());

  std::atomic<bool> trying{false};
  weft::select_result polled;
  std::thread poller([&] {
    trying = true;
    polled = weft::try_select(weft::on_recv(ch, take));
  });
  spin_until([&] { return trying.load(); });
  std::mt19937_64 rng{20261207};
  for (auto spins = rng() % 20'000; spins != 0; --spins) weft::detail::cpu_relax();
  released.store(true);
  poller.join();
  sender.join();
  CHECK(polled.index == 0);
  REQUIRE(got.has_value());
  CHECK(got->value == 7);
}

TEST_CASE("try_select: returns none at once when no case is ready, and completes one that is") {
  weft::channel<int> empty{2};
  weft::channel<int> rendezvous{0};
  int value = 1;
  auto result = weft::try_select(weft::on_recv(empty, [](std::optional<int>) { FAIL("not ready"); }),
                                 weft::on_send(rendezvous, value));
  CHECK(result.index == weft::select_result::none);
  CHECK_FALSE(result);
  CHECK(value == 1);
  CHECK(empty.stats().waiting_receivers == 0);
  CHECK(rendezvous.stats().waiting_senders == 0);

  result = weft::try_select(weft::on_send(empty, value));
  CHECK(result.index == 0);
  CHECK(*empty.try_recv() == 1);
}

TEST_CASE("select: waits until a case becomes ready, on buffered and rendezvous channels") {
  for (std::size_t capacity : {0u, 4u}) {
    CAPTURE(capacity);
    weft::channel<std::string> a{capacity};
    weft::channel<std::string> b{capacity};
    std::optional<std::string> got;
    weft::select_result result;
    std::thread selector([&] {
      result = weft::select(weft::on_recv(a, [&](std::optional<std::string> v) { got = std::move(v); }),
                            weft::on_recv(b, [&](std::optional<std::string> v) { got = std::move(v); }));
    });
    spin_until([&] { return a.stats().waiting_receivers == 1 && b.stats().waiting_receivers == 1; });
    CHECK(b.send(std::string("from b")) == wait_status::ok);
    selector.join();
    CHECK(result.index == 1);
    CHECK(got == "from b");
    CHECK(a.stats().waiting_receivers == 0);
    CHECK(b.stats().waiting_receivers == 0);
    CHECK(a.size() == 0);
  }
}

TEST_CASE("select: a send case waits for room, and moves its value only when it completes") {
  weft::channel<int> full{1};
  REQUIRE(full.send(0) == wait_status::ok);
  weft::channel<int> idle{0};
  int value = 42;
  bool sent = false;
  weft::select_result result;
  std::thread selector([&] {
    result = weft::select(weft::on_send(full, value, [&] { sent = true; }),
                          weft::on_recv(idle, [](std::optional<int>) {}));
  });
  spin_until([&] { return full.stats().waiting_senders == 1 && idle.stats().waiting_receivers == 1; });
  CHECK(*full.recv() == 0);
  selector.join();
  CHECK(result.index == 0);
  CHECK(sent);
  CHECK(*full.recv() == 42);
}

TEST_CASE("select: a sending select and a receiving select meet on a rendezvous channel") {
  weft::channel<int> meet{0};
  weft::channel<int> only_received{0};  // the receiving select waits here too; nobody sends
  weft::channel<int> only_sent{0};      // the sending select offers here too; nobody receives
  std::optional<int> got;
  std::thread receiver([&] {
    (void)weft::select(weft::on_recv(meet, [&](std::optional<int> v) { got = v; }),
                       weft::on_recv(only_received, [](std::optional<int>) { FAIL("nobody sends"); }));
  });
  spin_until([&] { return meet.stats().waiting_receivers == 1 && only_received.stats().waiting_receivers == 1; });
  int value = 7;
  const auto result = weft::select(weft::on_send(only_sent, value), weft::on_send(meet, value));
  receiver.join();
  CHECK(result.index == 1);
  CHECK(got == 7);
  CHECK(only_received.stats().waiting_receivers == 0);
  CHECK(only_sent.stats().waiting_senders == 0);
}

TEST_CASE("select: a closed channel makes its cases ready: end of stream for recv, closed for send") {
  weft::channel<int> ch{2};
  ch.close();
  bool ended = false;
  auto result = weft::select(weft::on_recv(ch, [&](std::optional<int> v) { ended = !v; }));
  CHECK(result.index == 0);
  CHECK(result.status == wait_status::closed);
  CHECK(ended);
  int value = 3;
  result = weft::select(weft::on_send(ch, value, [] { FAIL("a closed channel takes nothing"); }));
  CHECK(result.status == wait_status::closed);
  CHECK(value == 3);

  // Closing wakes a parked select.
  weft::channel<int> later{0};
  std::thread selector([&] { result = weft::select(weft::on_recv(later, [](std::optional<int>) {})); });
  spin_until([&] { return later.stats().waiting_receivers == 1; });
  later.close();
  selector.join();
  CHECK(result.status == wait_status::closed);
}

TEST_CASE("select: a token cancels a parked select, and a cancelled one never starts") {
  weft::channel<int> ch{1};
  weft::cancel_source cancelled;
  cancelled.cancel();
  REQUIRE(ch.send(1) == wait_status::ok);
  auto result = weft::select(cancelled.token(), weft::on_recv(ch, [](std::optional<int>) { FAIL("cancelled"); }));
  CHECK(result.status == wait_status::cancelled);
  CHECK(result.index == weft::select_result::none);
  CHECK(ch.size() == 1);

  weft::channel<int> empty{1};
  weft::cancel_source source;
  std::thread selector([&] {
    result = weft::select(source.token(), weft::on_recv(empty, [](std::optional<int>) { FAIL("cancelled"); }));
  });
  spin_until([&] { return empty.stats().waiting_receivers == 1; });
  source.cancel();
  selector.join();
  CHECK(result.status == wait_status::cancelled);
  CHECK(empty.stats().waiting_receivers == 0);
  CHECK(empty.try_send(2));  // the fast path works again: nobody is marked waiting
}

TEST_CASE("select_until: gives up at its deadline on a manual clock") {
  weft::channel<int> ch{0};
  weft::select_result result;
  std::thread selector([&] {
    result = weft::select_until(weft::manual_clock::now() + 2s, weft::on_recv(ch, [](std::optional<int>) {}));
  });
  spin_until([&] { return ch.stats().waiting_receivers == 1 && weft::manual_clock::pending_timers() == 1; });
  weft::manual_clock::advance(2s);
  selector.join();
  CHECK(result.status == wait_status::timeout);
  CHECK(ch.stats().waiting_receivers == 0);
}

TEST_CASE("select: one select waiting both to receive from and to send on a rendezvous channel meets a receiver") {
  weft::channel<int> ch{0};
  int value = 5;
  weft::select_result result;
  std::thread selector([&] {
    result = weft::select(weft::on_recv(ch, [](std::optional<int>) { FAIL("nobody sends"); }),
                          weft::on_send(ch, value));
  });
  spin_until([&] {
    const auto stats = ch.stats();
    return stats.waiting_receivers == 1 && stats.waiting_senders == 1;
  });
  CHECK(*ch.recv() == 5);  // passes over the select's own receive to reach its send
  selector.join();
  CHECK(result.index == 1);
  CHECK(ch.stats().waiting_receivers == 0);
}
