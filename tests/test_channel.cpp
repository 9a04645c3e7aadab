// SPDX-License-Identifier: BSL-1.0
// Tests for weft::channel (weft/channel.hpp) and its Asio operations
// (weft/asio/channel.hpp): buffered and rendezvous channels, the try,
// blocking, token and deadline forms, close, iteration, stats, the task
// registry's view of blocked operations, and FIFO order across producers.
//
// Hand-offs: a test knows a thread has queued on a channel when stats()
// counts it among the waiting senders or receivers (counted under the
// queue's mutex when the waiter is pushed). Deadlines run on
// weft::manual_clock. Nothing here sleeps.
#include <weft/asio.hpp>
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/detail/futex.hpp>
#include <weft/manual_clock.hpp>
#include <weft/registry.hpp>
#include <weft/worker_pool.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;
using weft::wait_status;
using weft_test::spin_until;

namespace {

template <class Channel>
void wait_for_receivers(const Channel& channel, std::size_t count) {
  spin_until([&] { return channel.stats().waiting_receivers == count; });
}

template <class Channel>
void wait_for_senders(const Channel& channel, std::size_t count) {
  spin_until([&] { return channel.stats().waiting_senders == count; });
}

}  // namespace

TEST_CASE(
    "channel: a buffered channel is FIFO, bounded, and try_ forms never wait for room or a value") {
  weft::channel<int> ch{3};
  CHECK(ch.capacity() == 3);
  CHECK_FALSE(ch.try_recv());
  CHECK(ch.try_send(1));
  CHECK(ch.send(2) == wait_status::ok);
  int three = 3;
  CHECK(ch.try_send(std::move(three)));
  int four = 4;
  CHECK_FALSE(ch.try_send(std::move(four)));  // full: the value stays with the caller
  CHECK(four == 4);
  CHECK(ch.size() == 3);
  CHECK(*ch.try_recv() == 1);
  CHECK(*ch.recv() == 2);
  CHECK(*ch.try_recv() == 3);
  CHECK_FALSE(ch.try_recv());
  const auto stats = ch.stats();
  CHECK(stats.sent == 3);
  CHECK(stats.received == 3);
  CHECK(stats.size == 0);
}

TEST_CASE("channel: a full channel makes the sender wait until a receiver makes room (backpressure)") {
  weft::channel<int> ch{1, "jobs"};
  REQUIRE(ch.send(1) == wait_status::ok);
  std::thread sender([&] { CHECK(ch.send(2) == wait_status::ok); });
  wait_for_senders(ch, 1);
  CHECK(*ch.recv() == 1);
  sender.join();
  CHECK(*ch.recv() == 2);
  CHECK(ch.stats().send_blocked > 0ns);
  CHECK(ch.stats().name == "jobs");
}

TEST_CASE("channel: a waiting receiver is handed the value the next send brings") {
  weft::channel<std::string> ch{4};
  std::optional<std::string> got;
  std::thread receiver([&] { got = ch.recv(); });
  wait_for_receivers(ch, 1);
  CHECK(ch.send(std::string("hello")) == wait_status::ok);
  receiver.join();
  CHECK(got == "hello");
  CHECK(ch.stats().recv_blocked > 0ns);
}

TEST_CASE("channel: capacity 0 is a rendezvous: a send completes only when a receiver takes the value") {
  weft::channel<int> ch{0};
  CHECK_FALSE(ch.try_send(1));  // nobody receives
  CHECK_FALSE(ch.try_recv());   // nobody sends
  std::atomic<bool> sent{false};
  std::thread sender([&] {
    CHECK(ch.send(7) == wait_status::ok);
    sent = true;
  });
  wait_for_senders(ch, 1);
  CHECK_FALSE(sent.load());
  CHECK(ch.size() == 0);
  CHECK(*ch.try_recv() == 7);  // a waiting sender makes try_recv succeed
  sender.join();
  CHECK(sent.load());

  std::optional<int> got;
  std::thread receiver([&] { got = ch.recv(); });
  wait_for_receivers(ch, 1);
  CHECK(ch.try_send(8));  // a waiting receiver makes try_send succeed
  receiver.join();
  CHECK(got == 8);
  CHECK(ch.stats().sent == 2);
  CHECK(ch.stats().received == 2);
}

