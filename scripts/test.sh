#!/usr/bin/env bash
# SPDX-License-Identifier: BSL-1.0
#
# weft's CI: configure, build and test four builds, and report each.
#
#   dev      g++, Debug, -Werror; unit, stress, header, ODR, packaging tests, examples
#   release  g++, Release (-O3), -Werror; the same, and the benchmarks: the
#            warnings GCC gives only when it optimises, in every program
#            (the tests instantiate the templates with types no benchmark
#            uses), and the tests on optimised code
#   asan     g++, AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan     clang++ 14 + libc++, ThreadSanitizer, -Werror
#
# Each build's CTest starts a throwaway PostgreSQL server for the
# resource_pool tests (scripts/postgres.sh, in build/<preset>/postgres) and
# stops it afterwards; this script also stops it if a run is interrupted.
#
# Usage: scripts/test.sh [--fresh] [preset...]   (default: dev release asan tsan)
#   --fresh        reconfigure each build directory from scratch
#   WEFT_JOBS=N    build and test parallelism (default 2)
#
# Every build runs even if an earlier one fails; the exit status is non-zero
# if any failed. Logs: build/<preset>.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fresh=()
presets=()
for arg in "$@"; do
  case "$arg" in
    --fresh) fresh=(--fresh) ;;
    -h|--help) sed -n '3,23p' "$0"; exit 0 ;;
    -*) echo "test.sh: unknown option $arg" >&2; exit 2 ;;
    *) presets+=("$arg") ;;
  esac
done
((${#presets[@]})) || presets=(dev release asan tsan)
jobs="${WEFT_JOBS:-2}"

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
weft_ensure_deps || exit 1

mkdir -p build

# CTest's fixture cleanup stops each build's PostgreSQL server; an
# interrupted run skips it, so stop whatever is left on the way out (a later
# run would stop it too, before starting its own).
stop_postgres() {
  local preset
  for preset in "${presets[@]}"; do
    scripts/postgres.sh stop "build/$preset/postgres" || true
  done
}
trap stop_postgres EXIT

# LLVM 14's ThreadSanitizer cannot map its shadow memory when the kernel
# randomises mmap with more than 28 bits (vm.mmap_rnd_bits, raised by some
# newer kernels): run TSan binaries with address randomisation off there.
tsan_runner=()
rnd_bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)
if ((rnd_bits > 28)) && setarch "$(uname -m)" -R true 2>/dev/null; then
  tsan_runner=(setarch "$(uname -m)" -R)
fi

declare -A result=()
failed=()
seconds() { date +%s; }

run_preset() {
  local preset=$1 log="build/$1.log" runner=() t0 t1 t2 t3
  [[ "$preset" == tsan ]] && runner=("${tsan_runner[@]}")
  : >"$log"
  echo
  echo "=== $preset: configure, build, test ($(date -u '+%Y-%m-%d %H:%M:%S UTC')) ==="
  t0=$(seconds)
  if ! cmake --preset "$preset" "${fresh[@]}" 2>&1 | tee -a "$log"; then
    result[$preset]="FAIL at configure"
    return 1
  fi
  t1=$(seconds)
  if ! "${runner[@]}" cmake --build --preset "$preset" --parallel "$jobs" 2>&1 | tee -a "$log"; then
    result[$preset]="FAIL at build (configure $((t1 - t0))s, build $(($(seconds) - t1))s)"
    return 1
  fi
  t2=$(seconds)
  local test_status=0
  "${runner[@]}" ctest --preset "$preset" --output-on-failure --parallel "$jobs" 2>&1 |
    tee -a "$log" || test_status=$?
  t3=$(seconds)
  local summary
  summary=$(grep -E '^[0-9]+% tests passed' "$log" | tail -n 1 || true)
  local times="configure $((t1 - t0))s, build $((t2 - t1))s, tests $((t3 - t2))s"
  if ((test_status != 0)); then
    result[$preset]="FAIL at tests: ${summary:-ctest failed} ($times)"
    return 1
  fi
  result[$preset]="PASS: ${summary:-tests passed} ($times)"
}

start=$(seconds)
for preset in "${presets[@]}"; do
  if ! run_preset "$preset"; then
    failed+=("$preset")
  fi
done

echo
echo "=== summary ($(($(seconds) - start))s, logs in build/<preset>.log) ==="
for preset in "${presets[@]}"; do
  printf '%-8s %s\n' "$preset" "${result[$preset]}"
done
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all builds passed"
