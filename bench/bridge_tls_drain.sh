#!/usr/bin/env bash
# Bridge drain over TLS (issue #16 item 5): a backlog of N QoS 1 messages is spooled while
# the TLS cloud (Mosquitto, certificates from the openssl CLI) is down; the cloud comes
# up and Outpost's bridge drains it while live traffic (LIVE_RATE msg/s) keeps flowing.
# Then the cloud's own accept rate: outpost-bench publishing QoS 1 straight into the same
# TLS Mosquitto, with the same protocol (5.0), window and payload size.
#
#   bench/bridge_tls_drain.sh                  N=1000000 INFLIGHT=1000 LIVE_RATE=100
#   N=200000 bench/bridge_tls_drain.sh
#
# Payloads are 64 bytes: the backlog comes from outpost-bench (a binary header with its
# sequence number; `mosquitto_pub -l` is not used for it because 2.0.11 exits at end of
# input with messages unsent: 34,467 of 100,000 arrived in a trial), live traffic is
# `L<seq> <send time>` lines through `mosquitto_pub -l` at LIVE_RATE. A persistent QoS 1
# collector at the cloud (`mosquitto_sub -F '%U %t %p'`) stamps arrivals, from which
# bench/bridge_tls_drain_report.py computes the drain rate (first to last backlog
# arrival), loss, duplicates and the live messages' latency. OUT=DIR keeps raw files.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000000}
INFLIGHT=${INFLIGHT:-1000}
LIVE_RATE=${LIVE_RATE:-100}
export PATH=$PATH:/usr/sbin
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUTPOST=${OUTPOST_BIN:-$TARGET/outpost}
BENCH=${BENCH_BIN:-$TARGET/outpost-bench}
WORK=$(mktemp -d)
chmod 777 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT"
        cp "$WORK"/{outpost.toml,cloud.conf,outpost.log,accept.json,accept.log,accept2.json,accept2.log,report.json,fill.json,fill.log,live_count} "$OUT"/ 2>/dev/null || true
        gzip -c "$WORK/arrivals.txt" > "$OUT/arrivals.txt.gz" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }
now() { date +%s.%N; }
cpu() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }

