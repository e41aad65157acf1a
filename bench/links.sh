#!/usr/bin/env bash
# Outpost's bridge and Mosquitto's own bridge over the same real, shaped link, side by side.
#
#   bench/links.sh [OUT_DIR]              everything (drain, then bytes)
#   MODE=bytes bench/links.sh OUT_DIR     only bytes on the wire per message
#   MODE=drain LINK=satellite N=20000 ... the drain over satellite (600 ms each way, 0.5%
#                                         loss, 256 kbit/s) instead of cellular
#   MODE=flap bench/links.sh OUT_DIR      a site link that flaps: down 5 s every 30 s for
#                                         FLAP_SECS (300), QoS 1 readings at 50/s throughout
#   N=20000 CAP=120 bench/links.sh        a smaller backlog, a shorter bound per drain
#   MODE=drain DRAINS="outpost-w1024 mosquitto" bench/links.sh OUT_DIR
#                                         only these drains (outpost-wW: max_inflight W;
#                                         outpost-default: no max_inflight line)
#
# Needs root (network namespaces), iproute2 (ip, tc), nftables, python3, mosquitto and
# mosquitto-clients. The link is built as tests/src/netlink.rs builds it: the cloud
# Mosquitto in one namespace, the gateway in another, one veth pair between them, tbf for
# bandwidth, nftables `numgen random` for loss, and a delaying TCP relay in the gateway
# namespace for the propagation delay (this kernel has no netem); the bridge connects to
# the relay.
#
# 1. drain: a backlog of N sensor readings (QoS 1) accepted while the link is down, then
#    drained over the cellular link (300 ms each way, 1% loss, 1 Mbit/s) while a live
#    reading is published every second. Reported: messages delivered within CAP seconds,
#    drain rate, the share of the link's bandwidth carrying message bytes (topic +
#    payload) between the first and the last backlog arrival, live latency (publish to
#    cloud arrival), reconnects. Gateways: outpost as configured by default (the window
#    sized to the link), outpost with a fixed cap of 256 (the old default), Mosquitto's
#    bridge.
# 2. bytes: BYTES_N readings at 200/s over a clean link; bytes on the veth (both
#    directions, so acknowledgements count as a metered link bills them) per message.
#
# Raw outputs go to OUT_DIR (default bench/runs/<date>-links).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-100000}
CAP=${CAP:-200}
BYTES_N=${BYTES_N:-2000}
MODE=${MODE:-all}
LINK=${LINK:-cellular}
FLAP_SECS=${FLAP_SECS:-300}
case $LINK in
    cellular) KBIT=1000 LOSS=10 DELAY=300 ;;
    satellite) KBIT=256 LOSS=5 DELAY=600 ;;
    *) echo "LINK is cellular or satellite" >&2; exit 1 ;;
esac
OUT=${1:-$ROOT/bench/runs/$(date -u +%F)-links}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PATH="$PATH:/usr/sbin"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUTPOST=${OUTPOST_BIN:-$TARGET_DIR/release/outpost}
[[ -x $OUTPOST ]] || { echo "no $OUTPOST: cargo build --release -p outpost-gateway (or set OUTPOST_BIN)" >&2; exit 1; }
for t in ip tc nft python3 mosquitto mosquitto_pub mosquitto_sub; do
    command -v "$t" >/dev/null || { echo "missing $t (apt-get install iproute2 nftables python3 mosquitto mosquitto-clients)" >&2; exit 1; }
done

GW=outpost-bench-gw-$$
CL=outpost-bench-cloud-$$
IFG=obg$$
IFC=obc$$
CLOUD_IP=10.201.0.1
GW_IP=10.201.0.2
RELAY_PORT=18830
WORK=$(mktemp -d)
chmod 777 "$WORK"   # mosquitto started as root drops to its own user
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for ns in "$GW" "$CL"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# ---- the link -------------------------------------------------------------------------
ip netns add "$GW"
ip netns add "$CL"
ip link add "$IFG" netns "$GW" type veth peer name "$IFC" netns "$CL"
for spec in "$GW $IFG $GW_IP" "$CL $IFC $CLOUD_IP"; do
    read -r ns ifn addr <<<"$spec"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/30" dev "$ifn"
    ip -n "$ns" link set "$ifn" up
    inns "$ns" nft -f - <<EOF
