#!/usr/bin/env bash
# CI stage: release builds for the Raspberry Pi targets with Debian's cross gcc, each run
# under qemu-user for a smoke test (scripts/smoke.sh: MQTT on loopback, a QoS 1 round
# trip, the bridge spool through a cloud outage), and the protocol crate's tests under
# qemu-aarch64 (byte order and alignment bugs live there).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  s=$(date +%s)
  cargo build --release --locked --target "$t" -p outpost-gateway
  echo "build $t: $(( $(date +%s) - s )) s"
done
declare -A runner=(
  [aarch64-unknown-linux-gnu]="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  [armv7-unknown-linux-gnueabihf]="qemu-arm -L /usr/arm-linux-gnueabihf"
)
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  bin=$target_dir/$t/release/outpost
  file "$bin" 2>/dev/null || true
  echo "size $t: $(stat -c %s "$bin") bytes"
  ${runner[$t]} "$bin" --version
  scripts/smoke.sh --runner "${runner[$t]}" "$bin"
done
s=$(date +%s)
# The runner in .cargo/config.toml runs the test binaries under qemu-aarch64.
cargo test --locked --target aarch64-unknown-linux-gnu -p outpost-mqtt
echo "outpost-mqtt tests under qemu-aarch64: $(( $(date +%s) - s )) s"