TEST_CASE("channel: move-only values go through buffered and rendezvous channels") {
  for (std::size_t capacity : {0u, 2u}) {
    weft::channel<std::unique_ptr<int>> ch{capacity};
    std::thread sender([&] {
      for (int i = 0; i < 100; ++i) CHECK(ch.send(std::make_unique<int>(i)) == wait_status::ok);
      ch.close();
    });
    int expected = 0;
    for (auto& value : ch) CHECK(*value == expected++);
    CHECK(expected == 100);
    sender.join();
  }
}

// recv_result<wait_status> had two constructors of one signature, and
// did not compile.
TEST_CASE("channel: a channel of wait_status tells its values from the reasons there is none") {
  weft::channel<wait_status> ch{1};
  REQUIRE(ch.send(wait_status::timeout) == wait_status::ok);
  const auto got = ch.recv_for(0s);
  REQUIRE(got.has_value());
  CHECK(*got == wait_status::timeout);
  CHECK(got.status() == wait_status::ok);
  const auto none = ch.recv_for(0s);
  CHECK_FALSE(none.has_value());
  CHECK(none.status() == wait_status::timeout);
  ch.close();
  CHECK(ch.recv_for(0s).status() == wait_status::closed);
}

// A receive may not queue while a sender has claimed a slot and not yet
// published its value (the sender would wake nobody), so it spins; past its
// deadline it spun on until the sender was done. Likewise a send while a
// receiver frees a slot.
TEST_CASE(
    "channel: timed send and receive end at their deadline while the other side is mid-move") {
  using weft_test::stalling_move;
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};
  const auto past = weft::manual_clock::now();

  SUBCASE("a receive, while a sender publishes") {
    weft::basic_channel<stalling_move, weft::manual_clock> ch{2};
    std::thread sender([&] {
      stalling_move value{7};
      value.arm(1, entered, released);
      CHECK(ch.try_send(std::move(value)));
    });
    spin_until([&] { return entered.load(); });
    CHECK(ch.recv_until(past).status() == wait_status::timeout);
    released = true;
    sender.join();
    const auto got = ch.recv_until(past);
    REQUIRE(got.has_value());
    CHECK(got->value == 7);
  }
  SUBCASE("a send, while a receiver frees a slot") {
    weft::basic_channel<stalling_move, weft::manual_clock> ch{1};
    stalling_move first{1};
    first.arm(2, entered, released);
    REQUIRE(ch.try_send(std::move(first)));
    std::thread receiver([&] { CHECK(ch.try_recv().has_value()); });
    spin_until([&] { return entered.load(); });
    CHECK(ch.send_until(stalling_move{2}, past) == wait_status::timeout);
    released = true;
    receiver.join();
    CHECK(ch.send_until(stalling_move{3}, past) == wait_status::ok);
  }
}

