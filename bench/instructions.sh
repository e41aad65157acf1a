#!/usr/bin/env bash
# Instructions per message, counted by valgrind's callgrind in the broker process only:
# a yardstick that a shared, noisy machine cannot move (the same count for the same binary
# and input, whatever else the machine is doing).
#
#   bench/instructions.sh                 everything, each measurement twice (~15 min)
#   N=2000 READINGS=200 bench/instructions.sh   a quick smoke run
#
# Environment:
#   N=20000          messages per routing run (1 publisher -> 1 subscriber, 64 B payload)
#   SPOOL_N=20000    QoS 1 messages per spool run (bridge to a cloud that is down)
#   READINGS=2000    Modbus readings per sensor run
#   REPEATS=2        runs of every measurement (to show the count repeats)
#   QOS_LIST="0 1 2" BROKERS="outpost mosquitto"  SCENARIOS="route spool modbus"
#   OUT=bench/runs/<date>-instructions   where the table, logs and JSON lines go
#   OUTPOST_BIN=path  use this outpost binary instead of building the release one
#
# Method: each broker runs under `valgrind --tool=callgrind` from start to clean exit
# (SIGTERM), and callgrind's total ("Collected") counts every user-space instruction of
# every thread of that process. A run with M messages and a run with 0 messages (the same
# clients connect, subscribe and disconnect; start-up and shutdown included) differ only
# by the M messages, so (I_M - I_0) / M is instructions per message. Kernel work (system
# calls, TCP, fsync) is not counted: callgrind sees user space only.
#
#   route:   outpost-bench load -p 1 -s 1 -q Q -n N --payload 64 against each broker,
#            $SYS off in both (time-driven work would otherwise enter the count).
#   spool:   outpost with a [[bridge]] to a port where no cloud listens; a small QoS 1
#            publisher written here (20 in flight, counts its PUBACKs) publishes SPOOL_N
#            messages (26-byte topic, 64 B payload), every one of
#            which Outpost commits to its SQLite spool before the PUBACK. Beside it,
#            the same publisher into outpost without a bridge (no subscriber) gives the
#            broker's own share, and Mosquitto with a `connection` bridge to the same
#            dead port (it queues in memory, not on disk) the same load.
#   modbus:  outpost polls one simulated Modbus TCP device (a small Python server written
#            here, one holding register, every 10 ms, report = "every", so each answer
#            is one reading published into the broker); the device answers exactly
#            READINGS requests (0 in the baseline run) and then closes the connection and
#            its listener, so both runs end on the same error path.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-20000}
SPOOL_N=${SPOOL_N:-20000}
READINGS=${READINGS:-2000}
REPEATS=${REPEATS:-2}
QOS_LIST=${QOS_LIST:-"0 1 2"}
BROKERS=${BROKERS:-"outpost mosquitto"}
SCENARIOS=${SCENARIOS:-"route spool modbus"}
PAYLOAD=64
SPOOL_TOPIC=sensors/boiler/temperature
OUT=${OUT:-$ROOT/bench/runs/$(date -u +%Y-%m-%d)-instructions}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH=$PATH:/usr/sbin

for tool in valgrind mosquitto mosquitto_pub python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install valgrind mosquitto mosquitto-clients python3)" >&2; exit 1; }
done
MOSQUITTO=$(command -v mosquitto)

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

mkdir -p "$OUT/logs"
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
    echo "kernel: $(uname -sr)"
    echo "valgrind: $(valgrind --version)"
    echo "rustc: $(rustc --version)"
    echo "mosquitto: $($MOSQUITTO -h 2>&1 | head -1)"
    echo "outpost: $OUTPOST ($(stat -c %s "$OUTPOST") bytes)"
    dirty=""; [[ -n $(git status --porcelain 2>/dev/null) ]] && dirty=" plus uncommitted changes"
    echo "git: $(git rev-parse --short HEAD)$dirty"
    echo "N=$N SPOOL_N=$SPOOL_N READINGS=$READINGS REPEATS=$REPEATS payload=$PAYLOAD"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT PID: until PORT accepts or PID died (valgrind start-up is slow)
    for _ in $(seq 600); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# --- Broker configurations ------------------------------------------------------------
