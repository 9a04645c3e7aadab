#!/usr/bin/env bash
# SPDX-License-Identifier: BSL-1.0
#
# Builds the `bench` preset (Release, g++), runs every benchmark executable
# with 3 repetitions (aggregates only), keeps the raw JSON under build/bench/,
# and prints one table of weft vs. its alternatives (scripts/bench_report.py,
# also written to build/bench/report.md). See benchmarks/README.md.
#
# Usage: scripts/bench.sh [Google Benchmark flags...]
#   e.g. scripts/bench.sh --benchmark_filter=semaphore
#        scripts/bench.sh --benchmark_repetitions=5 --benchmark_min_time=1
#   WEFT_JOBS=N   build parallelism (default 2)
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
rm -f "$out"/*.json "$out/report.md"

echo "bench.sh: ${#benchmarks[@]} benchmark executables on $(nproc) cores ($(uname -n)), $(date -u '+%Y-%m-%d %H:%M UTC')"
failed=()
for exe in "${benchmarks[@]}"; do
  name=$(basename "$exe")
  echo
  echo "=== $name ==="
  if ! "$exe" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
       --benchmark_out_format=json --benchmark_out="$out/$name.json" "$@"; then
    failed+=("$name")
  fi
done

echo
python3 scripts/bench_report.py "$out"

if ((${#failed[@]})); then
  echo "bench.sh: these benchmark executables failed: ${failed[*]}" >&2
  exit 1
fi