// try_send and try_recv used to report full (empty) while another thread
// was in the middle of a hand-off, though a receive (a send) that came
// after it had already returned, so the channel had room (a value):
//  - the ring's try_push fails while the receiver that claimed a slot is
//    still moving its value out, and try_pop while the sender that claimed
//    the oldest slot is still moving its value in;
//  - the fast paths defer to queued senders (receivers), whose marks stay up
//    until the hand-off to them, held up by such a move, is done.
// They now wait the hand-off out. Each case stalls one move
// (weft_test::stalling_move) and ends the stall after a random spin, so
// that with the old behaviour the try would almost always have come first.
TEST_CASE("channel: try_send and try_recv wait out a hand-off that a finished operation overtook" *
          doctest::timeout(60)) {
  using weft_test::stalling_move;
  std::mt19937_64 rng{20261207};
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};
  std::atomic<bool> trying{false};
  // Runs `attempt` on a thread of its own and ends the stall once it has
  // begun.
  const auto try_during_stall = [&](auto attempt) {
    std::thread trier([&] {
      trying = true;
      attempt();
    });
    spin_until([&] { return trying.load(); });
    for (auto spins = rng() % 20'000; spins != 0; --spins) weft::detail::cpu_relax();
    released = true;
    trier.join();
  };
  const auto value_of = [](const std::optional<stalling_move>& got) {
    return got ? got->value : -1;
  };
  // Buffers 1, which stalls on its way out of the ring, and then 2.
  const auto send_one_that_stalls_when_taken = [&](weft::channel<stalling_move>& ch) {
    stalling_move first{1};
    first.arm(2, entered, released);  // the first move is into the ring, the second out of it
    CHECK(ch.try_send(std::move(first)));
    CHECK(ch.try_send(stalling_move{2}));
  };
  // A thread that sends 1 and stalls on its way into the ring; returns once
  // it has.
  const auto send_stalled_on_a_thread = [&](weft::channel<stalling_move>& ch, bool& sent) {
    std::thread sender([&ch, &sent, &entered, &released] {
      stalling_move first{1};
      first.arm(1, entered, released);
      sent = ch.try_send(std::move(first));
    });
    spin_until([&] { return entered.load(); });
    return sender;
  };
  constexpr int rounds = 20;

  SUBCASE("try_send, while a receiver moves the oldest value out") {
    for (int round = 0; round < rounds; ++round) {
      entered = released = trying = false;
      weft::channel<stalling_move> ch{2};
      send_one_that_stalls_when_taken(ch);
      std::optional<stalling_move> stalled;
      std::thread receiver([&] { stalled = ch.try_recv(); });
      spin_until([&] { return entered.load(); });
      const auto overtaking = ch.try_recv();
      bool sent = false;
      try_during_stall([&] { sent = ch.try_send(stalling_move{3}); });
      receiver.join();
      CHECK(value_of(overtaking) == 2);
      CHECK(sent);
      CHECK(value_of(stalled) == 1);
      CHECK(value_of(ch.try_recv()) == 3);
    }
  }
  SUBCASE("try_recv, while a sender moves the oldest value in") {
    for (int round = 0; round < rounds; ++round) {
      entered = released = trying = false;
      weft::channel<stalling_move> ch{2};
      bool first_sent = false;
      std::thread stalled_sender = send_stalled_on_a_thread(ch, first_sent);
      const bool overtaking_sent = ch.try_send(stalling_move{2});
      std::optional<stalling_move> got;
      try_during_stall([&] { got = ch.try_recv(); });
      stalled_sender.join();
      CHECK(overtaking_sent);
      CHECK(first_sent);
      CHECK(value_of(got) == 1);
      CHECK(value_of(ch.try_recv()) == 2);
    }
  }
  SUBCASE("try_send, while room goes to a queued sender") {
    for (int round = 0; round < rounds; ++round) {
      entered = released = trying = false;
      weft::channel<stalling_move> ch{2};
      send_one_that_stalls_when_taken(ch);
      wait_status queued_status = wait_status::closed;
      std::thread queued_sender([&] { queued_status = ch.send(stalling_move{3}); });
      wait_for_senders(ch, 1);
      std::optional<stalling_move> stalled;
      std::thread receiver([&] { stalled = ch.try_recv(); });
      spin_until([&] { return entered.load(); });
      // Its pop tries to admit the queued sender into the room it made, at
      // the slot the stalled receive still holds, and fails: the queue
      // keeps its mark.
      const auto overtaking = ch.try_recv();
      bool sent = false;
      try_during_stall([&] { sent = ch.try_send(stalling_move{4}); });
      receiver.join();
      queued_sender.join();
      CHECK(value_of(overtaking) == 2);
      CHECK(sent);
      CHECK(queued_status == wait_status::ok);
      CHECK(value_of(stalled) == 1);
      CHECK(value_of(ch.try_recv()) == 3);
      CHECK(value_of(ch.try_recv()) == 4);
    }
  }
  SUBCASE("try_recv, while a value goes to a queued receiver") {
    for (int round = 0; round < rounds; ++round) {
      entered = released = trying = false;
      weft::channel<stalling_move> ch{2};
      std::optional<stalling_move> queued_got;
      std::thread queued_receiver([&] { queued_got = ch.recv(); });
      wait_for_receivers(ch, 1);
      bool first_sent = false;
      std::thread stalled_sender = send_stalled_on_a_thread(ch, first_sent);
      // Its push tries to feed the queued receiver from the slot the
      // stalled send still holds, and fails: the queue keeps its mark.
      const bool overtaking_sent = ch.try_send(stalling_move{2});
      std::optional<stalling_move> got;
      try_during_stall([&] { got = ch.try_recv(); });
      stalled_sender.join();
      queued_receiver.join();
      CHECK(overtaking_sent);
      CHECK(first_sent);
      CHECK(value_of(queued_got) == 1);
      CHECK(value_of(got) == 2);
      CHECK_FALSE(ch.try_recv().has_value());
    }
  }
}