table inet outpost {
  chain loss { }
  chain input { type filter hook input priority 0; policy accept;
    iifname "$ifn" jump loss
  }
}
EOF
done

# shape RATE_KBIT LOSS_PERMILLE: tbf and loss on both ends (each direction).
shape() {
    local rate=$1 loss=$2
    for spec in "$GW $IFG" "$CL $IFC"; do
        read -r ns ifn <<<"$spec"
        inns "$ns" tc qdisc del dev "$ifn" root 2>/dev/null || true
        if ((rate > 0)); then
            local limit=$((rate * 1000 / 8 / 4)); ((limit < 16000)) && limit=16000
            inns "$ns" tc qdisc add dev "$ifn" root tbf rate "${rate}kbit" burst 6000 limit "$limit"
        fi
        printf 'flush chain inet outpost loss\n%s' \
            "$( ((loss > 0)) && echo "add rule inet outpost loss numgen random mod 1000 < $loss drop")" |
            inns "$ns" nft -f -
    done
}
link_up() { ip -n "$CL" link set "$IFC" "$1"; }
wire_bytes() { # tx rx of the gateway's veth end
    echo "$(inns "$GW" cat /sys/class/net/$IFG/statistics/tx_bytes) $(inns "$GW" cat /sys/class/net/$IFG/statistics/rx_bytes)"
}

# The delaying relay: holds each chunk DELAY_MS in each direction (a delay line: chunks
# keep flowing, each leaves DELAY_MS after it arrived).
cat >"$WORK/relay.py" <<'EOF'
import asyncio, sys, time
LISTEN, HOST, PORT, DELAY = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000

async def pipe(r, w):
    q = asyncio.Queue(256)
    async def release():
        while True:
            due, data = await q.get()
            if data is None:
                break
            d = due - time.monotonic()
            if d > 0:
                await asyncio.sleep(d)
            w.write(data)
            await w.drain()
    t = asyncio.create_task(release())
    try:
        while True:
            data = await r.read(16384)
            if not data:
                break
            await q.put((time.monotonic() + DELAY, data))
    except Exception:
        pass
    await q.put((0, None))
    try:
        await t
    except Exception:
        pass

async def handle(ir, iw):
    try:
        orr, ow = await asyncio.wait_for(asyncio.open_connection(HOST, PORT), 10)
    except Exception:
        iw.close()
        return
    tasks = {asyncio.create_task(pipe(ir, ow)), asyncio.create_task(pipe(orr, iw))}
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
    ow.close()
    iw.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    async with server:
        await server.serve_forever()

asyncio.run(main())
EOF

# A QoS 1 publisher that counts acknowledgements (mosquitto_pub -l exited 0 here with
# two thirds of a 100,000-line backlog never sent): readings from stdin, one per line, up
# to 100 in flight, optionally paced; exits non-zero unless every one was acknowledged.
cat >"$WORK/pub.py" <<'EOF'
import socket, struct, sys, time
host, port, topic, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
def varlen(n):
    out = b""
    while True:
        d, n = n % 128, n // 128
        out += bytes([d | (0x80 if n else 0)])
        if not n:
            return out
def pkt(first, body):
    return bytes([first]) + varlen(len(body)) + body
def s(b):
    return struct.pack(">H", len(b)) + b
