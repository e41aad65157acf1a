#!/usr/bin/env bash
# Side-by-side benchmark of Outpost and Mosquitto on loopback, in one run.
#
#   bench/compare.sh            full matrix, REPEATS runs of each (default 3), ~12 min on 2 cores
#   bench/compare.sh --quick    one short run of each scenario, a smoke test (~2 min)
#
# Environment:
#   REPEATS=3                   runs per scenario and broker (medians are reported)
#   BROKERS="outpost mosquitto" which brokers to run (the table always shows outpost/mosquitto)
#   PROTOCOL=3.1.1              MQTT version of every client (3.1.1 or 5)
#   OUT=bench/results/<utc>     where results.jsonl, table.md and machine.txt go
#   CARGO_TARGET_DIR            where cargo builds (default: <repo>/target)
#   OUTPOST_BIN=path            use this outpost binary instead of building it
#
# Each broker is started fresh by outpost-bench for every run (and killed by PID after
# it), so peak RSS and CPU belong to that run alone. Runs alternate between the brokers,
# and the order flips every repetition, so slow drift of a shared machine hits both.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

BROKERS=${BROKERS:-"outpost mosquitto"}
PROTOCOL=${PROTOCOL:-3.1.1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
OUTPOST_PORT=18830
MOSQUITTO_PORT=18831

if [[ $QUICK == 1 ]]; then
    REPEATS=${REPEATS:-1}
    THROUGHPUT_TIME=2s
    LATENCY_MESSAGES=2000   # 2 s at 1,000 msg/s
    IDLE_COUNTS="1000"
    STARTUP_RUNS=3
else
    REPEATS=${REPEATS:-3}
    THROUGHPUT_TIME=5s
    LATENCY_MESSAGES=10000  # 10 s at 1,000 msg/s
    IDLE_COUNTS="1000 10000"
    STARTUP_RUNS=5
fi
THROUGHPUT_MESSAGES=50000000  # the time bound ends these runs; the count bound is a backstop
PAYLOAD=64
INFLIGHT=20

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

# --- Mosquitto: install if missing ------------------------------------------------------
find_mosquitto() {
    command -v mosquitto 2>/dev/null || { [[ -x /usr/sbin/mosquitto ]] && echo /usr/sbin/mosquitto; } || true
}
MOSQUITTO=$(find_mosquitto)
if [[ -z $MOSQUITTO && " $BROKERS " == *" mosquitto "* ]]; then
    echo "mosquitto not found: installing it with apt-get" >&2
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    MOSQUITTO=$(find_mosquitto)
    [[ -n $MOSQUITTO ]] || { echo "mosquitto still missing after apt-get install" >&2; exit 1; }
fi

# --- Build ------------------------------------------------------------------------------
cd "$ROOT"
echo "building outpost-bench (release) ..." >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-bench
BENCH=$TARGET_DIR/release/outpost-bench
if [[ " $BROKERS " == *" outpost "* ]]; then
    if [[ -n ${OUTPOST_BIN:-} ]]; then
        OUTPOST=$OUTPOST_BIN
    else
        echo "building outpost (release) ..." >&2
        CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway
        OUTPOST=$TARGET_DIR/release/outpost
    fi
fi

# 10,000 idle clients need 10,000 sockets in the bench and as many in the broker, which
# inherits this limit from outpost-bench.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- Broker configurations --------------------------------------------------------------
# Mosquitto as in its own published benchmarks: no persistence, no logging. Both brokers
# get the same limits:
#   inflight 20         QoS 1/2 messages in flight towards one client (Mosquitto's default
#                       max_inflight_messages; Outpost's max_inflight) and, on 5.0, the
#                       Receive Maximum announced to publishers
#   queue 100000        messages queued per client beyond that (the bench's end-to-end
#                       window keeps real queues far below it)
#   TCP_NODELAY on      Outpost always sets it; Mosquitto only with set_tcp_nodelay, and
#                       without it Mosquitto's latency would measure Nagle's algorithm
#   $SYS every 10 s     both defaults
# shellcheck source=bench/broker_configs.sh
source "$ROOT/bench/broker_configs.sh"
write_broker_configs "$OUT" "$OUTPOST_PORT" "$MOSQUITTO_PORT" "$INFLIGHT"

broker_cmd() {
    case "$1" in
        outpost) echo "$OUTPOST --config $OUT/outpost.toml" ;;
        mosquitto) echo "$MOSQUITTO -c $OUT/mosquitto.conf" ;;
    esac
}
broker_port() {
    case "$1" in
        outpost) echo $OUTPOST_PORT ;;
        mosquitto) echo $MOSQUITTO_PORT ;;
    esac
}

