#!/usr/bin/env bash
# Restart time and memory with a full broker store (issue #17): how long from exec to the
# first CONNACK, and the RSS once everything is loaded, for an empty store and for one
# near its bounds: RETAINED retained messages of RETAINED_SIZE bytes (the defaults are
# max_retained_messages and about max_retained_bytes) plus SESSIONS offline persistent
# sessions each owed QUEUED messages of QUEUED_SIZE bytes (stored once, shared).
#
#   bench/store_restart.sh                 (about 2 minutes)
#   SESSIONS=20 QUEUED=2000 bench/store_restart.sh
#
# The broker is started and killed by PID; it listens on 127.0.0.1 only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUTPOST=${OUTPOST_BIN:-$TARGET_DIR/release/outpost}
RETAINED=${RETAINED:-10000}
RETAINED_SIZE=${RETAINED_SIZE:-6500}
SESSIONS=${SESSIONS:-100}
QUEUED=${QUEUED:-5000}
QUEUED_SIZE=${QUEUED_SIZE:-1024}
PORT=${PORT:-18850}
[[ -n ${OUTPOST_BIN:-} ]] || (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway)
WORK=$(mktemp -d)
PID=
cleanup() { [[ -n $PID ]] && kill -9 "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
cat > "$WORK/outpost.toml" <<EOF
state_dir = "$WORK/state"
[log]
level = "warn"
[broker]
listeners = [{ bind = "127.0.0.1:$PORT" }]
sys_interval = "0s"
EOF

connack() { # one CONNECT/CONNACK exchange over bash's /dev/tcp; fails if none
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || return 1
    printf '\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02pr' >&3
    local b
    IFS= read -r -t 2 -N 1 b <&3 || { exec 3<&-; return 1; }
    exec 3<&-
    [[ $b == $'\x20' ]]
}
start() { # sets MS: ms from exec to the first CONNACK
    local t0 t1
    t0=$(date +%s%N)
    "$OUTPOST" --config "$WORK/outpost.toml" 2>>"$WORK/log" & PID=$!
    for _ in $(seq 1 6000); do
        connack 2>/dev/null && break
        sleep 0.005
    done
    t1=$(date +%s%N)
    MS=$(((t1 - t0) / 1000000))
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
store_mib() { du -cm "$WORK/state"/broker.sqlite "$WORK/state"/broker.sqlite-wal 2>/dev/null | awk 'END {print $1}'; }

start; sleep 1
echo "empty store:  first CONNACK after ${MS} ms, RSS $(rss_kib) KiB"
python3 "$ROOT/bench/store_fill.py" "$PORT" retained "$RETAINED" "$RETAINED_SIZE"
python3 "$ROOT/bench/store_fill.py" "$PORT" sessions "$SESSIONS" 'q/#'
python3 "$ROOT/bench/store_fill.py" "$PORT" publish "$QUEUED" "$QUEUED_SIZE" q/x
echo "filled:       RSS $(rss_kib) KiB, store $(store_mib) MiB on disk (database and WAL; the 4 MiB disk reserve beside them not counted)"
kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=
for run in 1 2 3; do
    start; sleep 2
    echo "restart $run:    first CONNACK after ${MS} ms, RSS $(rss_kib) KiB once loaded"
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
echo "($RETAINED retained x $RETAINED_SIZE B, $SESSIONS sessions x $QUEUED queued x $QUEUED_SIZE B; $(nproc) cores)"
