#!/usr/bin/env bash
# TLS side by side: Outpost (rustls + ring) against Mosquitto (OpenSSL), in one run.
#
#   bench/tls_compare.sh            REPEATS runs of each scenario (default 3)
#
# Environment (as compare.sh): REPEATS, BROKERS, PROTOCOL, OUT, CARGO_TARGET_DIR, OUTPOST_BIN,
# plus THROUGHPUT_TIME (5s), HANDSHAKES (1000), IDLE_CLIENTS (2000).
#
# A throwaway CA and server certificate (ECDSA P-256, for IP 127.0.0.1) are made with the
# openssl CLI in $OUT/pki. Each broker gets a TLS listener and a plain one with the same
# limits as compare.sh (bench/broker_configs.sh). Measured, for both brokers, alternating:
#   load 1→1 and 10→10 at QoS 0 and 1 over TLS: delivered messages per broker CPU-second
#   handshake: fresh connections (TLS + CONNECT/CONNACK/DISCONNECT), no resumption offered
#   handshake --resume: the client keeps a session cache (tickets / session IDs)
#   idle: broker RSS per idle client, over TLS and over plain TCP
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BROKERS=${BROKERS:-"outpost mosquitto"}
PROTOCOL=${PROTOCOL:-3.1.1}
REPEATS=${REPEATS:-3}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/bench/results/tls-$(date -u +%Y%m%dT%H%M%SZ)}
THROUGHPUT_TIME=${THROUGHPUT_TIME:-5s}
HANDSHAKES=${HANDSHAKES:-1000}
IDLE_CLIENTS=${IDLE_CLIENTS:-2000}
OUTPOST_PORT=18840
MOSQUITTO_PORT=18841
OUTPOST_TLS_PORT=18842
MOSQUITTO_TLS_PORT=18843
PAYLOAD=64
INFLIGHT=20

mkdir -p "$OUT/pki"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
MOSQUITTO=$(command -v mosquitto 2>/dev/null || echo /usr/sbin/mosquitto)

cd "$ROOT"
echo "building outpost-bench (release) ..." >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-bench
BENCH=$TARGET_DIR/release/outpost-bench
if [[ -n ${OUTPOST_BIN:-} ]]; then
    OUTPOST=$OUTPOST_BIN
else
    echo "building outpost (release) ..." >&2
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway
    OUTPOST=$TARGET_DIR/release/outpost
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- Certificates: the same shape as tests/tests/transports.rs -------------------------
PKI=$OUT/pki
(
    cd "$PKI"
    EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${EC[@]}" -keyout ca.key -out ca.pem -days 2 -subj /CN=outpost-bench-ca 2>/dev/null
    openssl req "${EC[@]}" -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
        -days 2 -extfile server.ext 2>/dev/null
    # Mosquitto runs as the invoking user here, but may drop to "mosquitto" when root.
    chmod 644 server.key
)

# --- Broker configurations: compare.sh's, plus a TLS listener ---------------------------
# shellcheck source=bench/broker_configs.sh
source "$ROOT/bench/broker_configs.sh"
write_broker_configs "$OUT" "$OUTPOST_PORT" "$MOSQUITTO_PORT" "$INFLIGHT"
# Mosquitto: cafile/certfile/keyfile belong to the listener line before them.
sed -i "s|^listener $MOSQUITTO_PORT 127.0.0.1\$|listener $MOSQUITTO_TLS_PORT 127.0.0.1\ncafile $PKI/ca.pem\ncertfile $PKI/server.pem\nkeyfile $PKI/server.key\nlistener $MOSQUITTO_PORT 127.0.0.1|" "$OUT/mosquitto.conf"
sed -i "s|^listeners = \[{ bind = \"127.0.0.1:$OUTPOST_PORT\" }\]\$|listeners = [{ bind = \"127.0.0.1:$OUTPOST_TLS_PORT\", tls = { cert = \"$PKI/server.pem\", key = \"$PKI/server.key\" } }, { bind = \"127.0.0.1:$OUTPOST_PORT\" }]|" "$OUT/outpost.toml"
grep -q "$MOSQUITTO_TLS_PORT" "$OUT/mosquitto.conf" || { echo "mosquitto.conf: TLS listener not added" >&2; exit 1; }
grep -q "$OUTPOST_TLS_PORT" "$OUT/outpost.toml" || { echo "outpost.toml: TLS listener not added" >&2; exit 1; }

