#!/usr/bin/env bash
# Flash writes per message: bytes the broker process caused to be written to the block
# device (/proc/PID/io write_bytes), divided by the messages it kept, with the message's
# own bytes beside it.
#
#   bench/flash_writes.sh               every scenario (~10 min)
#   N=10000 PACED_N=1000 bench/flash_writes.sh   a quick run
#
# Environment:
#   N=100000         QoS 1 messages per burst scenario (mosquitto_pub -l, as fast as it goes:
#                    one publisher, and for outpost also ten publishers sharing the N)
#   PACED_N=6000     messages per paced scenario, sent at RATE messages/s
#   RATE=100         the paced rate (the endurance question: 100 messages/s)
#   MODES="burst burst10 paced paced_many"
#                    paced: one publisher sends RATE messages/s (mosquitto_pub, 20 in
#                    flight at most); paced_many: CLIENTS publishers share RATE, as a site
#                    of sensors does (100 devices reporting once a second)
#   CLIENTS=100
#   SCENARIOS="spool session"   GATEWAYS="outpost mosquitto"
#   WINDOWS="default"  Outpost's commit window (`broker.commit_window`,
#                    `bridge.spool.commit_window`) for each Outpost run, e.g. "0s 100ms 1s";
#                    "default" leaves the key out
#   OUT=bench/runs/<date>-flash-writes
#   OUTPOST_BIN=path
#
# Scenarios (one publisher, topic "sensors/boiler/temperature", 64-byte payload, QoS 1):
#   spool:    a [[bridge]] whose cloud is down (nothing listens on its port), so every
#             message goes to the SQLite spool before its PUBACK. Mosquitto: a
#             `connection` bridge to the same dead port with `persistence true`.
#   session:  a QoS 1 subscriber with a persistent session (clean session off) subscribes
#             and disconnects; every message is kept for it. Mosquitto: `persistence
#             true`, autosave_interval at its default (1800 s).
#
# How the bytes are read: the broker runs as the child of a small Python wrapper. At the
# end the script sends SIGTERM; the broker shuts down cleanly (Outpost's last commit and
# checkpoint, Mosquitto's save on exit) and exits. The wrapper waits for it with
# waitid(WNOWAIT), which leaves it a zombie whose /proc/PID/io still holds the totals of
# all its threads, reads that, then reaps it with wait4 and also records ru_oublock (the
# kernel's count of the same write_bytes in 512-byte units) as a cross-check. So the
# final checkpoint and the exit-time save are counted. /proc/PID/io is also read just
# before SIGTERM, to show what the shutdown itself wrote.
#
# write_bytes is charged when the process dirties a page of the page cache (or writes
# with O_DIRECT); a page that is written again before it was written back is charged
# once, but SQLite's fsync after every commit writes pages back each time, so every
# commit's pages are charged again. Not counted: the file system's own journal (written
# by the kernel's jbd2 thread) and whatever the card's controller adds (write
# amplification inside the card).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-100000}
PACED_N=${PACED_N:-6000}
RATE=${RATE:-100}
SCENARIOS=${SCENARIOS:-"spool session"}
GATEWAYS=${GATEWAYS:-"outpost mosquitto"}
WINDOWS=${WINDOWS:-default}
CLIENTS=${CLIENTS:-100}
PAYLOAD=64
TOPIC=sensors/boiler/temperature
OUT=${OUT:-$ROOT/bench/runs/$(date -u +%Y-%m-%d)-flash-writes}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH=$PATH:/usr/sbin

for tool in mosquitto mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install mosquitto mosquitto-clients python3)" >&2; exit 1; }
done
MOSQUITTO=$(command -v mosquitto)
cd "$ROOT"
if [[ -n ${OUTPOST_BIN:-} ]]; then
    OUTPOST=$OUTPOST_BIN
else
    echo "building outpost (release) ..." >&2
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway
    OUTPOST=$TARGET_DIR/release/outpost
fi

