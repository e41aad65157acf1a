#!/usr/bin/env bash
# Sensor to cloud latency (issue #16 item 6): from a Modbus register change to the
# reading's arrival at a cloud Mosquitto through Outpost's bridge.
#
#   bench/sensor_latency.sh                 10 devices x 20 points, poll 100 ms, 5 changes/s
#                                           per point = 1,000 changes/s, 20 s
#   DEVICES=2 POINTS=10 bench/sensor_latency.sh      100 changes/s
#   EVERY_MS=20 RATE=25 ... bench/sensor_latency.sh  shorter poll
#   WINDOW=0s bench/sensor_latency.sh       the spool's commit_window (default: the key is
#                                           left out, so Outpost's default applies)
#
# Devices: bench/modbus_counter_sim.py (Modbus TCP on loopback; each holding register is
# a counter whose change times are known exactly). Outpost polls them ([[sensors.modbus]],
# report = "change", qos 1) and its [[bridge]] forwards outpost/+/sensors/# at QoS 1 to a
# Mosquitto "cloud"; `mosquitto_sub -F '%U %t %p'` at the cloud stamps each arrival.
# RATE must stay below 1000/EVERY_MS so every value is seen by a poll (and published once).
# Prints one JSON line (bench/sensor_latency_report.py); OUT=DIR keeps the raw files.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICES=${DEVICES:-10}
POINTS=${POINTS:-20}
EVERY_MS=${EVERY_MS:-100}
RATE=${RATE:-5}
SECS=${SECS:-20}
WINDOW=${WINDOW:-}
export PATH=$PATH:/usr/sbin
OUTPOST=${OUTPOST_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/outpost}
WORK=$(mktemp -d)
chmod 777 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.2
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT"
        cp "$WORK"/{params.json,arrivals.txt,outpost.toml,outpost.log} "$OUT"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }

CLOUD_PORT=$(free_port)
GW_PORT=$(free_port)
PORTS=()
for _ in $(seq "$DEVICES"); do PORTS+=("$(free_port)"); done

# Counters start 3 s from now (time for the gateway to connect and read the zeros).
python3 -c '
import json, sys, time
path, rate, secs, points, every = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.time() + 3.0
json.dump({"ports": [int(x) for x in sys.argv[6:]], "points": points, "rate": rate,
           "t0": t0, "t_end": t0 + secs, "every_ms": every}, open(path, "w"))
' "$WORK/params.json" "$RATE" "$SECS" "$POINTS" "$EVERY_MS" "${PORTS[@]}"

printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$CLOUD_PORT" > "$WORK/cloud.conf"
mosquitto -c "$WORK/cloud.conf" >/dev/null 2>&1 & PIDS+=($!)
wait_port "$CLOUD_PORT"
mosquitto_sub -p "$CLOUD_PORT" -q 1 -t 'outpost/+/sensors/#' -F '%U %t %p' > "$WORK/arrivals.txt" & PIDS+=($!)

python3 "$ROOT/bench/modbus_counter_sim.py" "$WORK/params.json" > "$WORK/sim.log" 2>&1 & PIDS+=($!)
for p in "${PORTS[@]}"; do wait_port "$p"; done

{
    printf 'gateway_id = "gw-bench"\nstate_dir = "%s/state"\n[log]\nlevel = "warn"\n' "$WORK"
    printf '[broker]\nlisteners = [{ bind = "127.0.0.1:%s" }]\n[sensors]\nclock = "trusted"\n' "$GW_PORT"
    for d in $(seq 0 $((DEVICES - 1))); do
        printf '[[sensors.modbus]]\nname = "dev%s"\n' "$d"
        printf 'transport = { tcp = { host = "127.0.0.1", port = %s } }\n' "${PORTS[$d]}"
        printf 'unit = 1\nevery = "%sms"\nreport = "change"\nqos = 1\npoints = [\n' "$EVERY_MS"
        for a in $(seq 0 $((POINTS - 1))); do
            printf '  { name = "p%s", kind = "holding", address = %s, type = "u16" },\n' "$a" "$a"
        done
        echo "]"
    done
    printf '[[bridge]]\nname = "cloud"\naddress = "mqtt://127.0.0.1:%s"\n' "$CLOUD_PORT"
    printf 'topics = [{ pattern = "outpost/+/sensors/#", direction = "out", qos = 1 }]\n'
    printf 'reconnect = { min = "200ms", max = "1s" }\n'
    [[ -z $WINDOW ]] || printf '[bridge.spool]\ncommit_window = "%s"\n' "$WINDOW"
} > "$WORK/outpost.toml"
"$OUTPOST" --config "$WORK/outpost.toml" > "$WORK/outpost.log" 2>&1 & GW_PID=$!
PIDS+=("$GW_PID")
wait_port "$GW_PORT"

T_END=$(python3 -c "import json; print(json.load(open('$WORK/params.json'))['t_end'])")
sleep "$(python3 -c "import time; print(max(0, $T_END - time.time() + 3))")"
awk '{printf "outpost cpu_s=%.2f\n", ($14+$15)/100}' /proc/$GW_PID/stat >&2
python3 "$ROOT/bench/sensor_latency_report.py" "$WORK/params.json" "$WORK/arrivals.txt"
