// SPDX-License-Identifier: BSL-1.0
// The seed of a weft_stress run, so that a failing randomised scenario can
// be replayed:
//
//   ./weft_stress --seed 12345 --test-case="channel survives random close"
//
// tests/stress/main.cpp chooses the seed (from --seed N or the environment
// variable WEFT_TEST_SEED, otherwise std::random_device), prints it before
// any test runs, and prints it again if a test fails. A scenario should
// derive all of its randomness from seed(), e.g. std::mt19937_64 rng{seed()}
// (one generator per thread: seed each with seed() + thread index).
#pragma once

#include <cstdint>

namespace weft_test {

// The seed of this run. The same for every call during one run.
std::uint64_t seed();

// How much work a stress scenario should do, as a multiplier of its short
// default: 1 in CI, larger on request (--scale N or WEFT_TEST_SCALE=N) for
// long runs. Scenarios multiply their iteration counts by it.
std::uint64_t scale();

}  // namespace weft_test