broker_cmd() {
    case "$1" in
        outpost) echo "$OUTPOST --config $OUT/outpost.toml" ;;
        mosquitto) echo "$MOSQUITTO -c $OUT/mosquitto.conf" ;;
    esac
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores online)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "kernel: $(uname -sr)"
    echo "rustc: $(rustc --version)"
    echo "mosquitto: $($MOSQUITTO -h 2>&1 | head -1)"
    echo "openssl: $(openssl version)"
    echo "outpost: $OUTPOST ($(stat -c %s "$OUTPOST") bytes)"
    dirty=""; [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && dirty=" plus uncommitted changes"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)$dirty"
    echo "protocol: MQTT $PROTOCOL; repeats: $REPEATS"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

FAILURES=0
# run MODE LABEL BROKER tls|plain [mode options...]
run() {
    local mode=$1 label=$2 broker=$3 transport=$4; shift 4
    local port tls=()
    case "$broker/$transport" in
        outpost/tls) port=$OUTPOST_TLS_PORT; tls=(--tls-ca "$PKI/ca.pem") ;;
        mosquitto/tls) port=$MOSQUITTO_TLS_PORT; tls=(--tls-ca "$PKI/ca.pem") ;;
        outpost/plain) port=$OUTPOST_PORT ;;
        mosquitto/plain) port=$MOSQUITTO_PORT ;;
    esac
    # shellcheck disable=SC2046  # the broker command is split into words on purpose
    if ! "$BENCH" "$mode" --addr "127.0.0.1:$port" "${tls[@]}" --protocol "$PROTOCOL" \
            --label "$label" --broker-name "$broker" --json "$RESULTS" "$@" \
            -- $(broker_cmd "$broker") >/dev/null; then
        echo "FAILED: $mode $label on $broker" >&2
        FAILURES=$((FAILURES + 1))
    fi
}

# each LABEL MODE tls|plain [options...]: every broker, REPEATS times, alternating.
each() {
    local label=$1 mode=$2 transport=$3; shift 3
    local order rep b
    for rep in $(seq 1 "$REPEATS"); do
        order=$BROKERS
        if (( rep % 2 == 0 )); then order=$(echo "$BROKERS" | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}'); fi
        for b in $order; do run "$mode" "$label" "$b" "$transport" "$@"; done
    done
}

START=$(date +%s)
for shape in "1 1" "10 10"; do
    read -r pubs subs <<< "$shape"
    for qos in 0 1; do
        each "TLS ${pubs}→${subs} QoS$qos" load tls -p "$pubs" -s "$subs" -q "$qos" \
            --payload $PAYLOAD --inflight $INFLIGHT -n 50000000 -d "$THROUGHPUT_TIME"
    done
done
each "TLS full handshakes" handshake tls -n "$HANDSHAKES"
each "TLS resumed handshakes" handshake tls -n "$HANDSHAKES" --resume
each "idle $IDLE_CLIENTS TLS clients" idle tls -c "$IDLE_CLIENTS" --hold 3s
each "idle $IDLE_CLIENTS plain TCP clients" idle plain -c "$IDLE_CLIENTS" --hold 3s

echo >&2
echo "finished in $(( $(date +%s) - START )) s; results in $OUT" >&2
"$BENCH" table "$RESULTS" --candidate outpost --baseline mosquitto | tee "$OUT/table.md"
if (( FAILURES > 0 )); then
    echo "$FAILURES run(s) failed: see stderr above" >&2
    exit 1
fi
