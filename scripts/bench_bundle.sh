#!/usr/bin/env bash
# SPDX-License-Identifier: BSL-1.0
#
# Packs the benchmark executables for a machine that has none of weft's
# Debian packages (a larger machine lent for a scaling run, say): builds the
# `bench` preset, copies every benchmark executable and the shared libraries
# it needs beyond the C library (libbenchmark, libtbb, libstdc++) into one
# directory, and writes a run.sh beside them.
#
# Usage: scripts/bench_bundle.sh [DIR]      (default: build/bundle)
#   then, on the other machine, from the copied DIR:
#     bash DIR/run.sh RESULTS [Google Benchmark flags...]
#       e.g. bash build/bundle/run.sh "$OUT" --benchmark_filter='pool_tiny|group_spawn|fan_out'
#   and back here:
#     python3 scripts/bench_report.py RESULTS
#
# run.sh runs each executable once with 3 repetitions (aggregates only,
# interleaved), as bench.sh does, and writes RESULTS/<name>.json, plus
# RESULTS/machine.txt (CPU count and model) and RESULTS/host.txt (a cache
# line's time between two CPUs, before and after). Unlike bench.sh it runs an
# executable and its __variant builds one after the other, not in
# alternating rounds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bundle=${1:-build/bundle}

# shellcheck source=scripts/deps.sh
source scripts/deps.sh
weft_ensure_deps || exit 1

cmake --preset bench
cmake --build --preset bench --parallel "${WEFT_JOBS:-2}"

mapfile -t benchmarks < <(grep -v '^$' build/bench/weft_benchmarks.txt)
if ((${#benchmarks[@]} == 0)); then
  echo "bench_bundle.sh: no benchmark executables were built" >&2
  exit 1
fi

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib"
cp "${benchmarks[@]}" "$bundle/bin/"
cp build/bench/benchmarks/cache_line_probe "$bundle/"
# The C library and its loader stay the other machine's own: they must
# match its kernel interface, and newer ones run older programs.
ldd "${benchmarks[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' |
  while read -r library; do cp -L "$library" "$bundle/lib/"; done

cat >"$bundle/run.sh" <<'EOF'
#!/usr/bin/env bash
# Written by scripts/bench_bundle.sh: runs every benchmark executable in
# bin/ with the libraries in lib/; JSON to the directory given first.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
results=${1:?usage: run.sh RESULTS [Google Benchmark flags...]}
shift
mkdir -p "$results"
{
  echo "cpus: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo || true
  date -u '+%Y-%m-%d %H:%M UTC'
} >"$results/machine.txt"
echo "start $(LD_LIBRARY_PATH="$here/lib" "$here/cache_line_probe")" >"$results/host.txt"
failed=()
for exe in "$here"/bin/*; do
  name=$(basename "$exe")
  echo "=== $name ==="
  LD_LIBRARY_PATH="$here/lib" "$exe" --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
    --benchmark_enable_random_interleaving=true \
    --benchmark_out_format=json --benchmark_out="$results/$name.json" "$@" || failed+=("$name")
done
echo "end $(LD_LIBRARY_PATH="$here/lib" "$here/cache_line_probe")" >>"$results/host.txt"
if ((${#failed[@]})); then
  echo "run.sh: these benchmark executables failed: ${failed[*]}" >&2
  exit 1
fi
EOF
chmod +x "$bundle/run.sh"
echo "bench_bundle.sh: ${#benchmarks[@]} executables and $(find "$bundle/lib" -type f | wc -l) libraries in $bundle ($(du -sh "$bundle" | cut -f1))"
