# shellcheck shell=bash
# SPDX-License-Identifier: BSL-1.0
#
# Debian packages that weft's build, tests and benchmarks need. Sourced by
# scripts/test.sh and scripts/bench.sh:
#
#   source scripts/deps.sh && weft_ensure_deps
#
# weft_ensure_deps checks every package with dpkg-query and installs the
# missing ones with apt-get (as root, or through passwordless sudo).
# Otherwise it prints the apt-get line to run and returns non-zero.
#
# Note: libboost1.81-dev conflicts with libboost-dev (Boost 1.74 on Debian 12);
# never install libboost-dev next to it.

WEFT_DEB_PACKAGES=(
  cmake                # >= 3.25 (presets v6, workflows)
  ninja-build
  g++                  # GCC >= 12: dev, release, asan, bench builds
  clang                # Clang >= 14: tsan and clang builds
  libc++-dev           # LLVM's standard library, for the clang/tsan builds
  libc++abi-dev
  libclang-rt-14-dev   # Clang's sanitizer runtimes (only recommended by clang-14)
  libboost1.81-dev     # Boost.Asio >= 1.81 for weft/asio.hpp, examples, tests
  libconcurrentqueue-dev  # moodycamel::ConcurrentQueue (header-only)
  doctest-dev          # tests
  libbenchmark-dev     # benchmarks (Google Benchmark)
  libtbb-dev           # benchmarks: oneTBB as a comparison anchor
  python3              # scripts/bench_report.py
  postgresql           # tests: a throwaway server (scripts/postgres.sh) for the resource_pool tests
  libpq-dev            # tests, examples: PostgreSQL's C client (libpq-fe.h, libpq.pc)
  pkg-config           # CMake finds libpq through pkg-config (pkg_check_modules)
)

# Prints the packages of WEFT_DEB_PACKAGES that are not installed.
weft_missing_deps() {
  local pkg status
  for pkg in "${WEFT_DEB_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
      printf '%s\n' "$pkg"
    fi
  done
}

weft_ensure_deps() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "deps: not a Debian-based system; make sure these (or equivalents) are installed:" >&2
    echo "  ${WEFT_DEB_PACKAGES[*]}" >&2
    return 0
  fi

  local missing
  mapfile -t missing < <(weft_missing_deps)
  if ((${#missing[@]} == 0)); then
    echo "deps: all ${#WEFT_DEB_PACKAGES[@]} Debian packages are installed"
    return 0
  fi

  echo "deps: missing Debian packages: ${missing[*]}"
  if [[ " ${missing[*]} " == *" libboost1.81-dev "* ]] &&
     [[ "$(dpkg-query -W -f='${Status}' libboost-dev 2>/dev/null || true)" == "install ok installed" ]]; then
    echo "deps: note: libboost1.81-dev conflicts with the installed libboost-dev (Boost 1.74);" \
         "apt-get will remove libboost-dev" >&2
  fi
  local sudo=()
  if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "deps: not root and no passwordless sudo; install them as root with:" >&2
      echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
      return 1
    fi
  fi

  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get update ||
     ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
    echo "deps: apt-get failed; install these by hand: ${missing[*]}" >&2
    return 1
  fi

  mapfile -t missing < <(weft_missing_deps)
  if ((${#missing[@]} != 0)); then
    echo "deps: still missing after apt-get: ${missing[*]}" >&2
    return 1
  fi
  echo "deps: installed"
}