mkdir -p "$OUT/logs"
# The state must be on a real block device (write_bytes counts nothing on tmpfs): keep it
# beside the repository, not in /tmp.
WORK=$(mktemp -d -p "${STATE_PARENT:-$ROOT/target}" flash-writes.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $(uname -sr)"
    echo "state directory file system: $(df -T "$WORK" | awk 'NR==2 {print $1 " " $2}')"
    echo "mosquitto: $($MOSQUITTO -h 2>&1 | head -1)"
    echo "outpost: $OUTPOST ($(stat -c %s "$OUTPOST") bytes)"
    dirty=""; [[ -n $(git status --porcelain 2>/dev/null) ]] && dirty=" plus uncommitted changes"
    echo "git: $(git rev-parse --short HEAD)$dirty"
    echo "N=$N PACED_N=$PACED_N RATE=$RATE CLIENTS=$CLIENTS payload=$PAYLOAD topic=$TOPIC"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
PORT=$(free_port)
DEAD_PORT=$(free_port)

# The wrapper: runs the broker, forwards SIGTERM, reads /proc/PID/io of the exited (not
# yet reaped) broker, then reaps it. Writes one JSON object to argv[1].
cat > "$WORK/iowrap.py" <<'EOF'
import json, os, signal, subprocess, sys
out, pidfile, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
child = subprocess.Popen(cmd)
with open(pidfile, "w") as f:
    f.write(str(child.pid))
signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
while True:
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        break
    except InterruptedError:
        continue
io = {}
try:
    with open(f"/proc/{child.pid}/io") as f:
        io = {k: int(v) for k, v in (line.split(": ") for line in f)}
except OSError as e:
    io = {"error": str(e)}
_, status, ru = os.wait4(child.pid, 0)
json.dump({"io_at_exit": io, "ru_oublock_bytes": ru.ru_oublock * 512,
           "exit_status": status}, open(out, "w"))
EOF

read_io() { # read_io PID: /proc/PID/io as JSON
    python3 -c 'import json,sys; print(json.dumps({k: int(v) for k, v in (l.split(": ") for l in open(f"/proc/{sys.argv[1]}/io"))}))' "$1"
}

outpost_config() { # outpost_config spool|session STATE_DIR WINDOW
    local window_line=""
    [[ $3 == default ]] || window_line="commit_window = \"$3\""
    cat <<EOF
gateway_id = "gw-bench"
state_dir = "$2"
[log]
level = "error"
[broker]
listeners = [{ bind = "127.0.0.1:$PORT" }]
allow_anonymous = true
# Keep every message for the offline session (defaults: 10,000 messages, 64 MiB).
max_queued_messages = 1000000
max_queued_bytes = "0"
$window_line
EOF
    if [[ $1 == spool ]]; then
        cat <<EOF
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$DEAD_PORT"
topics = [{ pattern = "sensors/#", direction = "out", qos = 1, remote_prefix = "plant-7/" }]
reconnect = { min = "5s", max = "30s" }
[bridge.spool]
$window_line
EOF
    fi
}

mosquitto_config() { # mosquitto_config spool|session STATE_DIR
    cat <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $2/
autosave_interval 1800
log_type none
log_dest none
user root
max_queued_messages 0
max_queued_bytes 0
EOF
    if [[ $1 == spool ]]; then
        cat <<EOF
connection cloud
address 127.0.0.1:$DEAD_PORT
topic sensors/# out 1 "" plant-7/
cleansession false
restart_timeout 5 30
EOF
    fi
}

# Lines of PAYLOAD bytes; mosquitto_pub -l sends each line (without its newline) as one message.
seq 1 "$N" | awk -v w="$PAYLOAD" '{ printf "%0" w "d\n", $1 }' > "$WORK/payloads"
cat > "$WORK/pace.py" <<'EOF'
import sys, time
rate, path = float(sys.argv[1]), sys.argv[2]
start = time.monotonic()
for i, line in enumerate(open(path)):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    sys.stdout.write(line)
    sys.stdout.flush()
EOF

cat > "$WORK/pace_many.py" <<'EOF'
import sys, time
rate, path, fifos = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
outs = [open(f, "w") for f in fifos]
start = time.monotonic()
for i, line in enumerate(open(path)):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    out = outs[i % len(outs)]
    out.write(line)
    out.flush()
for o in outs:
    o.close()
EOF

# count_kept GATEWAY SCENARIO STATE TAG EXPECTED: messages on disk once the broker has exited.
# Outpost: rows in its SQLite files. Mosquitto (its file format is its own): start it again
# on the same persistence file and count what it hands over: the offline session's queue
# to the same client id, the bridge's queue to a cloud that is now up.
count_kept() {
    local gw=$1 scen=$2 state=$3 tag=$4 # $5: messages expected
    if [[ $gw == outpost ]]; then
        python3 - "$state" "$scen" <<'PY'
import sqlite3, sys
state, scen = sys.argv[1:]
if scen == "spool":
    db, q = f"{state}/bridge-cloud.sqlite", "SELECT count(*) FROM messages"
else:
    db, q = f"{state}/broker.sqlite", "SELECT count(*) FROM deliveries"
print(sqlite3.connect(db).execute(q).fetchone()[0])
PY
        return
    fi
    local count_file=$WORK/$tag.count pid cloud=""
    if [[ $scen == spool ]]; then
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_type none\nlog_dest none\nmax_queued_messages 0\n' \
            "$DEAD_PORT" > "$WORK/cloud.conf"
        "$MOSQUITTO" -c "$WORK/cloud.conf" >/dev/null 2>&1 & cloud=$!
        PIDS+=("$cloud")
        wait_port "$DEAD_PORT"
        timeout 110 mosquitto_sub -p "$DEAD_PORT" -q 1 -t 'plant-7/#' -C "$5" -W 100 > "$count_file" 2>/dev/null &
        local sub=$!
        sleep 0.5
        "$MOSQUITTO" -c "$WORK/$tag.conf" >/dev/null 2>&1 & pid=$!
        PIDS+=("$pid")
        wait "$sub" || true
    else
        "$MOSQUITTO" -c "$WORK/$tag.conf" >/dev/null 2>&1 & pid=$!
        PIDS+=("$pid")
        wait_port "$PORT"
        timeout 110 mosquitto_sub -p "$PORT" -i keeper -c -q 1 -t "$TOPIC" -C "$5" -W 100 > "$count_file" 2>/dev/null || true
    fi
    kill -TERM "$pid" $cloud 2>/dev/null || true
    wait "$pid" $cloud 2>/dev/null || true
    wc -l < "$count_file" | tr -d ' '
}

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
# run GATEWAY SCENARIO MODE(burst|burst10|paced|paced_many) COUNT [WINDOW]
run() {
    local gw=$1 scen=$2 mode=$3 n=$4 window=${5:-default}
    local tag="$1-$2-$3-n$4-w$window"
    local state=$WORK/state-$tag
    rm -rf "$state"; mkdir -p "$state"
    local cmd
    if [[ $gw == outpost ]]; then
        outpost_config "$scen" "$state" "$window" > "$WORK/$tag.conf"
        cmd=("$OUTPOST" --config "$WORK/$tag.conf")
    else
        mosquitto_config "$scen" "$state" > "$WORK/$tag.conf"
        cmd=("$MOSQUITTO" -c "$WORK/$tag.conf")
    fi
    python3 "$WORK/iowrap.py" "$WORK/$tag.io.json" "$WORK/$tag.pid" "${cmd[@]}" \
        >"$OUT/logs/$tag.stdout" 2>&1 &
    local wrapper=$!
    PIDS+=("$wrapper")
    wait_port "$PORT" || { echo "$tag: broker did not start" >&2; exit 1; }
    # The wrapper writes the pid after Popen returns, which can be after the broker listens.
    for _ in $(seq 100); do [[ -s $WORK/$tag.pid ]] && break; sleep 0.05; done
    local pid; pid=$(cat "$WORK/$tag.pid")
    if [[ $scen == session ]]; then
        # A persistent QoS 1 session with its subscription, then offline (-W 1 ends it
        # after a second, its session stays).
        mosquitto_sub -p "$PORT" -i keeper -c -q 1 -t "$TOPIC" -W 1 >/dev/null 2>&1 || true
    fi
    # One warm-up message: it makes the files a first message makes once per process (the
    # store is opened on its first change, and each SQLite file gets its 4 MiB
    # `.reserve` of real bytes, sqlite/src/reserve.rs), so what follows is per message.
    mosquitto_pub -p "$PORT" -i warm -q 1 -t "$TOPIC" -m warm-up
    local io_start; io_start=$(read_io "$pid")
    local t0; t0=$(date +%s.%N)
    if [[ $mode == burst ]]; then
        # In chunks of 10,000: fed 100,000 lines at once, mosquitto_pub -l (2.0.11) sent
        # only about a third of them before it exited (both brokers kept the same ~34,500).
        local from
        for ((from = 0; from < n; from += 10000)); do
            local to=$((from + 10000 < n ? from + 10000 : n))
            sed -n "$((from + 1)),${to}p" "$WORK/payloads" \
                | timeout 900 mosquitto_pub -p "$PORT" -i pub -q 1 -t "$TOPIC" -l
        done
    elif [[ $mode == burst10 ]]; then
        # Ten publishers at once, n/10 messages each: what a site with many devices sends.
        local pubs=() i
        for i in $(seq 0 9); do
            head -n "$n" "$WORK/payloads" | awk -v i="$i" 'NR % 10 == i' \
                | timeout 900 mosquitto_pub -p "$PORT" -i "pub$i" -q 1 -t "$TOPIC" -l &
            pubs+=($!)
        done
        for i in "${pubs[@]}"; do wait "$i"; done
    elif [[ $mode == paced_many ]]; then
        # CLIENTS mosquitto_pub processes, each fed its share of the lines in turn, at
        # RATE messages/s in all.
        local fifos=() pubs=() i
        for ((i = 0; i < CLIENTS; i++)); do
            mkfifo "$WORK/fifo$i"
            timeout 900 mosquitto_pub -p "$PORT" -i "pub$i" -q 1 -t "$TOPIC" -l < "$WORK/fifo$i" &
            pubs+=($!)
            fifos+=("$WORK/fifo$i")
        done
        python3 "$WORK/pace_many.py" "$RATE" <(head -n "$n" "$WORK/payloads") "${fifos[@]}"
        for i in "${pubs[@]}"; do wait "$i"; done
        rm -f "${fifos[@]}"
    else
        python3 "$WORK/pace.py" "$RATE" <(head -n "$n" "$WORK/payloads") \
            | timeout 900 mosquitto_pub -p "$PORT" -i pub -q 1 -t "$TOPIC" -l
    fi
    local t1; t1=$(date +%s.%N)
    local io_before_stop; io_before_stop=$(read_io "$pid")
    local files; files=$(cd "$state" && find . -type f -printf '%p=%s ' 2>/dev/null)
    kill -TERM "$wrapper"
    wait "$wrapper" || true
    local files_after; files_after=$(cd "$state" && find . -type f -printf '%p=%s ' 2>/dev/null)
    # After the measurement: how many of the messages the broker really kept (the warm-up
    # message included), so the bytes are divided by messages that are on disk.
    local kept; kept=$(count_kept "$gw" "$scen" "$state" "$tag" "$((n + 1))")
    echo "$tag: kept $kept of $((n + 1)) (warm-up included)" >&2
    python3 - "$WORK/$tag.io.json" "$gw" "$scen" "$mode" "$n" "$t0" "$t1" "$io_start" \
        "$io_before_stop" "$files" "$files_after" "$PAYLOAD" "$TOPIC" "$kept" "$window" >> "$RESULTS" <<'EOF'
import json, sys
(path, gw, scen, mode, n, t0, t1, io_start, io_stop, files, files_after,
 payload, topic, kept, window) = sys.argv[1:]
end = json.load(open(path))
n = int(n)
start, stop = json.loads(io_start), json.loads(io_stop)
final = end["io_at_exit"]
# MQTT 3.1.1 PUBLISH at QoS 1: fixed header (1 byte + remaining length), topic length
# (2) + topic, packet identifier (2), payload.
remaining = 2 + len(topic) + 2 + int(payload)
own = 1 + (1 if remaining < 128 else 2) + remaining
row = {
    "gateway": gw, "scenario": scen, "mode": mode, "messages": n,
    "commit_window": window if gw == "outpost" else None,
    "kept_after_restart": int(kept) if kept.isdigit() else kept,
    "seconds": round(float(t1) - float(t0), 3),
    "message_bytes": own, "payload": int(payload), "topic_bytes": len(topic),
    "write_bytes_before_stop": stop["write_bytes"] - start["write_bytes"],
    "write_bytes_total": final["write_bytes"] - start["write_bytes"],
    "wchar_total": final["wchar"] - start["wchar"],
    "cancelled_write_bytes": final["cancelled_write_bytes"] - start["cancelled_write_bytes"],
    "write_bytes_since_start_of_process": final["write_bytes"],
    "write_bytes_setup": start["write_bytes"],
    "ru_oublock_bytes": end["ru_oublock_bytes"],
    "files_before_stop": files, "files_after_exit": files_after,
    "io_start": start, "io_before_stop": stop, "io_at_exit": final,
}
if isinstance(row["kept_after_restart"], int) and row["kept_after_restart"] < n:
    row["warning"] = "fewer messages kept than published"
row["write_bytes_per_message"] = round(row["write_bytes_total"] / n, 1)
row["wchar_per_message"] = round(row["wchar_total"] / n, 1)
row["ratio_to_message_bytes"] = round(row["write_bytes_per_message"] / own, 2)
print(json.dumps(row))
EOF
    tail -1 "$RESULTS" | python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
print("{gateway} {scenario} {mode} n={messages} window={commit_window}: write_bytes/msg={write_bytes_per_message} wchar/msg={wchar_per_message} ({seconds} s)".format(**r), file=sys.stderr)'
}

MODES=${MODES:-"burst burst10 paced paced_many"}
for scen in $SCENARIOS; do
    for mode in $MODES; do
        for gw in $GATEWAYS; do
            if [[ $gw == outpost ]]; then
                count=$N; [[ $mode == paced* ]] && count=$PACED_N
                for w in $WINDOWS; do run outpost "$scen" "$mode" "$count" "$w"; done
            elif [[ $mode == burst ]]; then
                # Mosquitto writes only at its save: one burst shows its bytes per message.
                run "$gw" "$scen" burst "$N"
            fi
        done
    done
done

python3 - "$RESULTS" > "$OUT/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| gateway | commit window | kept as | load | messages | msg/s | kept (after exit, warm-up incl.) | message bytes | write_bytes per message (before stop / with shutdown) | × message bytes | wchar per message | one-time set-up bytes | files at exit |")
print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    kept = {"spool": "bridge spool, cloud down", "session": "offline persistent session"}[r["scenario"]]
    load = {"burst": "1 publisher, as fast as acked",
            "burst10": "10 publishers, as fast as acked"}.get(r["mode"], "paced")
    if r["mode"] == "paced_many":
        load = f"{r['messages'] / r['seconds']:.0f} msg/s from many publishers"
    elif r["mode"] == "paced":
        load = f"{r['messages'] / r['seconds']:.0f} msg/s"
    n = r["messages"]
    window = r.get("commit_window") or "—"
    print(f"| {r['gateway']} | {window} | {kept} | {load} | {n:,} | {n / r['seconds']:,.0f} | {r['kept_after_restart']} | {r['message_bytes']} | "
          f"{r['write_bytes_before_stop'] / n:,.1f} / {r['write_bytes_per_message']:,.1f} | "
          f"{r['ratio_to_message_bytes']} | {r['wchar_per_message']:,.1f} | {r['write_bytes_setup']:,} | {r['files_after_exit']} |")
EOF
cat "$OUT/table.md"