sock = socket.create_connection((host, port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sock.sendall(pkt(0x10, s(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + s(b"bench-pub")))
buf = b""
def read_packets():
    global buf
    data = sock.recv(65536)
    if not data:
        sys.exit("gateway closed the connection")
    buf += data
    out = []
    while len(buf) >= 2:
        mult, n, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return out
            b = buf[i]; n += (b & 127) * mult; mult *= 128; i += 1
            if not b & 128:
                break
        if len(buf) < i + n:
            return out
        out.append((buf[0], buf[i:i + n])); buf = buf[i + n:]
    return out
while not read_packets():
    pass
lines = [l.rstrip(b"\n") for l in sys.stdin.buffer]
inflight, sent, acked, pid = 0, 0, 0, 0
start = time.monotonic()
while acked < len(lines):
    while sent < len(lines) and inflight < 100 and (rate <= 0 or time.monotonic() >= start + sent / rate):
        pid = pid % 65535 + 1
        sock.sendall(pkt(0x32, s(topic) + struct.pack(">H", pid) + lines[sent]))
        sent += 1; inflight += 1
    if sent < len(lines) and inflight < 100:
        sock.settimeout(max(0.0005, start + sent / rate - time.monotonic()))
    else:
        sock.settimeout(30)
    try:
        for first, _ in read_packets():
            if first >> 4 == 4:
                acked += 1; inflight -= 1
    except socket.timeout:
        if inflight and sock.gettimeout() == 30:
            sys.exit(f"no PUBACK for 30 s: {acked}/{len(lines)} acknowledged")
sock.sendall(b"\xe0\x00")
sock.close()
print(f"{acked} acknowledged", file=sys.stderr)
EOF

# ---- the cloud ------------------------------------------------------------------------
cat >"$WORK/cloud.conf" <<EOF
listener 1883
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
log_dest file $WORK/cloud.log
log_type notice
EOF
ip netns exec "$CL" mosquitto -c "$WORK/cloud.conf" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    inns "$CL" mosquitto_sub -h 127.0.0.1 -t probe -E -W 1 >/dev/null 2>&1 && break
    sleep 0.1
done

TOPIC=outpost/gw-01/sensors/boiler/temperature
# A reading as sensors/ publishes it, ~60 bytes of JSON; seq makes loss and order visible.
reading() { printf '{"seq":%d,"value":21.4,"unit":"C","ts":1796601488123,"q":"good"}' "$1"; }
python3 - "$N" >"$WORK/backlog.txt" <<'EOF'
import sys
for i in range(int(sys.argv[1])):
    print('{"seq":%d,"value":21.4,"unit":"C","ts":1796601488123,"q":"good"}' % i)
EOF

GW_PID=""
start_gateway() { # kind window address
    local kind=$1 window=$2 address=$3 host port
    rm -rf "$WORK/gw" && mkdir -p "$WORK/gw" && chmod 777 "$WORK/gw"
    if [[ $kind == outpost ]]; then
        cat >"$WORK/gw/outpost.toml" <<EOF
gateway_id = "gw-01"
[broker]
listeners = [{ bind = "127.0.0.1:1883" }]
[[bridge]]
name = "cloud"
address = "mqtt://$address"
$( [[ $window == default ]] || echo "max_inflight = $window" )
topics = [{ pattern = "outpost/#", direction = "out", qos = 1 }]
reconnect = { min = "100ms", max = "1s" }
[bridge.status]
enabled = false
EOF
        STATE_DIRECTORY="$WORK/gw" RUST_LOG=info NO_COLOR=1 \
            ip netns exec "$GW" "$OUTPOST" --config "$WORK/gw/outpost.toml" 2>"$WORK/gw/log" &
    else
        host=${address%:*}; port=${address##*:}
        # Debian's defaults, except that the queue is unbounded (the default of 1000 would
        # drop most of the backlog) and the log goes to a file for the reconnect count.
        cat >"$WORK/gw/mosquitto.conf" <<EOF
listener 1883 127.0.0.1
allow_anonymous true
max_queued_messages 0
log_dest file $WORK/gw/log
log_type error
log_type warning
log_type notice
log_type information
connection cloud
address $host:$port
topic outpost/# out 1
cleansession false
clientid mosquitto-gw-01-cloud
restart_timeout 1 2
EOF
        ip netns exec "$GW" mosquitto -c "$WORK/gw/mosquitto.conf" >/dev/null 2>&1 &
    fi
    GW_PID=$!
    PIDS+=("$GW_PID")
    for _ in $(seq 100); do
        inns "$GW" mosquitto_sub -h 127.0.0.1 -t probe -E -W 1 >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "gateway $kind did not start" >&2; exit 1
}
stop_gateway() { kill -9 "$GW_PID" 2>/dev/null || true; wait "$GW_PID" 2>/dev/null || true; }
# Connections the cloud accepted from the gateway's bridge so far (its log, the same
# count for both gateways).
cloud_connects() {
    # Mosquitto logs a bridge as "New bridge connected", any other client as "New client".
    grep -c 'New \(client\|bridge\) connected .* as \(outpost\|mosquitto\)-gw-01-cloud' "$WORK/cloud.log" || true
}

collector_start() { # id file secs
    inns "$CL" mosquitto_sub -h 127.0.0.1 -i "$1" -c -q 1 -t 'outpost/#' -E -W 5 >/dev/null
    # Not through the inns function: $! must be mosquitto_sub itself (ip netns exec execs
    # it), or killing it would leave the collector running into the next run.
    ip netns exec "$CL" mosquitto_sub -h 127.0.0.1 -i "$1" -c -q 1 -t 'outpost/#' -F '%U %t %p' -W "$3" >"$2" 2>/dev/null &
    COLLECTOR=$!
    PIDS+=("$COLLECTOR")
}

echo "# machine: $(uname -r), $(nproc) cores; outpost $OUTPOST; $(mosquitto -h 2>&1 | head -1)" | tee "$OUT/machine.txt"

# wait_arrivals RAW N SECS: until the collector has N readings of $TOPIC, or SECS pass.
wait_arrivals() {
    local deadline=$(( $(date +%s) + $3 ))
    while (( $(date +%s) < deadline )); do
        if (( $(grep -c " $TOPIC " "$1" || true) >= $2 )); then break; fi
        sleep 1
    done
}
# end_run KIND-LABEL RELAY_PID: stop the collector, keep the gateway's log, stop the
# gateway and the relay.
end_run() {
    kill "$COLLECTOR" 2>/dev/null || true
    wait "$COLLECTOR" 2>/dev/null || true
    cp "$WORK/gw/log" "$OUT/$1-gateway.log"
    stop_gateway
    kill "$2" 2>/dev/null || true
    wait "$2" 2>/dev/null || true
}

# ---- 1. drain over cellular -----------------------------------------------------------
drain_run() { # label kind window
    local label=$1 kind=$2 window=$3
    local raw="$OUT/drain-$label.txt"
    echo "== drain: $label (N=$N, $LINK, CAP=${CAP}s)"
    shape "$KBIT" "$LOSS"
    ip netns exec "$GW" python3 "$WORK/relay.py" "$RELAY_PORT" "$CLOUD_IP" 1883 "$DELAY" &
    local relay=$!
    PIDS+=("$relay")
    link_up down
    local connects0; connects0=$(cloud_connects)
    start_gateway "$kind" "$window" "127.0.0.1:$RELAY_PORT"
    local t_fill=$(date +%s.%N)
    inns "$GW" python3 "$WORK/pub.py" 127.0.0.1 1883 "$TOPIC" 0 <"$WORK/backlog.txt"
    echo "   backlog of $N acknowledged by the gateway in $(python3 -c "import time;print(round(time.time()-$t_fill,1))") s"
    collector_start "collector-$label" "$raw" $((CAP + 30))
    local before; before=$(wire_bytes)
    local t0; t0=$(date +%s.%N)
    link_up up
    # Live readings, one a second, stamped with their publish time.
    (
        while true; do
            inns "$GW" mosquitto_pub -h 127.0.0.1 -q 1 -t outpost/gw-01/sensors/boiler/live -m "$(date +%s.%N)" || true
            sleep 1
        done
    ) &
    local live=$!
    PIDS+=("$live")
    wait_arrivals "$raw" "$N" "$CAP"
    kill "$live" 2>/dev/null || true
    wait "$live" 2>/dev/null || true
    sleep 2
    local after; after=$(wire_bytes)
    local rc=$(( $(cloud_connects) - connects0 - 1 ))
    end_run "drain-$label" "$relay"
    python3 - "$raw" "$TOPIC" "$N" "$t0" "$before" "$after" "$KBIT" "$rc" "$label" <<'EOF' | tee -a "$OUT/summary.txt"
import sys, statistics
raw, topic, n, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
tx0, rx0 = map(int, sys.argv[5].split()); tx1, rx1 = map(int, sys.argv[6].split())
rate_kbit, reconnects, label = int(sys.argv[7]), sys.argv[8], sys.argv[9]
seqs, times, msg_bytes, lat = [], [], 0, []
for line in open(raw, errors="replace"):
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 3:
        continue
    ts, t, p = float(parts[0]), parts[1], parts[2]
    if t == topic:
        try:
            seqs.append(int(p.split(",")[0].split(":")[1]))
        except Exception:
            continue
        times.append(ts)
        msg_bytes += len(t.encode()) + len(p.encode())
    elif t.endswith("/live"):
        lat.append(ts - float(p))
uniq = set(seqs)
seen, firsts = set(), []
for s in seqs:
    if s not in seen:
        seen.add(s); firsts.append(s)
in_order = firsts == sorted(firsts)
span = (times[-1] - times[0]) if len(times) > 1 else float("nan")
cap_bps = rate_kbit * 1000 / 8
goodput = msg_bytes / span if span == span and span > 0 else float("nan")
lat_s = sorted(lat)
def pct(p):
    return lat_s[min(len(lat_s) - 1, int(p * len(lat_s)))] if lat_s else float("nan")
print(f"{label}: delivered {len(uniq)}/{n} unique ({len(seqs) - len(uniq)} duplicates, order kept: {in_order}); "
      f"first arrival {times[0] - t0 if times else float('nan'):.1f} s after link up, last {times[-1] - t0 if times else float('nan'):.1f} s; "
      f"drain {len(uniq) / (times[-1] - t0) if times else 0:.0f} msg/s; "
      f"message bytes {goodput / 1000:.1f} kB/s = {100 * goodput / cap_bps:.0f}% of {rate_kbit} kbit/s; "
      f"wire up {(tx1 - tx0) / max(1, len(seqs)):.0f} B/msg, down {(rx1 - rx0) / max(1, len(seqs)):.0f} B/msg; "
      f"live latency p50 {pct(0.5):.1f} s, max {pct(1.0):.1f} s over {len(lat)} live; reconnects {reconnects}")
EOF
}

# ---- 2. bytes per message -------------------------------------------------------------
bytes_run() { # label kind
    local label=$1 kind=$2
    local raw="$OUT/bytes-$label.txt"
    echo "== bytes: $label (BYTES_N=$BYTES_N at 200/s, clean link)"
    shape 0 0
    link_up up
    collector_start "bytes-$label" "$raw" 120
    start_gateway "$kind" 256 "$CLOUD_IP:1883"
    sleep 3   # connected, birth and subscriptions done
    local before; before=$(wire_bytes)
    python3 - "$BYTES_N" <<'EOF' | inns "$GW" python3 "$WORK/pub.py" 127.0.0.1 1883 "$TOPIC" 200
import sys
for i in range(int(sys.argv[1])):
    print('{"seq":%d,"value":21.4,"unit":"C","ts":1796601488123,"q":"good"}' % i)
EOF
    for _ in $(seq 60); do
        (( $(grep -c " $TOPIC " "$raw" || true) >= BYTES_N )) && break
        sleep 1
    done
    sleep 2   # the last acknowledgements
    local after; after=$(wire_bytes)
    local got; got=$(grep -c " $TOPIC " "$raw" || true)
    kill "$COLLECTOR" 2>/dev/null || true
    wait "$COLLECTOR" 2>/dev/null || true
    stop_gateway
    python3 - "$before" "$after" "$got" "$BYTES_N" "$label" "$TOPIC" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
tx0, rx0 = map(int, sys.argv[1].split()); tx1, rx1 = map(int, sys.argv[2].split())
got, n, label, topic = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
up, down = (tx1 - tx0) / n, (rx1 - rx0) / n
msg = len(topic) + len('{"seq":1000,"value":21.4,"unit":"C","ts":1796601488123,"q":"good"}')
total = up + down
month = total * 200 * 86400 * 30
print(f"{label}: {got}/{n} delivered; wire per message: up {up:.1f} B, down {down:.1f} B, total {total:.1f} B "
      f"(message itself ~{msg} B); a month of 1 reading/s from 200 points: {month / 1e9:.1f} GB")
EOF
}

# ---- 3. a flapping site link ----------------------------------------------------------
flap_run() { # label kind
    local label=$1 kind=$2
    local raw="$OUT/flap-$label.txt" n=$((FLAP_SECS * 50 + 500))
    echo "== flap: $label (down 5 s every 30 s for ${FLAP_SECS} s, $n QoS 1 readings at 50/s)"
    shape 0 0
    ip netns exec "$GW" python3 "$WORK/relay.py" "$RELAY_PORT" "$CLOUD_IP" 1883 10 &
    local relay=$!
    PIDS+=("$relay")
    link_up up
    local connects0; connects0=$(cloud_connects)
    collector_start "flap-$label" "$raw" $((FLAP_SECS + 120))
    start_gateway "$kind" default "127.0.0.1:$RELAY_PORT"
    python3 - "$n" >"$WORK/flap.txt" <<'EOF'
import sys
for i in range(int(sys.argv[1])):
    print('{"seq":%d,"value":21.4,"unit":"C","ts":1796601488123,"q":"good"}' % i)
EOF
    inns "$GW" python3 "$WORK/pub.py" 127.0.0.1 1883 "$TOPIC" 50 <"$WORK/flap.txt" &
    local pub=$!
    PIDS+=("$pub")
    local flaps=0 t_end=$(( $(date +%s) + FLAP_SECS ))
    while (( $(date +%s) + 30 <= t_end )); do
        sleep 25; link_up down; sleep 5; link_up up; flaps=$((flaps + 1))
    done
    wait "$pub" || echo "   publisher: not every reading acknowledged by the gateway"
    wait_arrivals "$raw" "$n" 120
    sleep 2
    local rc=$(( $(cloud_connects) - connects0 - 1 ))
    end_run "flap-$label" "$relay"
    python3 - "$raw" "$TOPIC" "$n" "$flaps" "$rc" "$label" <<'EOF' | tee -a "$OUT/summary.txt"
import sys
raw, topic, n, flaps, reconnects, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
seqs = []
for line in open(raw, errors="replace"):
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) == 3 and parts[1] == topic:
        try:
            seqs.append(int(parts[2].split(",")[0].split(":")[1]))
        except Exception:
            pass
seen, firsts = set(), []
for q in seqs:
    if q not in seen:
        seen.add(q); firsts.append(q)
print(f"{label}: flaps {flaps}; delivered {len(seen)}/{n} unique, lost {n - len(seen & set(range(n)))}, "
      f"{len(seqs) - len(seen)} duplicates, first arrivals in order: {firsts == sorted(firsts)}; reconnects {reconnects}")
EOF
}

if [[ $MODE == flap ]]; then
    for d in ${FLAPS:-outpost mosquitto}; do flap_run "$d" "$d"; done
fi
if [[ $MODE == all || $MODE == drain ]]; then
    for d in ${DRAINS:-outpost-default outpost-w256 mosquitto}; do
        case $d in
            outpost-default) drain_run "$d" outpost default ;;
            outpost-w*) drain_run "$d" outpost "${d#outpost-w}" ;;
            mosquitto) drain_run mosquitto mosquitto 0 ;;
        esac
    done
fi
if [[ $MODE == all || $MODE == bytes ]]; then
    bytes_run outpost outpost
    bytes_run mosquitto mosquitto
fi
cp "$WORK/cloud.log" "$OUT/cloud.log"
gzip -f "$OUT"/drain-*.txt "$OUT"/bytes-*.txt "$OUT"/flap-*.txt "$OUT"/*.log 2>/dev/null || true
echo "raw outputs (gzip) and summary.txt in $OUT"
