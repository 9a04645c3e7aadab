#!/usr/bin/env bash
# SPDX-License-Identifier: BSL-1.0
#
# A throwaway PostgreSQL server for weft's resource_pool tests and example.
#
#   scripts/postgres.sh start DIR PORT   # prints the libpq connection string
#   scripts/postgres.sh stop DIR         # stops it and removes DIR
#
# start makes a new cluster in DIR (initdb), listening on 127.0.0.1:PORT
# only, with its Unix socket in DIR, trust authentication for the superuser
# `postgres`, and no durability (fsync off: the data is thrown away), starts
# it (pg_ctl -w) and prints
#   host=127.0.0.1 port=PORT user=postgres dbname=postgres
# A server left in DIR by an earlier run that was killed is stopped first.
# stop is idempotent: a missing DIR or a server that is already gone is fine.
# Both refuse a DIR that holds files but not start's marker (.weft-postgres),
# so a wrong argument never deletes anything else.
#
# The binaries are taken from WEFT_PG_BINDIR if set, else from the newest
# /usr/lib/postgresql/*/bin (Debian, Ubuntu), else from PATH.
#
# PostgreSQL refuses to run as root. Run as root (CI), the server runs as the
# `postgres` system user that Debian's package creates, and DIR is given to
# it. If that user cannot reach DIR (a checkout under /root, mode 700), the
# cluster goes to a directory under /tmp instead and DIR records where.
#
# CTest runs start and stop as the setup and cleanup of the `weft_postgres`
# fixture (tests/CMakeLists.txt).
set -euo pipefail

readonly install_hint="install PostgreSQL (Debian/Ubuntu, as root): apt-get install -y postgresql libpq-dev"

die() {
  echo "postgres.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '4,7p' "$0" >&2
  exit 2
}

# Sets `bindir` to a directory holding initdb and pg_ctl.
find_bindir() {
  if [[ -n "${WEFT_PG_BINDIR:-}" ]]; then
    [[ -x "$WEFT_PG_BINDIR/initdb" && -x "$WEFT_PG_BINDIR/pg_ctl" ]] ||
      die "WEFT_PG_BINDIR=$WEFT_PG_BINDIR has no initdb and pg_ctl"
    bindir=$WEFT_PG_BINDIR
    return
  fi
  local candidates=() candidate
  shopt -s nullglob
  for candidate in /usr/lib/postgresql/*/bin; do
    [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]] && candidates+=("$candidate")
  done
  shopt -u nullglob
  if ((${#candidates[@]})); then
    bindir=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
    return
  fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    bindir=$(dirname "$(command -v initdb)")
    return
  fi
  die "the PostgreSQL server programs (initdb, pg_ctl) are not installed: none in" \
      "/usr/lib/postgresql/*/bin or on PATH. To run the PostgreSQL tests, $install_hint" \
      "(or set WEFT_PG_BINDIR to the directory that holds initdb and pg_ctl)."
}

# Runs a command as the user the server runs as: the caller, or `postgres`
# when the caller is root. From / so that a working directory the postgres
# user cannot read does not bother initdb or pg_ctl.
as_server_user() {
  if ((EUID == 0)); then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && "$@")
  fi
}

# start marks DIR with this file; stop deletes only a DIR that has it (or
# an empty one), so a wrong argument never deletes someone else's files.
readonly marker=.weft-postgres

# The directory that holds the cluster of DIR (DIR itself, or the /tmp
# directory recorded in DIR/location).
cluster_base() {
  local dir=$1 location
  if [[ -f "$dir/location" ]]; then
    location=$(cat "$dir/location")
    [[ "$location" == /tmp/weft-postgres.* ]] || die "$dir/location names $location, not a directory of postgres.sh's"
    printf '%s\n' "$location"
  else
    printf '%s\n' "$dir"
  fi
}

