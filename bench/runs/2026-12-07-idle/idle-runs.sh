#!/usr/bin/env bash
# Side-by-side idle runs: Outpost (this branch), Outpost (branch point ac89f54) and Mosquitto.
# Each: N idle clients, 3 s hold, then every client publishes 3 QoS 1 messages (PUBACKs
# awaited) and all idle 25 s more; RSS before, at rest, burst peak, after the burst.
set -euo pipefail
cd /work/wt-idlemem
ulimit -n 20000
R=bench/runs/2026-12-07-idle
source bench/broker_configs.sh
write_broker_configs /tmp/idlecfg 28830 28831 20
: > $R/idle.jsonl
for n in 1000 10000 19000; do
  for b in outpost mosquitto outpost-ac89f54; do
    case $b in
      outpost) port=28830; cmd="target/release/outpost --config /tmp/idlecfg/outpost.toml";;
      outpost-ac89f54) port=28830; cmd="/tmp/outpost-base --config /tmp/idlecfg/outpost.toml";;
      mosquitto) port=28831; cmd="/usr/sbin/mosquitto -c /tmp/idlecfg/mosquitto.conf";;
    esac
    target/release/outpost-bench idle --addr 127.0.0.1:$port -c $n --hold 3s --burst 3 --rest 25s \
      --label "idle $n clients" --broker-name $b --json $R/idle.jsonl -- $cmd 2>&1 | grep '^\[' || echo "FAILED $b $n"
  done
done
