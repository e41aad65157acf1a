#!/usr/bin/env bash
# Smoke test of one outpost binary (native, or foreign under a qemu-user runner):
#   scripts/smoke.sh [--runner "qemu-aarch64 -L /usr/aarch64-linux-gnu"] BINARY
# It starts a real Mosquitto as the "cloud" on loopback, then outpost with a bridge to
# it, and checks: outpost serves MQTT on loopback and a QoS 1 round trip passes
# (mosquitto_pub -> outpost -> mosquitto_sub); with the cloud down, QoS 1 messages are
# acknowledged and committed to the bridge spool (rows in bridge-cloud.sqlite); when the
# cloud comes back, all of them arrive there. Needs mosquitto, mosquitto-clients, python3.
set -euo pipefail
runner=()
if [ "${1:-}" = "--runner" ]; then read -r -a runner <<<"$2"; shift 2; fi
bin=$(realpath "$1")
export PATH="$PATH:/usr/sbin"
work=$(mktemp -d /tmp/outpost-smoke.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "SMOKE FAIL: $*" >&2; echo "--- outpost log:" >&2; tail -30 "$work/outpost.log" >&2 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port seconds
  for _ in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
P=$(free_port); C=$(free_port)
mkdir -p "$work/cloud" "$work/state"
cat >"$work/cloud.conf" <<CONF
listener $C 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/cloud/
# Started as root, Mosquitto would drop to its own user, fail to save its database in
# this private directory, and forget the collector's session across the restart below.
user root
CONF
start_cloud() {
  mosquitto -c "$work/cloud.conf" >>"$work/cloud.log" 2>&1 &
  cloud_pid=$!; pids+=("$cloud_pid")
  wait_port "$C" 10 || fail "cloud mosquitto did not start"
}
cat >"$work/outpost.toml" <<CONF
gateway_id = "smoke"
state_dir = "$work/state"
[broker]
listeners = [{ bind = "127.0.0.1:$P" }]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$C"
protocol = "3.1.1"
topics = [{ pattern = "sensors/#", direction = "out", qos = 1 }]
# Reconnect promptly when the cloud returns (the default backoff grows to 60 s).
reconnect = { min = "1s", max = "2s" }
CONF
start_cloud
# A persistent session on the cloud collects what the bridge forwards, also while the
# subscriber itself is not connected.
mosquitto_sub -p "$C" -i smoke-cloud -c -q 1 -t 'sensors/#' -E

t0=$(date +%s%N)
"${runner[@]}" "$bin" --config "$work/outpost.toml" >"$work/outpost.log" 2>&1 &
outpost_pid=$!; pids+=("$outpost_pid")
wait_port "$P" 30 || fail "outpost did not listen on 127.0.0.1:$P"
echo "outpost listening after $(( ($(date +%s%N) - t0) / 1000000 )) ms"

# QoS 1 round trip through the local broker.
mosquitto_sub -p "$P" -q 1 -t smoke/rt -C 1 -W 20 >"$work/rt.out" &
sub=$!
sleep 1
mosquitto_pub -p "$P" -q 1 -t smoke/rt -m "round-trip" || fail "QoS 1 publish refused"
wait "$sub" || fail "no QoS 1 round trip"
[ "$(cat "$work/rt.out")" = "round-trip" ] || fail "round trip payload: $(cat "$work/rt.out")"
echo "QoS 1 round trip: ok"

# Cloud down: messages are acknowledged only once committed to the spool.
kill "$cloud_pid"; wait "$cloud_pid" 2>/dev/null || true
# Without its database the collector's session is gone and the check below races the bridge.
[ -s "$work/cloud/mosquitto.db" ] || fail "the cloud did not save its database: $(tail -3 "$work/cloud.log")"
sleep 1
for i in 1 2 3; do
  mosquitto_pub -p "$P" -q 1 -t "sensors/t$i" -m "spooled-$i" || fail "publish $i refused"
done
rows=$(python3 - "$work/state/bridge-cloud.sqlite" <<'PY'
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("select count(*) from messages").fetchone()[0])
PY
)
[ "$rows" -ge 3 ] || fail "spool holds $rows rows, expected 3"
echo "bridge spool: $rows messages committed while the cloud is down"

# Cloud back: everything arrives.
start_cloud
mosquitto_sub -p "$C" -i smoke-cloud -c -q 1 -t 'sensors/#' -C 3 -W 60 -v >"$work/cloud.out" || true
for i in 1 2 3; do
  grep -qx "sensors/t$i spooled-$i" "$work/cloud.out" || fail "sensors/t$i not delivered: $(cat "$work/cloud.out")"
done
echo "bridge: 3/3 spooled messages delivered after the outage"
kill -TERM "$outpost_pid"; wait "$outpost_pid" 2>/dev/null || true
echo "SMOKE PASS: $bin"
