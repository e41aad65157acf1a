#!/usr/bin/env bash
# Side-by-side idle runs: Outpost (branch idle512), Outpost (main at 9c35051, the branch
# point) and Mosquitto. Each: N idle clients, 3 s hold, then every client publishes 3 QoS 1
# messages (PUBACKs awaited) and all idle 25 s more; RSS before, at rest, burst peak,
# after the burst. /tmp/outpost-main-idle512 is a release build of 9c35051.
# SIZES picks the client counts; RUN=x writes idle-x.jsonl instead of idle.jsonl.
set -euo pipefail
cd /work/wt-idle512
ulimit -n 20000
R=bench/runs/2026-12-07-idle512
source bench/broker_configs.sh
mkdir -p /tmp/idlecfg512
write_broker_configs /tmp/idlecfg512 28840 28841 20
J=$R/idle${RUN:+-$RUN}.jsonl
: > $J
for n in ${SIZES:-1000 10000 19000}; do
  for b in outpost mosquitto outpost-main; do
    case $b in
      outpost) port=28840; cmd="target/release/outpost --config /tmp/idlecfg512/outpost.toml";;
      outpost-main) port=28840; cmd="/tmp/outpost-main-idle512 --config /tmp/idlecfg512/outpost.toml";;
      mosquitto) port=28841; cmd="/usr/sbin/mosquitto -c /tmp/idlecfg512/mosquitto.conf";;
    esac
    target/release/outpost-bench idle --addr 127.0.0.1:$port -c $n --hold 3s --burst 3 --rest 25s \
      --label "idle $n clients" --broker-name $b --json $J -- $cmd 2>&1 | grep '^\[' || echo "FAILED $b $n"
  done
done
