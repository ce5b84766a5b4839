#!/usr/bin/env bash
# Records a flamegraph of `spool serve` (a separate process, as in the peer
# kit's `spool serve` rows) under each of the kit's workloads, driven by
# `spool bench --server`. Needs `perf` (Debian's linux-perf) and inferno
# (`cargo install inferno`). Writes docs/flamegraphs/<workload>.svg.
#
#   cargo build --release && docs/flamegraphs/record.sh [path/to/spool]
#
# FOLDED=dir also keeps each workload's folded stacks there.
set -euo pipefail
BIN=$(realpath "${1:-target/release/spool}")
OUT=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

record() {
  local name=$1; shift
  local d=$WORK/$name
  mkdir -p "$d"
  "$BIN" serve --data "$d/data" --listen 127.0.0.1:0 >"$d/serve.log" 2>&1 &
  local serve=$! addr=""
  for _ in $(seq 100); do
    addr=$(grep -oE '127\.0\.0\.1:[0-9]+' "$d/serve.log" | head -1 || true)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "spool serve did not start: $(cat "$d/serve.log")" >&2; exit 1; }
  perf record -q -F 999 --call-graph dwarf,16384 -p "$serve" -o "$d/perf.data" 2>/dev/null &
  local perf=$!
  sleep 0.5
  "$BIN" bench "$@" --server "$addr" --baseline-mib 1 --format text >"$d/bench.txt" 2>/dev/null
  kill -INT "$perf"; wait "$perf" || true
  kill "$serve"; wait "$serve" || true
  perf script -i "$d/perf.data" 2>/dev/null | inferno-collapse-perf >"$d/folded"
  [ -n "${FOLDED:-}" ] && cp "$d/folded" "$FOLDED/$name.folded"
  inferno-flamegraph <"$d/folded" --title "spool serve: bench $*" --width 1600 >"$OUT/$name.svg"
  # The figure: latency for e2e, throughput for the rest.
  local figure='^throughput'
  [ "$1" = e2e ] && figure='^latency'
  echo "$name: $(grep -m1 -E "$figure" "$d/bench.txt" || true)"
}

record durable produce --messages 2000000 --size 1024 --batch 1000 --fsync always
record relaxed-1k produce --messages 3000000 --size 1024 --batch 1000 --fsync never
record relaxed-100b produce --messages 20000000 --size 100 --batch 1000 --fsync never
record replay consume --messages 200000 --size 1024 --batch 1000 --duration 3
record e2e e2e --rate 10000 --duration 5 --fsync always