TEST_CASE("channel: close keeps buffered values for receivers, then reports the end of the stream") {
  weft::channel<int> ch{4};
  CHECK(ch.send(1) == wait_status::ok);
  CHECK(ch.send(2) == wait_status::ok);
  CHECK(ch.close());
  CHECK_FALSE(ch.close());  // idempotent
  CHECK(ch.closed());
  int refused = 3;
  CHECK(ch.send(std::move(refused)) == wait_status::closed);
  CHECK(refused == 3);  // not lost
  CHECK_FALSE(ch.try_send(4));
  CHECK(*ch.recv() == 1);
  CHECK(*ch.try_recv() == 2);
  CHECK_FALSE(ch.recv());
  CHECK(ch.recv_for(1s).status() == wait_status::closed);
  weft::cancel_source source;
  CHECK(ch.recv(source.token()).status() == wait_status::closed);
  CHECK(ch.stats().closed);
}

TEST_CASE("channel: close wakes blocked senders with closed, their values intact, and blocked receivers") {
  SUBCASE("senders of a full buffered channel") {
    weft::channel<std::string> ch{1};
    REQUIRE(ch.send(std::string("kept")) == wait_status::ok);
    std::string value = "mine";
    wait_status status = wait_status::ok;
    std::thread sender([&] { status = ch.send(std::move(value)); });
    wait_for_senders(ch, 1);
    ch.close();
    sender.join();
    CHECK(status == wait_status::closed);
    CHECK(value == "mine");
    CHECK(*ch.recv() == "kept");
    CHECK_FALSE(ch.recv());
  }
  SUBCASE("senders and receivers of a rendezvous channel") {
    weft::channel<std::string> ch{0};
    std::string value = "mine";
    wait_status status = wait_status::ok;
    std::thread sender([&] { status = ch.send(std::move(value)); });
    wait_for_senders(ch, 1);
    ch.close();
    sender.join();
    CHECK(status == wait_status::closed);
    CHECK(value == "mine");

    weft::channel<int> other{0};
    std::optional<int> got = 1;
    std::thread receiver([&] { got = other.recv(); });
    wait_for_receivers(other, 1);
    other.close();
    receiver.join();
    CHECK_FALSE(got);
  }
  SUBCASE("receivers of an empty buffered channel") {
    weft::channel<int> ch{8};
    std::vector<std::thread> receivers;
    std::atomic<int> ended{0};
    for (int i = 0; i < 3; ++i) {
      receivers.emplace_back([&] {
        if (!ch.recv()) ++ended;
      });
    }
    wait_for_receivers(ch, 3);
    ch.close();
    for (auto& receiver : receivers) receiver.join();
    CHECK(ended == 3);
  }
}

TEST_CASE("channel: send and recv with a token give up on cancellation, a cancelled token does nothing") {
  weft::channel<int> ch{1};
  weft::cancel_source cancelled;
  cancelled.cancel();
  CHECK(ch.send(1, cancelled.token()) == wait_status::cancelled);  // even though there is room
  CHECK(ch.size() == 0);
  REQUIRE(ch.send(2) == wait_status::ok);
  CHECK(ch.recv(cancelled.token()).status() == wait_status::cancelled);  // even though a value waits
  CHECK(ch.size() == 1);

  weft::cancel_source source;
  int value = 3;
  wait_status status = wait_status::ok;
  std::thread sender([&] { status = ch.send(std::move(value), source.token()); });
  wait_for_senders(ch, 1);
  source.cancel();
  sender.join();
  CHECK(status == wait_status::cancelled);
  CHECK(value == 3);
  CHECK(ch.stats().waiting_senders == 0);
  CHECK(*ch.recv() == 2);

  weft::cancel_source receive;
  weft::recv_result<int> result{wait_status::ok};
  std::thread receiver([&] { result = ch.recv(receive.token()); });
  wait_for_receivers(ch, 1);
  receive.cancel();
  receiver.join();
  CHECK(result.status() == wait_status::cancelled);
  CHECK_FALSE(result);
  // Nobody waits any more: the fast paths work again.
  CHECK(ch.try_send(4));
  CHECK(*ch.try_recv() == 4);
}

