#!/usr/bin/env bash
# Stands in for the spool binary in the peer kit so that every spool row of
# the kit measures a separate `spool serve` process: each `spool bench` call
# without `--server` gets a fresh `spool serve` (its own data directory on
# the same disk, loopback listener, no metrics, gRPC or socket.io) and
# `--server` pointing at it. Calls that already name a `--server` (the kit's
# own "spool serve process" rows) and any other command pass through. The
# broker it starts serves the native protocol only: `--transport grpc`
# calls pass through to the in-process broker too.
#
#   cargo build --release
#   P=~/.cache/spool-peers; IGGY_DIR=$P/iggy NATSBENCH=$P/natsbench \
#     SPOOL_BIN=docs/peers/serve.sh ../shared/peers/run.sh
#
# SPOOL_REAL names the binary (default target/release/spool next to this
# repository's docs/).
set -euo pipefail
REAL=${SPOOL_REAL:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/spool}

through=""
[ "${1:-}" = bench ] || through=1
prev=""
for a in "$@"; do
  case "$a" in --server|--server=*|--transport=grpc) through=1 ;; esac
  [ "$prev" = --transport ] && [ "$a" = grpc ] && through=1
  prev=$a
done
if [ -n "$through" ]; then
  exec "$REAL" "$@"
fi

WORK=$(mktemp -d)
SERVE=""
cleanup() {
  if [ -n "$SERVE" ]; then
    kill "$SERVE" 2>/dev/null || true
    # A broker that does not stop within 10 s is killed.
    for _ in $(seq 100); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVE" 2>/dev/null || true
    wait "$SERVE" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$REAL" serve --data "$WORK/data" --listen 127.0.0.1:0 --metrics off --grpc off \
  --socketio off >"$WORK/serve.log" 2>&1 &
SERVE=$!
addr=""
for _ in $(seq 100); do
  addr=$(grep -oE 'listening on 127\.0\.0\.1:[0-9]+' "$WORK/serve.log" | head -1 \
    | grep -oE '127\.0\.0\.1:[0-9]+' || true)
  [ -n "$addr" ] && break
  kill -0 "$SERVE" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "spool serve did not start: $(cat "$WORK/serve.log")" >&2
  exit 1
fi
"$REAL" "$@" --server "$addr"
