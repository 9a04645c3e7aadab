// SPDX-License-Identifier: BSL-1.0
// detail::bounded_ring's room check, which a worker_pool producer waiting for
// room polls instead of the ring's size.
#include <weft/detail/bounded_ring.hpp>

#include <doctest/doctest.h>

#include <cstdint>

namespace {

using ring = weft::detail::bounded_ring<int>;

void push(ring& r, int value) {
  int moved = value;
  REQUIRE(r.try_push(moved));
}

int pop(ring& r) {
  int value = -1;
  REQUIRE(r.try_pop(value));
  return value;
}

}  // namespace

TEST_CASE("bounded_ring: has_room_for says whether the next positions are free") {
  // 3 divides instead of masking, 4 masks.
  for (const std::size_t capacity : {std::size_t{3}, std::size_t{4}}) {
    CAPTURE(capacity);
    ring r{capacity};
    for (std::size_t count = 1; count <= capacity; ++count) CHECK(r.has_room_for(count));
    push(r, 1);
    CHECK(r.has_room_for(capacity - 1));
    CHECK_FALSE(r.has_room_for(capacity));
    for (std::size_t i = 1; i < capacity; ++i) push(r, 1 + static_cast<int>(i));
    CHECK_FALSE(r.has_room_for(1));
    CHECK(pop(r) == 1);
    CHECK(r.has_room_for(1));
    CHECK_FALSE(r.has_room_for(2));
    // Across laps: drain, then fill and drain twice more.
    while (r.claimed_unpopped()) (void)pop(r);
    for (int lap = 0; lap < 2; ++lap) {
      CHECK(r.has_room_for(capacity));
      for (std::size_t i = 0; i < capacity; ++i) push(r, static_cast<int>(i));
      CHECK_FALSE(r.has_room_for(1));
      for (std::size_t i = 0; i < capacity; ++i) CHECK(pop(r) == static_cast<int>(i));
    }
    // The closed bit in the tail is not a position.
    push(r, 7);
    CHECK(r.close());
    CHECK(r.has_room_for(capacity - 1));
    CHECK_FALSE(r.has_room_for(capacity));
  }
}

TEST_CASE("bounded_ring: has_room_for judges by the last slot, which a consumer may free first") {
  ring r{4};
  for (int i = 0; i < 4; ++i) push(r, i);
  std::uint64_t first = 0;
  REQUIRE(r.try_claim(2, first) == 2);
  CHECK(first == 0);
  int value = -1;
  // Two consumers' claims, freed out of order: the slot of position 1 first.
  r.take_claimed(first + 1, value, [](const weft::detail::no_cell&, std::uint64_t) noexcept {});
  CHECK(value == 1);
  CHECK_FALSE(r.has_room_for(1));  // position 4 is slot 0, still held
  CHECK(r.has_room_for(2));        // position 5 is slot 1, free: the caller's push waits for slot 0
  CHECK_FALSE(r.full());
  r.take_claimed(first, value, [](const weft::detail::no_cell&, std::uint64_t) noexcept {});
  CHECK(value == 0);
  CHECK(r.has_room_for(1));
  CHECK(r.has_room_for(2));
  CHECK_FALSE(r.has_room_for(3));
}
