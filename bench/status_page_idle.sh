#!/usr/bin/env bash
# What a browser left open on the status page costs the gateway.
#
#   bench/status_page_idle.sh              MINUTES=10, target/release/outpost
#   MINUTES=60 OUTPOST=path/to/outpost bench/status_page_idle.sh
#
# Two identical gateways run side by side for MINUTES: broker on loopback, [http] on,
# one bridge to a local Mosquitto (the cloud) and nothing else. One has the status page
# open in headless Chromium (an event every second, charts redrawn); the other has no
# visitor (the control: its sampler still runs once a second for /metrics and /readyz).
# For each, CPU seconds (utime+stime from /proc/PID/stat) and RSS (VmRSS) are read after
# a warm-up and at the end. The difference between the two is what the page costs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINUTES=${MINUTES:-10}
OUTPOST=${OUTPOST:-$ROOT/target/release/outpost}
WARMUP=${WARMUP:-20}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
export PATH=$PATH:/usr/sbin
[ -x "$OUTPOST" ] || { echo "no outpost binary at $OUTPOST (cargo build --release -p outpost-gateway)" >&2; exit 1; }
command -v chromium >/dev/null || { echo "chromium is missing (apt-get install chromium)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tck=$(getconf CLK_TCK)
cpu() { awk -v t="$tck" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat"; }
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

cloud_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$cloud_port" > "$WORK/cloud.conf"
mosquitto -c "$WORK/cloud.conf" 2>/dev/null & PIDS+=($!)

start_gateway() { # NAME -> sets PID_NAME and HTTP_NAME
    local name=$1 dir=$WORK/$1
    mkdir -p "$dir"
    cat > "$dir/outpost.toml" <<TOML
gateway_id = "$name"
state_dir = "$dir"
[broker]
listeners = [{ bind = "127.0.0.1:0" }]
[http]
bind = "127.0.0.1:0"
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$cloud_port"
topics = [{ pattern = "data/#", direction = "out", qos = 1 }]
TOML
    "$OUTPOST" --config "$dir/outpost.toml" 2> "$dir/log" & PIDS+=($!)
    local pid=$! port=""
    for _ in $(seq 100); do
        port=$(grep -o 'status page on http://127.0.0.1:[0-9]*' "$dir/log" | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "$name did not start:"; cat "$dir/log"; exit 1; } >&2
    printf -v "PID_$name" '%s' "$pid"
    printf -v "HTTP_$name" '%s' "$port"
}
start_gateway viewed
start_gateway control

chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --no-first-run --remote-debugging-port=0 \
    --user-data-dir="$WORK/chromium" "http://127.0.0.1:$HTTP_viewed/" \
    >/dev/null 2>&1 & PIDS+=($!)

sleep "$WARMUP"
# The page holds its event stream open: one established connection to the HTTP port.
streams=$(ss -Htn state established "( sport = :$HTTP_viewed )" 2>/dev/null | wc -l)
v_cpu0=$(cpu "$PID_viewed"); v_rss0=$(rss "$PID_viewed")
c_cpu0=$(cpu "$PID_control"); c_rss0=$(rss "$PID_control")
echo "warm-up done; page connections to the viewed gateway: $streams; measuring for $MINUTES min"
sleep $((MINUTES * 60))
streams_end=$(ss -Htn state established "( sport = :$HTTP_viewed )" 2>/dev/null | wc -l)
v_cpu1=$(cpu "$PID_viewed"); v_rss1=$(rss "$PID_viewed")
c_cpu1=$(cpu "$PID_control"); c_rss1=$(rss "$PID_control")

echo
echo "status page open for $MINUTES min ($(uname -m), $(nproc) cores, $("$OUTPOST" --version))"
printf '%-28s %12s %12s %12s %12s\n' gateway "CPU s" "CPU ms/min" "RSS start" "RSS end"
row() {
    local ms
    ms=$(awk -v a="$2" -v b="$3" -v m="$MINUTES" 'BEGIN { printf "%.1f", (b - a) * 1000 / m }')
    printf '%-28s %12s %12s %9s KiB %9s KiB\n' "$1" "$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", b - a }')" "$ms" "$4" "$5"
}
row "with the page open" "$v_cpu0" "$v_cpu1" "$v_rss0" "$v_rss1"
row "no visitor (control)" "$c_cpu0" "$c_cpu1" "$c_rss0" "$c_rss1"
echo "page connections at the end: $streams_end"
