// SPDX-License-Identifier: BSL-1.0
// Randomised stress for weft::channel and weft::select, checked the way a
// model checker would check it: every value a send reported as sent is
// received exactly once, and no value whose send failed is received at all.
//
// Producers send unique values with plain sends (some with tokens that a
// chaos thread cancels, some with deadlines), try_send, and selects that
// offer one value to all three channels at once; consumers receive with
// recvs with tokens and deadlines (unbounded ones once closed), try_recv, try_select and selects over all
// three channels. The channels are a rendezvous, a ring of one slot and a
// ring of four, so hand-overs, full rings and empty rings all happen. When
// the producers are done the channels close and the consumers drain them.
//
// Replay a failure's choices with ./weft_stress --seed N --test-case="*channel*".
// Deadlines here are real steady_clock deadlines of 20-500 us: timing out is
// part of the scenario, and no assertion depends on how long anything took.
#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/select.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include "../support.hpp"
#include "scenario.hpp"
#include "seed.hpp"

using namespace std::chrono_literals;
using weft::wait_status;

namespace {

using weft_test::chaos_sources;
using weft_test::under_sanitizer;

struct run_counts {
  std::atomic<std::uint64_t> sent{0};
  std::atomic<std::uint64_t> refused{0};  // cancelled, timed out, or try_ said no
  std::atomic<std::uint64_t> by_select{0};
};

}  // namespace

TEST_CASE("channel and select: every value sent is received exactly once, under random cancellation") {
  const int rounds = under_sanitizer ? 8 : 20;
  const int producers = 3;
  const int consumers = 3;
  const int per_producer = static_cast<int>((under_sanitizer ? 1500 : 6000) * std::min<std::uint64_t>(weft_test::scale(), 100));
  for (int round = 0; round < rounds; ++round) {
    CAPTURE(round);
    weft::channel<int> rendezvous{0};
    weft::channel<int> one{1};
    weft::channel<int> four{4};
    weft::channel<int>* channels[3] = {&rendezvous, &one, &four};
    const auto total = static_cast<std::size_t>(producers * per_producer);
    std::vector<std::atomic<int>> sent(total);
    std::vector<std::atomic<int>> received(total);
    chaos_sources chaos{4};
    run_counts counts;
    std::atomic<bool> stop_chaos{false};

    std::thread chaos_thread([&] {
      std::mt19937_64 random{weft_test::seed() + static_cast<std::uint64_t>(round) * 7919};
      while (!stop_chaos.load()) {
        chaos.cancel_and_replace(random());
        std::this_thread::yield();
      }
    });

    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        std::mt19937_64 random{weft_test::seed() + static_cast<std::uint64_t>(round * 100 + p)};
        for (int i = 0; i < per_producer; ++i) {
          int value = p * per_producer + i;
          const int index = value;
          auto& target = *channels[random() % 3];
          bool ok = false;
          switch (random() % 6) {
            case 0: ok = target.send(std::move(value)) == wait_status::ok; break;
            case 1: ok = target.send(std::move(value), chaos.token(random())) == wait_status::ok; break;
            case 2:
              ok = target.send_for(std::move(value), std::chrono::microseconds(20 + random() % 480)) == wait_status::ok;
              break;
            case 3: ok = target.try_send(std::move(value)); break;
            default: {
              const auto result =
                  (random() % 2 == 0)
                      ? weft::select(chaos.token(random()), weft::on_send(rendezvous, value),
                                     weft::on_send(one, value), weft::on_send(four, value))
                      : weft::select_for(std::chrono::microseconds(20 + random() % 480),
                                         weft::on_send(rendezvous, value), weft::on_send(one, value),
                                         weft::on_send(four, value));
              ok = static_cast<bool>(result);
              if (ok) ++counts.by_select;
            }
          }
          if (ok) {
            sent[static_cast<std::size_t>(index)].store(1);
            ++counts.sent;
          } else {
            ++counts.refused;
          }
        }
      });
    }
    for (int c = 0; c < consumers; ++c) {
      threads.emplace_back([&, c] {
        std::mt19937_64 random{weft_test::seed() + static_cast<std::uint64_t>(round * 100 + 50 + c)};
        bool done[3] = {false, false, false};
        const auto take = [&](std::optional<int> value, int from) {
          if (value) {
            received[static_cast<std::size_t>(*value)].fetch_add(1);
          } else {
            done[from] = true;
          }
        };
        while (!(done[0] && done[1] && done[2])) {
          const auto from = static_cast<int>(random() % 3);
          switch (random() % 6) {
            case 0:
              // Unbounded waits only once closed: producers may all be
              // blocked on other channels, and nothing else would end them.
              if (done[from]) break;
              if (channels[from]->closed()) {
                take(channels[from]->recv(), from);
              } else {
                auto result = channels[from]->recv_for(std::chrono::microseconds(20 + random() % 480));
                if (result || result.status() == wait_status::closed) take(std::move(result).value(), from);
              }
              break;
            case 1:
              if (!done[from]) {
                auto result = channels[from]->recv(chaos.token(random()));
                if (result || result.status() == wait_status::closed) take(std::move(result).value(), from);
              }
              break;
            case 2:
              if (!done[from]) {
                if (auto value = channels[from]->try_recv()) take(std::move(value), from);
                else if (channels[from]->closed()) take(channels[from]->recv(), from);
              }
              break;
            case 3:
              (void)weft::try_select(weft::on_recv(rendezvous, [&](std::optional<int> v) { take(v, 0); }),
                                     weft::on_recv(one, [&](std::optional<int> v) { take(v, 1); }),
                                     weft::on_recv(four, [&](std::optional<int> v) { take(v, 2); }));
              break;
            default:
              (void)weft::select(chaos.token(random()),
                                 weft::on_recv(rendezvous, [&](std::optional<int> v) { take(v, 0); }),
                                 weft::on_recv(one, [&](std::optional<int> v) { take(v, 1); }),
                                 weft::on_recv(four, [&](std::optional<int> v) { take(v, 2); }));
          }
        }
      });
    }
    for (int p = 0; p < producers; ++p) threads[static_cast<std::size_t>(p)].join();
    for (auto* channel : channels) channel->close();
    for (std::size_t t = static_cast<std::size_t>(producers); t < threads.size(); ++t) threads[t].join();
    stop_chaos = true;
    chaos_thread.join();

    std::size_t lost = 0;
    std::size_t doubled = 0;
    std::size_t invented = 0;
    for (std::size_t v = 0; v < total; ++v) {
      const int times = received[v].load();
      if (sent[v].load() == 1) {
        lost += times == 0;
        doubled += times > 1;
      } else {
        invented += times != 0;
      }
    }
    CHECK(lost == 0);
    CHECK(doubled == 0);
    CHECK(invented == 0);
    CHECK(counts.sent + counts.refused == total);
    for (auto* channel : channels) {
      CHECK(channel->stats().waiting_senders == 0);
      CHECK(channel->stats().waiting_receivers == 0);
    }
    MESSAGE("round ", round, ": sent ", counts.sent.load(), " (", counts.by_select.load(), " by select), refused ",
            counts.refused.load());
  }
}
