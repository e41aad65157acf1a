#!/usr/bin/env bash
# CI stage: the unit's exposure score must be at most 2.0 (systemd-analyze security
# --offline); `systemd-analyze verify` must print nothing (it exits 0 even on syntax
# errors, so any output fails). Verify needs /usr/bin/outpost: it is checked here against
# a scratch root with the unit and a stand-in binary, and again against the real package
# in a Debian root (scripts/deb-install-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(systemd-analyze security --offline=yes --threshold=20 systemd/outpost.service 2>&1) || { echo "$out"; exit 1; }
score=$(sed -n 's/.*Overall exposure level for outpost.service: \([0-9.]*\).*/\1/p' <<<"$out")
python3 -c "import sys; sys.exit(0 if float('$score') <= 2.0 else 1)" || { echo "$out"; echo "exposure $score > 2.0"; exit 1; }
echo "exposure score: $score (threshold 2.0)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/lib "$root/lib"
ln -s usr/bin "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
printf '#!/bin/sh\n' >"$root/usr/bin/outpost"; chmod 755 "$root/usr/bin/outpost"
cp systemd/outpost.service "$root/etc/systemd/system/"
v=$(systemd-analyze verify --man=no --root="$root" /etc/systemd/system/outpost.service 2>&1 || true)
if [ -n "$v" ]; then echo "systemd-analyze verify printed:"; echo "$v"; exit 1; fi
echo "systemd-analyze verify: no output"
