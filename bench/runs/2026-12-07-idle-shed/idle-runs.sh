#!/usr/bin/env bash
# Idle clients, then a burst (3 QoS 1 messages from every client), then 25 s of rest:
# Outpost with a parked connection's queue room given back (/tmp/outpost-shed, the build
# of this change), without it (/tmp/outpost-noshed, the same tree with the one call
# commented out) and Mosquitto, alternating, twice per size. Host, release builds.
set -euo pipefail
cd "$(dirname "$0")/../../.."
ulimit -n 20000
R=bench/runs/2026-12-07-idle-shed
source bench/broker_configs.sh
mkdir -p /tmp/idlecfg-shed
write_broker_configs /tmp/idlecfg-shed 28860 28861 20
J=$R/idle.jsonl
: > "$J"
for rep in 1 2; do
  for n in 10000 19000; do
    for b in outpost-shed outpost-noshed mosquitto; do
      case $b in
        mosquitto) port=28861; cmd="/usr/sbin/mosquitto -c /tmp/idlecfg-shed/mosquitto.conf";;
        *) port=28860; cmd="/tmp/$b --config /tmp/idlecfg-shed/outpost.toml";;
      esac
      target/release/outpost-bench idle --addr 127.0.0.1:$port -c $n --hold 3s --burst 3 --rest 25s \
        --label "idle $n clients" --broker-name $b --json "$J" -- $cmd 2>&1 | grep '^\[' || echo "FAILED $b $n"
    done
  done
done
