#!/usr/bin/env bash
# Runs every test of the workspace, installing what the end-to-end tests need first:
# mosquitto (the "cloud" broker and a reference), mosquitto-clients (mosquitto_pub/sub),
# socat (pseudo-terminal pairs for Modbus RTU and serial tests), chromium, prometheus
# (promtool), nftables and iproute2 (shaped links), rabbitmq-server (a cloud without QoS 2).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The link tests (tests/tests/bridge_links.rs) shape veth pairs in network namespaces.
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
{ command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ]; } || need+=(iproute2)
# A cloud that is not Mosquitto (tests/tests/bridge_rabbitmq.rs): each test starts its own
# node on free loopback ports.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test dependencies: ${need[*]}"
  $sudo apt-get update -qq
  # Packages such as rabbitmq-server start a system service on install; the tests start
  # their own instances, so keep the package from starting one (policy-rc.d, 101 = deny),
  # unless the machine already has a policy.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" || rc=$?
  [ -z "$policy" ] || $sudo rm -f "$policy"
  [ "$rc" -eq 0 ] || exit "$rc"
fi
# Debian installs mosquitto in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# No import cycle between sibling modules in any crate (issue #11).
python3 scripts/module-cycles.py

# The end-to-end tests run the real binary; build it once with the workspace's features.
cargo build --workspace --locked --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export OUTPOST_BIN="$target_dir/debug/outpost"
cargo test --workspace --locked --no-fail-fast "$@"