# Certificates: a CA and a server certificate for 127.0.0.1 (IP SAN) and localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench-ca -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$WORK/ext.cnf"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/ext.cnf" -out "$WORK/server.pem" 2>/dev/null
chmod 644 "$WORK"/*.key

CLOUD_PORT=$(free_port)
GW_PORT=$(free_port)
mkdir -p "$WORK/cloud" && chmod 777 "$WORK/cloud"
# max_inflight_messages is also the Receive Maximum Mosquitto announces to 5.0 clients.
cat > "$WORK/cloud.conf" <<EOF
listener $CLOUD_PORT 127.0.0.1
cafile $WORK/ca.pem
certfile $WORK/server.pem
keyfile $WORK/server.key
allow_anonymous true
persistence true
persistence_location $WORK/cloud/
autosave_interval 0
max_queued_messages 0
max_inflight_messages $INFLIGHT
EOF
CLOUD_PID=""
cloud_start() { mosquitto -c "$WORK/cloud.conf" > "$WORK/cloud.log" 2>&1 & CLOUD_PID=$!; PIDS+=("$CLOUD_PID"); wait_port "$CLOUD_PORT"; }
TLS_SUB=(-h 127.0.0.1 -p "$CLOUD_PORT" --cafile "$WORK/ca.pem")

# Register the collector's persistent session, then take the cloud down.
cloud_start
mosquitto_sub "${TLS_SUB[@]}" -i collector -c -q 1 -t 'up/#' -C 1 -W 1 >/dev/null 2>&1 || true
kill -TERM "$CLOUD_PID"; wait "$CLOUD_PID" 2>/dev/null || true

cat > "$WORK/outpost.toml" <<EOF
gateway_id = "gw-bench"
state_dir = "$WORK/state"
[log]
level = "warn"
[broker]
listeners = [{ bind = "127.0.0.1:$GW_PORT" }]
[[bridge]]
name = "cloud"
address = "mqtts://127.0.0.1:$CLOUD_PORT"
max_inflight = $INFLIGHT
topics = [
  { pattern = "bench/#", direction = "out", qos = 1, remote_prefix = "up/" },
  { pattern = "live/#", direction = "out", qos = 1, remote_prefix = "up/" },
]
[bridge.tls]
ca_file = "$WORK/ca.pem"
[bridge.spool]
max_bytes = "4GiB"
when_full = "reject-new"
[bridge.reconnect]
min = "200ms"
max = "500ms"
EOF
"$OUTPOST" --config "$WORK/outpost.toml" > "$WORK/outpost.log" 2>&1 & GW_PID=$!
PIDS+=("$GW_PID")
wait_port "$GW_PORT"

# The backlog: N QoS 1 messages, each acknowledged only once committed to the spool
# (outpost-bench's own subscriber at the gateway confirms none was lost locally).
"$BENCH" load --addr "127.0.0.1:$GW_PORT" --broker-pid "$GW_PID" --label spool-fill \
    --broker-name outpost -p 1 -s 1 -q 1 --inflight 256 --window 5000 --payload 64 \
    -n "$N" -d 600s > "$WORK/fill.json" 2> "$WORK/fill.log"
cat "$WORK/fill.log" >&2
# What the gateway accepted of the live traffic, to compare with what reached the cloud.
mosquitto_sub -p "$GW_PORT" -q 1 -t 'live/#' > "$WORK/live_local.txt" & PIDS+=($!)
LOCAL_SUB=$!
sleep 0.5

# Live traffic from now to the end; the first seconds of it queue behind the backlog.
mkfifo "$WORK/live.fifo"
python3 "$ROOT/bench/live_lines.py" "$LIVE_RATE" "$WORK/live_count" > "$WORK/live.fifo" & LIVE_GEN=$!
mosquitto_pub -p "$GW_PORT" -q 1 -t live/m -l < "$WORK/live.fifo" & LIVE_PID=$!
PIDS+=("$LIVE_GEN" "$LIVE_PID")
sleep 3

cloud_start
CLOUD_UP=$(now)
mosquitto_sub "${TLS_SUB[@]}" -i collector -c -q 1 -t 'up/#' -F '%U %t %p' > "$WORK/arrivals.txt" & PIDS+=($!)
SUB_PID=$!
C0=("$(cpu "$GW_PID")" "$(cpu "$CLOUD_PID")" "$(cpu "$SUB_PID")")
for _ in $(seq 600); do
    sleep 1
    got=$(grep -a -c ' up/bench/' "$WORK/arrivals.txt" || true)
    [[ $got -ge $N ]] && break
done
echo "backlog arrivals: $got" >&2
# CPU seconds each process used from the cloud's start to the end of the drain (about).
echo "drain cpu_s: outpost $(python3 -c "print(round($(cpu "$GW_PID") - ${C0[0]}, 2))")" \
    "cloud mosquitto $(python3 -c "print(round($(cpu "$CLOUD_PID") - ${C0[1]}, 2))")" \
    "collector mosquitto_sub $(python3 -c "print(round($(cpu "$SUB_PID") - ${C0[2]}, 2))")" >&2
sleep 5
# Stop the live generator; mosquitto_pub sends what it read and exits.
kill -TERM "$LIVE_GEN" 2>/dev/null || true
wait "$LIVE_GEN" 2>/dev/null || true
wait "$LIVE_PID" 2>/dev/null || true
sleep 3
kill "$SUB_PID" "$LOCAL_SUB" 2>/dev/null || true
ps -o rss=,time= -p "$GW_PID" | awk '{print "outpost rss_kb=" $1 " cpu=" $2}' >&2
python3 "$ROOT/bench/bridge_tls_drain_report.py" "$WORK/arrivals.txt" "$N" \
    "$(wc -l < "$WORK/live_local.txt")" "$CLOUD_UP" | tee "$WORK/report.json"

# The cloud's own accept rate, same Mosquitto, same TLS, 5.0, window and payload.
"$BENCH" load --addr "127.0.0.1:$CLOUD_PORT" --tls-ca "$WORK/ca.pem" --tls-server-name 127.0.0.1 \
    --protocol 5 --broker-pid "$CLOUD_PID" --label tls-accept --broker-name mosquitto \
    -p 1 -s 1 -q 1 --inflight "$INFLIGHT" --window 1000000 --payload 64 \
    -n "$N" -d 300s > "$WORK/accept.json" 2> "$WORK/accept.log" || true
cat "$WORK/accept.log" >&2
cat "$WORK/accept.json"

# The same, with a collector like the drain's (mosquitto_sub -F '%U %t %p' to a file, on
# the bench topics) attached as well: during the drain that collector costs more CPU than
# the cloud itself, and on a small machine it competes with the cloud for the cores.
mosquitto_sub "${TLS_SUB[@]}" -q 1 -t 'bench/#' -F '%U %t %p' > "$WORK/accept_arrivals.txt" & PIDS+=($!)
sleep 0.5
"$BENCH" load --addr "127.0.0.1:$CLOUD_PORT" --tls-ca "$WORK/ca.pem" --tls-server-name 127.0.0.1 \
    --protocol 5 --broker-pid "$CLOUD_PID" --label tls-accept-with-collector --broker-name mosquitto \
    -p 1 -s 1 -q 1 --inflight "$INFLIGHT" --window 1000000 --payload 64 \
    -n "$N" -d 300s > "$WORK/accept2.json" 2> "$WORK/accept2.log" || true
cat "$WORK/accept2.log" >&2
cat "$WORK/accept2.json"