TEST_CASE("channel: deadlines on a manual clock, for buffered and rendezvous channels") {
  for (std::size_t capacity : {0u, 1u}) {
    CAPTURE(capacity);
    weft::basic_channel<int, weft::manual_clock> ch{capacity};
    weft::recv_result<int> received{wait_status::ok};
    std::thread receiver([&] { received = ch.recv_for(5s); });
    wait_for_receivers(ch, 1);
    spin_until([] { return weft::manual_clock::pending_timers() == 1; });
    weft::manual_clock::advance(5s);
    receiver.join();
    CHECK(received.status() == wait_status::timeout);

    if (capacity == 1) REQUIRE(ch.send(0) == wait_status::ok);
    int value = 9;
    wait_status sent = wait_status::ok;
    std::thread sender([&] { sent = ch.send_until(std::move(value), weft::manual_clock::now() + 1s); });
    wait_for_senders(ch, 1);
    spin_until([] { return weft::manual_clock::pending_timers() == 1; });
    weft::manual_clock::advance(1s);
    sender.join();
    CHECK(sent == wait_status::timeout);
    CHECK(value == 9);
    CHECK(ch.stats().waiting_senders == 0);
    CHECK(ch.stats().waiting_receivers == 0);
  }
}

// Capacities that find their slots by division (1, 3) and by mask (16).
TEST_CASE("channel: each producer's values arrive in the order it sent them (FIFO across producers)") {
  for (const std::size_t capacity : {1u, 3u, 16u}) {
    CAPTURE(capacity);
    constexpr int producers = 4;
    constexpr int per_producer = weft_test::under_sanitizer ? 2000 : 20000;
    weft::channel<std::int64_t> ch{capacity};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        for (int i = 0; i < per_producer; ++i)
          REQUIRE(ch.send(std::int64_t{p} << 32 | i) == wait_status::ok);
      });
    }
    std::vector<int> next(producers, 0);
    std::atomic<int> out_of_order{0};
    for (int received = 0; received < producers * per_producer; ++received) {
      const auto value = *ch.recv();
      const auto producer = static_cast<std::size_t>(value >> 32);
      if ((value & 0xffffffff) != next[producer]) ++out_of_order;
      next[producer] = static_cast<int>(value & 0xffffffff) + 1;
    }
    for (auto& thread : threads) thread.join();
    CHECK(out_of_order == 0);
    CHECK(next == std::vector<int>(producers, per_producer));
    CHECK(ch.stats().sent == producers * per_producer);
  }
}

