#!/usr/bin/env bash
# SPDX-License-Identifier: BSL-1.0
#
# Builds the `bench` preset (Release, g++), runs every benchmark executable
# with 3 repetitions (interleaved, aggregates only; an executable built in
# variants runs in alternating rounds with them, see below), keeps the raw
# JSON under build/bench/, and prints one table of weft vs. its
# alternatives (scripts/bench_report.py, also written to
# build/bench/report.md). See benchmarks/README.md.
#
# Usage: scripts/bench.sh [Google Benchmark flags...]
#   e.g. scripts/bench.sh --benchmark_filter=semaphore
#        scripts/bench.sh --benchmark_repetitions=5 --benchmark_min_time=1
#   WEFT_JOBS=N           build parallelism (default 2)
#   WEFT_BENCH_ROUNDS=N   rounds for executables built in variants (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
weft_ensure_deps || exit 1

out=build/bench
cmake --preset bench
cmake --build --preset bench --parallel "${WEFT_JOBS:-2}"

list="$out/weft_benchmarks.txt"
mapfile -t benchmarks < <(grep -v '^$' "$list" 2>/dev/null || true)
if ((${#benchmarks[@]} == 0)); then
  echo "bench.sh: no benchmarks to run (benchmarks/*_bench.cpp or benchmarks/bench_*.cpp)"
  exit 0
fi

# Results of an earlier run would mix into the report.
rm -f "$out"/*.json "$out/report.md" "$out/host.txt"

# How long a cache line takes between two CPUs, at the start and at the
# end: on a shared VM it moves by 4x within minutes, and weft's pool with
# it (benchmarks/cache_line_probe.cpp). The report prints both.
note_host() {
  if [[ -x $out/benchmarks/cache_line_probe ]]; then
    echo "$1 $("$out/benchmarks/cache_line_probe")" >>"$out/host.txt"
  fi
}

echo "bench.sh: ${#benchmarks[@]} benchmark executables on $(nproc) cores ($(uname -n)), $(date -u '+%Y-%m-%d %H:%M UTC')"
failed=()
note_host start
# One run of an executable: 3 repetitions, aggregates only, JSON to $2.
# The repetitions of all its benchmarks run in a random order (Google
# Benchmark's random interleaving), not each benchmark's three back to
# back: this host has windows of tens of seconds in which weft's pool runs
# at half speed while a mutex pool does not, and a ratio must not depend on
# which rows such a window happened to fall on. Four sequential runs of
# pool_tiny_tasks gave weft 2.33-6.95x the mutex+condvar pool at 2 workers
# (two below 3x); four interleaved runs between them gave 4.46-10.8x.
run_benchmark() {
  local exe=$1 json=$2
  shift 2
  "$exe" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
    --benchmark_enable_random_interleaving=true \
    --benchmark_out_format=json --benchmark_out="$json" "$@"
}
# `<exe>__<variant>` is <exe> built another way (registry_bench__no_registry:
# with WEFT_NO_REGISTRY), and its rows are compared with <exe>'s. Run one
# after the other, they would be minutes apart, and on a shared VM the
# machine's speed drifts by more than some of those ratios (the registry's
# 3% target): so the two run in alternating rounds, and the report takes
# the median of each row's rounds.
rounds=${WEFT_BENCH_ROUNDS:-3}
for exe in "${benchmarks[@]}"; do
  name=$(basename "$exe")
  [[ $name == *__* ]] && continue
  variants=()
  for other in "${benchmarks[@]}"; do
    [[ $(basename "$other") == "${name}__"* ]] && variants+=("$other")
  done
  if ((${#variants[@]} == 0)); then
    echo
    echo "=== $name ==="
    run_benchmark "$exe" "$out/$name.json" "$@" || failed+=("$name")
    continue
  fi
  for ((round = 1; round <= rounds; ++round)); do
    for each in "$exe" "${variants[@]}"; do
      each_name=$(basename "$each")
      echo
      echo "=== $each_name (round $round of $rounds) ==="
      run_benchmark "$each" "$out/${each_name}__round$round.json" "$@" || failed+=("$each_name")
    done
  done
done

note_host end
echo
python3 scripts/bench_report.py "$out"

if ((${#failed[@]})); then
  echo "bench.sh: these benchmark executables failed: ${failed[*]}" >&2
  exit 1
fi