# --- Machine ----------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores online)"
    echo "memory: $(free -m | awk '/Mem:/ {print $2 " MiB"}')"
    echo "kernel: $(uname -sr)"
    echo "rustc: $(rustc --version)"
    [[ -n $MOSQUITTO ]] && echo "mosquitto: $($MOSQUITTO -h 2>&1 | head -1)"
    echo "outpost: ${OUTPOST:-not run}"
    dirty=""; [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && dirty=" plus uncommitted changes"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)$dirty"
    [[ -n ${OUTPOST:-} ]] && echo "outpost binary: $(stat -c %s "$OUTPOST") bytes"
    echo "protocol: MQTT $PROTOCOL; repeats: $REPEATS; quick: $QUICK"
    [[ -n $MOSQUITTO ]] && echo "mosquitto shared libraries: $(ldd "$MOSQUITTO" | awk '/=>/ {print $1}' | tr '\n' ' ')"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- Running ----------------------------------------------------------------------------
FAILURES=0
# run MODE LABEL BROKER [mode options...]: one measurement, appended to results.jsonl.
run() {
    local mode=$1 label=$2 broker=$3; shift 3
    local port; port=$(broker_port "$broker")
    # shellcheck disable=SC2046  # the broker command is split into words on purpose
    if ! "$BENCH" "$mode" --addr "127.0.0.1:$port" --protocol "$PROTOCOL" \
            --label "$label" --broker-name "$broker" --json "$RESULTS" "$@" \
            -- $(broker_cmd "$broker") >/dev/null; then
        echo "FAILED: $mode $label on $broker" >&2
        FAILURES=$((FAILURES + 1))
    fi
}

# each LABEL MODE [options...]: every broker, REPEATS times, alternating and flipping order.
each() {
    local label=$1 mode=$2; shift 2
    local order rep b
    for rep in $(seq 1 "$REPEATS"); do
        order=$BROKERS
        if (( rep % 2 == 0 )); then order=$(echo "$BROKERS" | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}'); fi
        for b in $order; do run "$mode" "$label" "$b" "$@"; done
    done
}

START=$(date +%s)
for shape in "1 1" "10 10" "1 100"; do
    read -r pubs subs <<< "$shape"
    for qos in 0 1 2; do
        each "${pubs}→${subs} QoS$qos" load -p "$pubs" -s "$subs" -q "$qos" --payload $PAYLOAD \
            --inflight $INFLIGHT -n $THROUGHPUT_MESSAGES -d $THROUGHPUT_TIME
    done
done
for qos in 0 1 2; do
    each "latency 1→1 QoS$qos @1000/s" load -p 1 -s 1 -q "$qos" --payload $PAYLOAD \
        --inflight $INFLIGHT --rate 1000 -n $LATENCY_MESSAGES -d 30s
done
for n in $IDLE_COUNTS; do
    each "idle $n clients" idle -c "$n" --hold 3s
done
REPEATS=1 each "startup" startup --runs $STARTUP_RUNS

echo >&2
echo "finished in $(( $(date +%s) - START )) s; results in $OUT" >&2
"$BENCH" table "$RESULTS" --candidate outpost --baseline mosquitto | tee "$OUT/table.md"
if (( FAILURES > 0 )); then
    echo "$FAILURES run(s) failed (loss at QoS 1/2, or a broker error): see stderr above" >&2
    exit 1
fi
