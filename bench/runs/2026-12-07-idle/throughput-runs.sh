#!/usr/bin/env bash
# 1→1 QoS 0 and QoS 1, this branch against its branch point (ac89f54), alternating, 3 runs.
set -euo pipefail
cd /work/wt-idlemem
R=bench/runs/2026-12-07-idle
source bench/broker_configs.sh
write_broker_configs /tmp/idlecfg 28830 28831 20
: > $R/throughput.jsonl
for rep in 1 2 3; do for q in 0 1; do for b in outpost-ac89f54 outpost; do
  if [ $b = outpost ]; then bin=target/release/outpost; else bin=/tmp/outpost-base; fi
  target/release/outpost-bench load --addr 127.0.0.1:28830 --label "1→1 QoS$q" --broker-name $b \
    --json $R/throughput.jsonl -p 1 -s 1 -q $q --payload 64 --inflight 20 -n 50000000 -d 5s \
    -- $bin --config /tmp/idlecfg/outpost.toml > /dev/null
done; done; done
