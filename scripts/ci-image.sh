#!/usr/bin/env bash
# CI stage: the SD image from the arm64 .deb (image/build.sh), then its boot test under
# qemu-system-aarch64 (image/boot-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
s=$(date +%s)
image/build.sh "$(ls "$target_dir"/debian/arm64/outpost_*_arm64.deb)" "$target_dir/image"
echo "image build: $(( $(date +%s) - s )) s; $(stat -c %s "$target_dir/image/outpost-rpi-arm64.img.xz") bytes .img.xz"
s=$(date +%s)
image/boot-test.sh "$target_dir/image"
echo "boot test: $(( $(date +%s) - s )) s"