PORT=$(free_port)
DEAD_PORT=$(free_port)   # nothing listens here: the cloud that is down
# As compare.sh configures them (bench/broker_configs.sh), with $SYS off.
# shellcheck source=bench/broker_configs.sh
source "$ROOT/bench/broker_configs.sh"
write_broker_configs "$WORK" "$PORT" "$PORT" 20
sed -i 's/^\[broker\]$/[broker]\nsys_interval = "0s"/' "$WORK/outpost.toml"
# Started as root, Mosquitto would switch to its own user and could not write callgrind's
# output file; `user root` keeps it as it is.
printf 'sys_interval 0\nuser root\n' >> "$WORK/mosquitto.conf"

write_spool_configs() {
    cat > "$WORK/spool.toml" <<EOF
gateway_id = "gw-bench"
state_dir = "$WORK/spool-state"
[log]
level = "error"
[broker]
sys_interval = "0s"
listeners = [{ bind = "127.0.0.1:$PORT" }]
allow_anonymous = true
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$DEAD_PORT"
topics = [{ pattern = "sensors/#", direction = "out", qos = 1, remote_prefix = "plant-7/" }]
# One connection attempt at start, then (full jitter) none for a long while: the count
# must not depend on how long the run took.
reconnect = { min = "1h", max = "1h" }
stats_interval = "1h"
EOF
    sed '/^\[\[bridge\]\]/,$d' "$WORK/spool.toml" | sed "s#spool-state#nobridge-state#" > "$WORK/nobridge.toml"
    cat > "$WORK/mosquitto-bridge.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
log_type none
log_dest none
sys_interval 0
user root
max_queued_messages 0
connection cloud
address 127.0.0.1:$DEAD_PORT
topic sensors/# out 1 "" plant-7/
cleansession false
restart_timeout 3600
EOF
}

write_modbus_config() { # write_modbus_config DEVICE_PORT
    cat > "$WORK/modbus.toml" <<EOF
gateway_id = "gw-bench"
state_dir = "$WORK/modbus-state"
[log]
level = "error"
[broker]
sys_interval = "0s"
listeners = [{ bind = "127.0.0.1:$PORT" }]
[sensors]
clock = "trusted"
stats_interval = "0s"
[[sensors.modbus]]
name = "boiler"
transport = { tcp = { host = "127.0.0.1", port = $1 } }
unit = 1
every = "10ms"
report = "every"
points = [{ name = "temperature", kind = "holding", address = 0, type = "u16", scale = 0.1, unit = "°C" }]
EOF
}

# A Modbus TCP device that answers exactly K read requests on one connection, then
# closes it and its listener. Prints its port, then "done K" once it has answered them.
cat > "$WORK/modbus_sim.py" <<'EOF'
import socket, struct, sys
k = int(sys.argv[1])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
ls.close()
served, buf = 0, b""
while served < k:
    data = conn.recv(4096)
    if not data:
        break
    buf += data
    while len(buf) >= 7 and served < k:
        tid, _pid, length, unit = struct.unpack(">HHHB", buf[:7])
        if len(buf) < 6 + length:
            break
        frame, buf = buf[: 6 + length], buf[6 + length :]
        fc = frame[7]
        if fc in (3, 4) and len(frame) >= 12:
            _addr, count = struct.unpack(">HH", frame[8:12])
            # A value that changes on every answer.
            pdu = bytes([fc, 2 * count]) + b"".join(
                struct.pack(">H", (served + i) & 0xFFFF) for i in range(count))
        else:
            pdu = bytes([fc | 0x80, 1])
        conn.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        served += 1
conn.close()
print("done", served, flush=True)
EOF

# A QoS 1 publisher that counts its PUBACKs: MQTT 3.1.1, 20 messages in flight, exits 0
# only when every message was acknowledged. (mosquitto_pub -l, fed 100,000 lines at once,
# sent only about a third of them and still exited 0; see flash_writes.sh.)
cat > "$WORK/qos1_pub.py" <<'EOF'
import socket, struct, sys
port, topic, n, payload_len = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
def packet(kind, body):
    out, rem = bytearray([kind]), len(body)
    while True:
        b, rem = rem % 128, rem // 128
        out.append(b | (0x80 if rem else 0))
        if not rem:
            return bytes(out) + body