# Fails unless DIR is missing, empty, or made by start.
check_ours() {
  local dir=$1
  [[ -e "$dir" ]] || return 0
  [[ -d "$dir" ]] || die "$dir is not a directory"
  [[ -e "$dir/$marker" || -z "$(ls -A -- "$dir")" ]] ||
    die "$dir was not made by postgres.sh (no $marker in it); refusing to delete it. Give a new directory."
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_stop() {
  local dir=$1 base pid
  [[ -e "$dir" ]] || return 0
  check_ours "$dir"
  base=$(cluster_base "$dir")
  if [[ -f "$base/data/postmaster.pid" ]]; then
    local bindir=""
    if (find_bindir) >/dev/null 2>&1; then
      find_bindir
      # Immediate: the data is thrown away, so there is nothing to flush.
      if ! as_server_user "$bindir/pg_ctl" -D "$base/data" -m immediate -w -t 60 stop >/dev/null 2>&1; then
        # pg_ctl says no when the server is already gone (a stale pid file);
        # a server that is still there but did not stop is killed.
        pid=$(head -n 1 "$base/data/postmaster.pid" 2>/dev/null || true)
        if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == postgres* ]]; then
          echo "postgres.sh: pg_ctl could not stop the server in $base/data (pid $pid); killing it" >&2
          kill -KILL "$pid" 2>/dev/null || true
        fi
      fi
    fi
  fi
  if [[ "$base" != "$dir" ]]; then
    rm -rf -- "$base"
  fi
  rm -rf -- "$dir"
}

cmd_start() {
  local dir=$1 port=$2 base bindir
  if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    die "PORT must be 1..65535, got '$port'"
  fi
  find_bindir
  if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
    die "running as root, and there is no 'postgres' system user to run the server as" \
        "(PostgreSQL refuses to run as root; Debian's package creates the user): $install_hint"
  fi

  dir=$(realpath -m -- "$dir")
  check_ours "$dir"
  cmd_stop "$dir" # a server left behind by a run that was killed before its cleanup
  if port_in_use "$port"; then
    die "port $port on 127.0.0.1 is taken by another program (see: ss -ltnp 'sport = :$port')." \
        "Stop it, or give the tests another port: cmake -DWEFT_PG_PORT=<port> (tests/CMakeLists.txt)."
  fi

  mkdir -p -- "$dir"
  : >"$dir/$marker"
  base=$dir
  if ((EUID == 0)); then
    chown postgres: "$dir"
    if ! runuser -u postgres -- test -w "$dir" -a -x "$dir"; then
      # The postgres user cannot reach DIR through its parents.
      base=$(mktemp -d /tmp/weft-postgres.XXXXXX)
      chown postgres: "$base"
      printf '%s\n' "$base" >"$dir/location"
    fi
  fi

  # The socket path must fit in sockaddr_un (107 bytes); a deeper DIR gets
  # TCP only, which is all the tests use.
  local sockets=$base
  if ((${#base} + 20 > 100)); then
    sockets=""
  fi

  if ! as_server_user "$bindir/initdb" -D "$base/data" --username=postgres --auth=trust \
      --encoding=UTF8 --locale=C --no-sync >"$base/initdb.log" 2>&1; then
    cat "$base/initdb.log" >&2
    die "initdb failed (log above)"
  fi
  cat >>"$base/data/postgresql.conf" <<EOF

# scripts/postgres.sh: a throwaway server for weft's tests.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sockets'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
EOF

  if ! as_server_user "$bindir/pg_ctl" -D "$base/data" -l "$base/server.log" -w -t 60 start >/dev/null 2>&1; then
    tail -n 20 "$base/server.log" >&2 || true
    cmd_stop "$dir"
    die "the server in $base/data did not start (its log above)"
  fi
  echo "host=127.0.0.1 port=$port user=postgres dbname=postgres"
}

(($# >= 1)) || usage
case "$1" in
  start)
    (($# == 3)) || usage
    cmd_start "$2" "$3"
    ;;
  stop)
    (($# == 2)) || usage
    cmd_stop "$2"
    ;;
  *) usage ;;
esac
