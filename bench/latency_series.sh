#!/usr/bin/env bash
# Interleaved latency series: 1 publisher -> 1 subscriber at 1,000 msg/s, 10,000 messages,
# REPEATS runs per broker and QoS, each broker started fresh per run, order flipped every
# repetition. Writes one JSON line per run to $OUT/results.jsonl and prints the medians.
#
#   OUTPOST_BIN=target/release/outpost bench/latency_series.sh
#   REPEATS=7 QOS="0 1" OUTPOST_CONFIGS="o1.toml o2.toml" (labels are the config names)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/bench/results/latency-$(date -u +%Y%m%dT%H%M%SZ)}
REPEATS=${REPEATS:-7}
QOS=${QOS:-"0 1"}
OUTPOST=${OUTPOST_BIN:-$TARGET_DIR/release/outpost}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
mkdir -p "$OUT"
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-bench)
BENCH=$TARGET_DIR/release/outpost-bench
J=$OUT/results.jsonl
: > "$J"

# shellcheck source=bench/broker_configs.sh
source "$ROOT/bench/broker_configs.sh"
write_broker_configs "$OUT" 18830 18831 20
OUTPOST_CONFIGS=${OUTPOST_CONFIGS:-$OUT/outpost.toml}

one() { # broker-name port -- command...
    local name=$1 port=$2 q=$3; shift 3
    "$BENCH" load --addr "127.0.0.1:$port" --broker-name "$name" --label "latency q$q" \
        --json "$J" -p 1 -s 1 -q "$q" --payload 64 --inflight 20 --rate 1000 -n 10000 -d 30s \
        -- "$@" > /dev/null
}

for rep in $(seq 1 "$REPEATS"); do
    for q in $QOS; do
        runs=()
        for c in $OUTPOST_CONFIGS; do runs+=("outpost:$c"); done
        runs+=("mosquitto")
        if (( rep % 2 == 0 )); then
            reversed=(); for ((i=${#runs[@]}-1; i>=0; i--)); do reversed+=("${runs[i]}"); done
            runs=("${reversed[@]}")
        fi
        for r in "${runs[@]}"; do
            case $r in
                outpost:*) c=${r#outpost:}; one "outpost-$(basename "$c" .toml)" 18830 "$q" "$OUTPOST" --config "$c" ;;
                mosquitto) one mosquitto 18831 "$q" "$MOSQUITTO" -c "$OUT/mosquitto.conf" ;;
            esac
        done
    done
done

python3 - "$J" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault((r["label"], r["broker"]), []).append(r)
for (label, broker), rs in sorted(groups.items()):
    p99 = sorted(r["latency_us"]["p99"] for r in rs)
    p50 = [r["latency_us"]["p50"] for r in rs]
    cpu = [r["broker_stats"]["cpu_s"] for r in rs]
    lost = sum(r["lost"] for r in rs)
    print(f"{label:12} {broker:24} n={len(rs)} p50 {st.median(p50):7.1f}  p99 {st.median(p99):7.1f} "
          f"(all {', '.join(f'{x:.0f}' for x in p99)})  cpu {st.median(cpu):.2f}s  lost {lost}")
PY