def read_packet(sock, buf):
    while True:
        if len(buf) >= 2:
            mult, rem, i = 1, 0, 1
            while i < len(buf):
                rem += (buf[i] & 0x7F) * mult
                mult *= 128
                if not buf[i] & 0x80:
                    break
                i += 1
            else:
                i = None
            if i is not None and len(buf) >= i + 1 + rem:
                return buf[0], bytes(buf[i + 1 : i + 1 + rem]), buf[i + 1 + rem :]
        data = sock.recv(65536)
        if not data:
            sys.exit("connection closed")
        buf += data
s = socket.create_connection(("127.0.0.1", port))
cid = b"qos1-pub"
s.sendall(packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid))
kind, body, buf = read_packet(s, b"")
if kind != 0x20 or body[1] != 0:
    sys.exit(f"CONNACK refused: {body!r}")
sent = acked = 0
while acked < n:
    burst = b""
    while sent < n and sent - acked < 20:
        sent += 1
        pid = (sent - 1) % 65535 + 1
        payload = b"%0*d" % (payload_len, sent)
        burst += packet(0x32, struct.pack(">H", len(topic)) + topic + struct.pack(">H", pid) + payload)
    if burst:
        s.sendall(burst)
    kind, body, buf = read_packet(s, buf)
    if kind == 0x40:
        acked += 1
s.sendall(b"\xe0\x00")
s.close()
print(f"acknowledged {acked} of {n}")
EOF

# --- Running under callgrind ------------------------------------------------------------
RESULTS=$OUT/results.tsv
printf 'scenario\tbroker\tqos\tmessages\trepeat\tinstructions\n' > "$RESULTS"
BROKER_PID=""
# vg_start TAG CMD...: the broker under callgrind, in the background.
vg_start() {
    local tag=$1; shift
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$tag.callgrind" \
        --log-file="$OUT/logs/$tag.valgrind.log" "$@" >"$OUT/logs/$tag.stdout" 2>&1 &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    wait_port "$PORT" "$BROKER_PID" || { echo "broker $tag did not start: see $OUT/logs/$tag.*" >&2; exit 1; }
}
# vg_stop TAG SCENARIO BROKER QOS MESSAGES REPEAT: clean exit, then record the total.
vg_stop() {
    local tag=$1
    kill -TERM "$BROKER_PID"
    wait "$BROKER_PID" || true
    local total
    total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/logs/$tag.valgrind.log")
    [[ -n $total ]] || { echo "no callgrind total for $tag" >&2; exit 1; }
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$2" "$3" "$4" "$5" "$6" "$total" >> "$RESULTS"
    echo "$tag: $total instructions" >&2
    rm -f "$WORK/$tag.callgrind"
}

route_run() { # route_run BROKER QOS MESSAGES REPEAT
    local broker=$1 qos=$2 n=$3 rep=$4 tag="route-$1-q$2-n$3-r$4"
    rm -rf "$WORK/outpost-state"; mkdir -p "$WORK/outpost-state"
    if [[ $broker == outpost ]]; then
        vg_start "$tag" "$OUTPOST" --config "$WORK/outpost.toml"
    else
        vg_start "$tag" "$MOSQUITTO" -c "$WORK/mosquitto.conf"
    fi
    "$BENCH" load --addr "127.0.0.1:$PORT" --broker-pid "$BROKER_PID" -p 1 -s 1 -q "$qos" \
        -n "$n" --payload "$PAYLOAD" -d 900s --drain-limit 300s --label "$tag" \
        --broker-name "$broker" --json "$OUT/load.jsonl" >/dev/null 2>"$OUT/logs/$tag.bench"
    vg_stop "$tag" route "$broker" "$qos" "$n" "$rep"
}

spool_run() { # spool_run GATEWAY MESSAGES REPEAT   (GATEWAY: outpost, outpost-nobridge, mosquitto)
    local gw=$1 n=$2 rep=$3 tag="spool-$1-n$2-r$3"
    rm -rf "$WORK/spool-state" "$WORK/nobridge-state"
    case $gw in
        outpost) vg_start "$tag" "$OUTPOST" --config "$WORK/spool.toml" ;;
        outpost-nobridge) vg_start "$tag" "$OUTPOST" --config "$WORK/nobridge.toml" ;;
        mosquitto) vg_start "$tag" "$MOSQUITTO" -c "$WORK/mosquitto-bridge.conf" ;;
    esac
    timeout 900 python3 "$WORK/qos1_pub.py" "$PORT" "$SPOOL_TOPIC" "$n" "$PAYLOAD" \
        >"$OUT/logs/$tag.pub" 2>&1 || { echo "publisher failed: $(cat "$OUT/logs/$tag.pub")" >&2; exit 1; }
    vg_stop "$tag" spool "$gw" 1 "$n" "$rep"
    if [[ $gw == outpost ]]; then
        # Every acknowledged message must be a row of the spool.
        local rows
        rows=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM messages").fetchone()[0])' \
            "$WORK/spool-state/bridge-cloud.sqlite")
        echo "spool rows: $rows" >> "$OUT/logs/$tag.pub"
        [[ $rows == "$n" ]] || { echo "$tag: $rows rows in the spool, $n expected" >&2; exit 1; }
    fi
}

