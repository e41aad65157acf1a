#!/usr/bin/env bash
# 1→1 QoS 0 and QoS 1, this branch (idle512) against main (9c35051), alternating, 3 runs.
set -euo pipefail
cd /work/wt-idle512
R=bench/runs/2026-12-07-idle512
source bench/broker_configs.sh
mkdir -p /tmp/idlecfg512
write_broker_configs /tmp/idlecfg512 28840 28841 20
: > $R/throughput.jsonl
for rep in 1 2 3; do for q in 0 1; do for b in outpost-main outpost; do
  if [ $b = outpost ]; then bin=target/release/outpost; else bin=/tmp/outpost-main-idle512; fi
  target/release/outpost-bench load --addr 127.0.0.1:28840 --label "1→1 QoS$q" --broker-name $b \
    --json $R/throughput.jsonl -p 1 -s 1 -q $q --payload 64 --inflight 20 -n 50000000 -d 5s \
    -- $bin --config /tmp/idlecfg512/outpost.toml > /dev/null
done; done; done
