#!/usr/bin/env bash
# Sensor layer benchmarks (issue targets: Modbus TCP 15,000 points/s from 500 devices at
# 1 s polls under 0.25 of one core; RTU requests per cycle at the coalescing minimum).
#
#   bench/sensors.sh              500 devices x 30 points for 10 s, then RTU at 9600 baud
#
# Both are examples of the sensors crate so they run the layer's own code paths; the
# simulated devices run in a separate process and their CPU is not counted.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
command -v socat >/dev/null || { echo "socat is needed for the RTU run (apt-get install socat)" >&2; exit 1; }
# 500 devices need 1,000+ descriptors (gateway side and simulator side).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo run --release -q -p outpost-sensors --example modbus_bench -- "${DEVICES:-500}" "${POINTS:-30}" "${SECONDS_:-10}"
cargo run --release -q -p outpost-sensors --example rtu_bench -- "${BAUD:-9600}" "${SECONDS_:-10}"