modbus_run() { # modbus_run READINGS REPEAT
    local k=$1 rep=$2 tag="modbus-outpost-n$1-r$2"
    rm -rf "$WORK/modbus-state"
    coproc SIM { exec python3 -u "$WORK/modbus_sim.py" "$k"; }
    local sim_pid=$SIM_PID sim_port line
    PIDS+=("$sim_pid")
    read -r sim_port <&"${SIM[0]}"
    write_modbus_config "$sim_port"
    vg_start "$tag" "$OUTPOST" --config "$WORK/modbus.toml"
    read -r line <&"${SIM[0]}" || true
    [[ $line == "done $k" ]] || { echo "simulator: '$line', wanted 'done $k'" >&2; exit 1; }
    # The same settling time in every run: the poller meets the closed device once or
    # twice (backoff starts at 1 s) before the gateway is stopped.
    sleep 2
    wait "$sim_pid" 2>/dev/null || true
    vg_stop "$tag" modbus outpost 0 "$k" "$rep"
}

write_spool_configs
for rep in $(seq "$REPEATS"); do
    if [[ " $SCENARIOS " == *" route "* ]]; then
        for broker in $BROKERS; do
            for qos in $QOS_LIST; do
                route_run "$broker" "$qos" 0 "$rep"
                route_run "$broker" "$qos" "$N" "$rep"
            done
        done
    fi
    if [[ " $SCENARIOS " == *" spool "* ]]; then
        for gw in outpost outpost-nobridge mosquitto; do
            [[ $gw == mosquitto && " $BROKERS " != *" mosquitto "* ]] && continue
            spool_run "$gw" 0 "$rep"
            spool_run "$gw" "$SPOOL_N" "$rep"
        done
    fi
    if [[ " $SCENARIOS " == *" modbus "* ]]; then
        modbus_run 0 "$rep"
        modbus_run "$READINGS" "$rep"
    fi
done

# --- Table ------------------------------------------------------------------------------
python3 - "$RESULTS" > "$OUT/table.md" <<'EOF'
import csv, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
runs = defaultdict(lambda: defaultdict(dict))  # (scenario, broker, qos) -> repeat -> {messages: I}
sizes = {}
for r in rows:
    key = (r["scenario"], r["broker"], r["qos"])
    m = int(r["messages"])
    runs[key][r["repeat"]][m] = int(r["instructions"])
    if m:
        sizes[key] = m
names = {"route": "1→1 QoS {q}, 64 B", "spool": "QoS 1 publish, 64 B",
         "modbus": "Modbus reading published"}
print("| scenario | broker | messages M | I_0 (each run) | I_M (each run) | instructions per message (each run) |")
print("|---|---|---:|---:|---:|---:|")
for key in sorted(runs, key=lambda k: (["route", "spool", "modbus"].index(k[0]), k[2], k[1])):
    scen, broker, qos = key
    m = sizes.get(key)
    if not m:
        continue
    i0, im, per = [], [], []
    for rep in sorted(runs[key]):
        d = runs[key][rep]
        if 0 in d and m in d:
            i0.append(d[0]); im.append(d[m]); per.append((d[m] - d[0]) / m)
    label = names[scen].format(q=qos)
    if scen == "spool":
        label += {"outpost": " into the bridge spool (cloud down)",
                  "outpost-nobridge": ", no bridge, no subscriber",
                  "mosquitto": " into Mosquitto's bridge queue (cloud down, in memory)"}[broker]
    print(f"| {label} | {broker} | {m:,} | {' / '.join(f'{x:,}' for x in i0)} | "
          f"{' / '.join(f'{x:,}' for x in im)} | {' / '.join(f'{x:,.0f}' for x in per)} |")
EOF
cat "$OUT/table.md"
