#!/usr/bin/env bash
# Three more alternating 1→1 QoS 1 runs of each binary (the first three were noisy).
set -euo pipefail
cd /work/wt-idle512
R=bench/runs/2026-12-07-idle512
for rep in 1 2 3; do for b in outpost outpost-main; do
  if [ $b = outpost ]; then bin=target/release/outpost; else bin=/tmp/outpost-main-idle512; fi
  target/release/outpost-bench load --addr 127.0.0.1:28840 --label "1→1 QoS1" --broker-name $b \
    --json $R/throughput.jsonl -p 1 -s 1 -q 1 --payload 64 --inflight 20 -n 50000000 -d 5s \
    -- $bin --config /tmp/idlecfg512/outpost.toml > /dev/null
done; done
