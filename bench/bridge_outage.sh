#!/usr/bin/env bash
# Side by side: Outpost's bridge and Mosquitto's own bridge in the same cloud outage.
#
#   bench/bridge_outage.sh            N=5000 messages per scenario
#   N=20000 bench/bridge_outage.sh
#
# For each gateway (outpost, then mosquitto with a `connection` bridge), and for two
# scenarios, it publishes N QoS 1 messages to the gateway while the cloud (a Mosquitto
# with persistence) is down, and counts what reaches a persistent QoS 1 subscriber at the
# cloud once it is back:
#   outage:  cloud down, publish, cloud back.
#   crash:   cloud down, publish, gateway killed with SIGKILL and restarted, cloud back.
# Every message the gateway acknowledged should arrive; "lost" counts those that did not.
# Mosquitto runs as Debian ships it for a bridge: defaults, persistence off.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-5000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
chmod 777 "$WORK"   # mosquitto started as root drops to its own user
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [[ ! -x $MOSQUITTO ]] || ! command -v mosquitto_pub >/dev/null; then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq mosquitto mosquitto-clients
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi
OUTPOST=${OUTPOST_BIN:-$TARGET_DIR/release/outpost}
if [[ -z ${OUTPOST_BIN:-} ]]; then
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p outpost-gateway)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

CLOUD_PORT=$(free_port)
GW_PORT=$(free_port)
CLOUD_PID=""
GW_PID=""

cloud_start() {
    mkdir -p "$WORK/cloud" && chmod 777 "$WORK/cloud"
    cat > "$WORK/cloud.conf" <<EOF
listener $CLOUD_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $WORK/cloud/
max_queued_messages 0
EOF
    "$MOSQUITTO" -c "$WORK/cloud.conf" >/dev/null 2>&1 & CLOUD_PID=$!; PIDS+=("$CLOUD_PID")
    wait_port "$CLOUD_PORT"
}
cloud_stop() { kill -TERM "$CLOUD_PID" 2>/dev/null; wait "$CLOUD_PID" 2>/dev/null || true; }

gateway_start() { # $1 = outpost | mosquitto
    if [[ $1 == outpost ]]; then
        cat > "$WORK/outpost.toml" <<EOF
gateway_id = "gw-bench"
state_dir = "$WORK/outpost-state"
[log]
level = "error"
[broker]
listeners = [{ bind = "127.0.0.1:$GW_PORT" }]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$CLOUD_PORT"
topics = [{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }]
reconnect = { min = "200ms", max = "1s" }
EOF
        "$OUTPOST" --config "$WORK/outpost.toml" 2>/dev/null & GW_PID=$!
    else
        cat > "$WORK/gw-mosquitto.conf" <<EOF
listener $GW_PORT 127.0.0.1
allow_anonymous true
connection cloud
address 127.0.0.1:$CLOUD_PORT
topic q1/# out 1 "" up/
cleansession false
restart_timeout 1
EOF
        "$MOSQUITTO" -c "$WORK/gw-mosquitto.conf" >/dev/null 2>&1 & GW_PID=$!
    fi
    PIDS+=("$GW_PID")
    wait_port "$GW_PORT"
}
gateway_kill9() { kill -9 "$GW_PID" 2>/dev/null; wait "$GW_PID" 2>/dev/null || true; }
gateway_stop() { kill -TERM "$GW_PID" 2>/dev/null; wait "$GW_PID" 2>/dev/null || true; }

run() { # $1 gateway, $2 scenario
    rm -rf "$WORK/cloud" "$WORK/outpost-state"
    cloud_start
    # Register the persistent collector session, then take the cloud down.
    mosquitto_sub -p "$CLOUD_PORT" -i collector -c -q 1 -t 'up/#' -C 1 -W 1 >/dev/null 2>&1 || true
    cloud_stop
    gateway_start "$1"
    # mosquitto_pub -l sends one QoS 1 message per line and exits once all are acknowledged.
    local acked=0
    if seq 0 $((N - 1)) | timeout 120 mosquitto_pub -p "$GW_PORT" -q 1 -t q1/meter -l; then acked=$N; fi
    if [[ $2 == crash ]]; then
        gateway_kill9
        gateway_start "$1"
    fi
    cloud_start
    # Give the bridge time to reconnect and drain, then collect what the cloud queued.
    sleep 8
    local got
    got=$(timeout 20 mosquitto_sub -p "$CLOUD_PORT" -i collector -c -q 1 -t 'up/#' -W 5 2>/dev/null | sort -un | wc -l || true)
    gateway_stop
    cloud_stop
    printf '| %s | %s | %d | %d | %d |\n' "$1" "$2" "$acked" "$got" $((acked - got))
}

echo "| gateway | scenario | acknowledged | arrived at the cloud | lost |"
echo "|---|---|---:|---:|---:|"
for scenario in outage crash; do
    for gw in outpost mosquitto; do
        run "$gw" "$scenario"
    done
done