// mc#52: per-producer sub-queues pass the test above but not this one, where each send
// completes before the next, on another thread, begins: one FIFO for every producer.
TEST_CASE(
    "channel: sends completed one after another on different threads are received in that order" *
    doctest::timeout(60)) {
  for (const std::size_t capacity : {0u, 1u, 3u, 16u}) {
    CAPTURE(capacity);
    constexpr int producers = 4;
    constexpr int values = 300;
    weft::channel<int> ch{capacity};
    // The value whose send may start now: a producer passes the turn on
    // only once its send has returned.
    std::atomic<int> turn{0};
    std::atomic<bool> turn_never_came{false};
    // A buffered channel's values are taken from a full ring, which then
    // holds values of every producer (a receiver that keeps up would find
    // one value at a time, in any design).
    bool never_full = false;
    std::vector<int> received;
    std::thread receiver([&] {
      const auto full_or_all_sent = [&] { return ch.size() == capacity || turn.load() == values; };
      for (;;) {
        if (!never_full && !weft_test::eventually(full_or_all_sent)) never_full = true;
        auto value = ch.recv();
        if (!value) break;
        received.push_back(*value);
      }
    });
    std::vector<std::thread> threads;
    for (int first = 0; first < producers; ++first) {
      threads.emplace_back([&, first] {
        for (int value = first; value < values; value += producers) {
          if (!weft_test::eventually([&] { return turn.load() == value; })) {
            turn_never_came = true;
            return;
          }
          CHECK(ch.send(int{value}) == wait_status::ok);
          turn.store(value + 1);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    ch.close();
    receiver.join();
    CHECK_FALSE(turn_never_came.load());
    CHECK_FALSE(never_full);
    std::size_t in_order = 0;
    while (in_order < received.size() && received[in_order] == static_cast<int>(in_order))
      ++in_order;
    CHECK(in_order == static_cast<std::size_t>(values));
    CHECK(received.size() == static_cast<std::size_t>(values));
  }
}

// Queued senders must be admitted (buffered) or taken (rendezvous) oldest first: a LIFO
// or racing wake-up would let a later send complete, and its value arrive, first.
TEST_CASE(
    "channel: senders blocked on a full or rendezvous channel are served in the order they queued" *
    doctest::timeout(60)) {
  for (const std::size_t capacity : {1u, 0u}) {
    CAPTURE(capacity);
    constexpr int senders = 4;
    weft::channel<int> ch{capacity};
    std::vector<int> expected;
    if (capacity == 1) {
      REQUIRE(ch.send(100) == wait_status::ok);
      expected.push_back(100);
    }
    std::vector<std::thread> threads;
    bool all_queued = true;
    for (int index = 0; index < senders && all_queued; ++index) {
      threads.emplace_back([&ch, index] { CHECK(ch.send(int{index}) == wait_status::ok); });
      expected.push_back(index);
      const auto queued = static_cast<std::size_t>(index + 1);
      all_queued = weft_test::eventually([&] { return ch.stats().waiting_senders == queued; });
    }
    CHECK(all_queued);
    std::vector<int> received;
    if (all_queued) {
      for (std::size_t i = 0; i < expected.size(); ++i) {
        auto value = ch.recv_for(30s);
        if (!value) break;
        received.push_back(*value);
      }
    }
    ch.close();  // lets the senders go if they never all queued
    for (auto& thread : threads) thread.join();
    CHECK(received == expected);
  }
}

TEST_CASE("channel: many producers and consumers, buffered and rendezvous: every value exactly once") {
  for (std::size_t capacity : {0u, 1u, 7u, 64u}) {
    CAPTURE(capacity);
    constexpr int producers = 3;
    constexpr int consumers = 3;
    const int per_producer = weft_test::under_sanitizer ? 1000 : 10000;
    weft::channel<int> ch{capacity};
    std::vector<std::atomic<int>> seen(static_cast<std::size_t>(producers * per_producer));
    std::vector<std::thread> threads;
    std::atomic<int> producing{producers};
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        for (int i = 0; i < per_producer; ++i) REQUIRE(ch.send(p * per_producer + i) == wait_status::ok);
        if (--producing == 0) ch.close();
      });
    }
    for (int c = 0; c < consumers; ++c) {
      threads.emplace_back([&] {
        for (int& value : ch) seen[static_cast<std::size_t>(value)].fetch_add(1);
      });
    }
    for (auto& thread : threads) thread.join();
    int wrong = 0;
    for (auto& count : seen) wrong += count.load() != 1;
    CHECK(wrong == 0);
  }
}

// size() reads two counters, the receivers' and the senders', at two
// moments; with both moving in between, their difference overshot the
// capacity (a pool's stats().peak_queued reported 5 in a queue of 4).
TEST_CASE("channel: size() never exceeds the capacity while senders and receivers race") {
  constexpr std::size_t capacity = 2;
  constexpr int pairs = 2;
  const int per_sender = weft_test::under_sanitizer ? 20000 : 200000;
  weft::channel<int> ch{capacity};
  std::atomic<int> senders_left{pairs};
  std::vector<std::thread> threads;
  for (int p = 0; p < pairs; ++p) {
    threads.emplace_back([&] {
      for (int i = 0; i < per_sender;) i += ch.try_send(i) ? 1 : 0;
      senders_left.fetch_sub(1);
    });
    threads.emplace_back([&] {
      while (senders_left.load() != 0 || ch.size() != 0) (void)ch.try_recv();
    });
  }
  std::size_t largest = 0;
  while (senders_left.load() != 0) largest = std::max({largest, ch.size(), ch.stats().size});
  for (auto& thread : threads) thread.join();
  CHECK(largest <= capacity);
  CHECK(ch.stats().sent == ch.stats().received);
}

TEST_CASE("channel: a task blocked on a channel shows in the registry as channel \"name\" send / recv") {
  weft::worker_pool pool{{.workers = 2}};
  weft::channel<int> full{1, "results"};
  REQUIRE(full.send(0) == wait_status::ok);
  weft::channel<int> empty{0, "jobs"};
  pool.post([&] { (void)full.send(1); });
  pool.post([&] { (void)empty.recv(); });
  const auto blocked_on = [](const std::string& what) {
    for (const auto& task : weft::registry::snapshot()) {
      if (task.state == weft::task_state::blocked && task.blocked_on == what) return true;
    }
    return false;
  };
  spin_until([&] { return blocked_on("channel \"results\" send") && blocked_on("channel \"jobs\" recv"); });
  CHECK(*full.recv() == 0);
  CHECK(empty.send(2) == wait_status::ok);
  pool.shutdown();
  CHECK(*full.recv() == 1);
}

TEST_CASE("channel: async_send and async_recv with coroutines and threads on one channel") {
  for (std::size_t capacity : {0u, 2u}) {
    CAPTURE(capacity);
    weft::channel<int> ch{capacity};
    boost::asio::io_context io;
    std::vector<int> got;
    boost::asio::co_spawn(
        io,
        [&]() -> boost::asio::awaitable<void> {
          for (;;) {
            auto [error, value] = co_await weft::async_recv(ch, boost::asio::as_tuple(boost::asio::use_awaitable));
            if (!value) {
              CHECK(error == weft::errc::closed);
              break;
            }
            got.push_back(*value);
          }
        },
        boost::asio::detached);
    std::thread producer([&] {
      for (int i = 0; i < 50; ++i) CHECK(ch.send(std::move(i)) == wait_status::ok);
    });
    boost::asio::co_spawn(
        io,
        [&]() -> boost::asio::awaitable<void> {
          for (int i = 50; i < 100; ++i) co_await weft::async_send(ch, i, boost::asio::use_awaitable);
          co_return;
        },
        boost::asio::detached);
    std::thread closer([&] {
      producer.join();
      // The coroutine's sends complete when ch took them; stop once all 100 went in.
      spin_until([&] { return ch.stats().sent == 100; });
      ch.close();
    });
    io.run();
    closer.join();
    CHECK(got.size() == 100);
    std::vector<bool> seen(100, false);
    for (int value : got) seen[static_cast<std::size_t>(value)] = true;
    CHECK(std::count(seen.begin(), seen.end(), true) == 100);
  }
}

TEST_CASE("channel: an async_recv cancelled through its slot completes with cancelled and takes nothing") {
  weft::channel<int> ch{1};
  boost::asio::io_context io;
  boost::asio::cancellation_signal signal;
  boost::system::error_code error;
  std::optional<int> value = 1;
  weft::async_recv(ch, boost::asio::bind_cancellation_slot(
                           signal.slot(), boost::asio::bind_executor(io, [&](boost::system::error_code e,
                                                                             std::optional<int> v) {
                             error = e;
                             value = v;
                           })));
  CHECK(ch.stats().waiting_receivers == 1);
  signal.emit(boost::asio::cancellation_type::terminal);
  io.run();
  CHECK(error == weft::errc::cancelled);
  CHECK_FALSE(value);
  CHECK(ch.try_send(5));
  CHECK(*ch.try_recv() == 5);
}

TEST_CASE("channel: an async_send to a closed channel fails with closed") {
  weft::channel<int> ch{0};
  boost::asio::io_context io;
  boost::system::error_code error;
  bool called = false;
  boost::asio::co_spawn(
      io,
      [&]() -> boost::asio::awaitable<void> {
        auto [e] = co_await weft::async_send(ch, 1, boost::asio::as_tuple(boost::asio::use_awaitable));
        error = e;
        called = true;
      },
      boost::asio::detached);
  std::thread closer([&] {
    wait_for_senders(ch, 1);
    ch.close();
  });
  io.run();
  closer.join();
  CHECK(called);
  CHECK(error == weft::errc::closed);
}

TEST_CASE("channel: an async_send cancelled while the channel is full completes with cancelled and sends nothing") {
  weft::channel<int> ch{1};
  REQUIRE(ch.send(1) == wait_status::ok);
  boost::asio::io_context io;
  boost::asio::cancellation_signal signal;
  boost::system::error_code error;
  weft::async_send(ch, 2,
                   boost::asio::bind_cancellation_slot(
                       signal.slot(), boost::asio::bind_executor(io, [&](boost::system::error_code e) { error = e; })));
  CHECK(ch.stats().waiting_senders == 1);
  signal.emit(boost::asio::cancellation_type::terminal);
  io.run();
  CHECK(error == weft::errc::cancelled);
  CHECK(ch.stats().waiting_senders == 0);
  CHECK(*ch.try_recv() == 1);
  CHECK_FALSE(ch.try_recv());  // 2 was never sent
  CHECK(ch.try_send(3));       // nobody is marked waiting any more
}
