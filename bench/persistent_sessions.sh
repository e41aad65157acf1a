#!/usr/bin/env bash
# What persistence costs: 1 publisher -> 1 subscriber whose session is persistent (3.1.1
# clean session off), QoS 1 and 2, Outpost with its store (the default) against Mosquitto
# with `persistence true`. Both keep the subscriber's session; they differ in when it is
# on disk: Outpost commits every message it keeps before the publisher's PUBACK/PUBREC,
# Mosquitto writes its in-memory database every `autosave_interval` (30 min) and at exit.
#
#   bench/persistent_sessions.sh             3 repeats, ~2 minutes
#   REPEATS=5 OUT=/tmp/pst bench/persistent_sessions.sh
#
# Every run starts each broker fresh on an empty state directory and kills it by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/bench/results/persistent-$(date -u +%Y%m%dT%H%M%SZ)}
REPEATS=${REPEATS:-3}
OUTPOST=${OUTPOST_BIN:-$TARGET_DIR/release/outpost}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
mkdir -p "$OUT"
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-bench)
[[ -n ${OUTPOST_BIN:-} ]] || (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway)
BENCH=$TARGET_DIR/release/outpost-bench
J=$OUT/results.jsonl
: > "$J"

# shellcheck source=bench/broker_configs.sh
source "$ROOT/bench/broker_configs.sh"
write_broker_configs "$OUT" 18830 18831 20
# The same Mosquitto limits, with its persistence on.
sed -e 's/^persistence false$/persistence true/' "$OUT/mosquitto.conf" > "$OUT/mosquitto-persistent.conf"
echo "persistence_location $OUT/mosquitto-state/" >> "$OUT/mosquitto-persistent.conf"
# Started as root, Mosquitto would drop to its own user and fail to write its database.
echo "user root" >> "$OUT/mosquitto-persistent.conf"

one() { # broker label -- args...
    local b=$1 label=$2; shift 2
    rm -rf "$OUT/outpost-state" "$OUT/mosquitto-state"
    mkdir -p "$OUT/outpost-state" "$OUT/mosquitto-state"
    case $b in
        outpost) "$BENCH" load --addr 127.0.0.1:18830 --broker-name outpost --label "$label" \
                    --json "$J" "$@" -- "$OUTPOST" --config "$OUT/outpost.toml" > /dev/null ;;
        mosquitto) "$BENCH" load --addr 127.0.0.1:18831 --broker-name mosquitto --label "$label" \
                    --json "$J" "$@" -- "$MOSQUITTO" -c "$OUT/mosquitto-persistent.conf" > /dev/null ;;
    esac
}

for rep in $(seq 1 "$REPEATS"); do
    order="outpost mosquitto"
    (( rep % 2 == 0 )) && order="mosquitto outpost"
    for q in 1 2; do
        for b in $order; do
            one "$b" "persistent 1→1 QoS$q" -p 1 -s 1 -q "$q" --payload 64 --inflight 20 \
                -d 5s --persistent-subscribers
            one "$b" "persistent latency 1→1 QoS$q @1000/s" -p 1 -s 1 -q "$q" --payload 64 \
                --inflight 20 --rate 1000 -n 10000 -d 30s --persistent-subscribers
        done
    done
done
"$BENCH" table "$J" | tee "$OUT/table.md"
