#!/usr/bin/env bash
# CI stage: the Debian packages (cargo-deb) for amd64, arm64 and armhf, lintian on each
# (any error fails), and an install/upgrade/remove/purge test of the arm64 package in
# the image's base root file system (a chroot through qemu-user binfmt).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
declare -A arch=([x86_64-unknown-linux-gnu]=amd64 [aarch64-unknown-linux-gnu]=arm64 [armv7-unknown-linux-gnueabihf]=armhf)
rm -rf "$target_dir/debian"
for t in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  s=$(date +%s)
  # The build machine's own target is built without --target (into target/release).
  target_arg=(--target "$t")
  [ "$t" = "$(rustc -vV | sed -n 's/^host: //p')" ] && target_arg=()
  cargo deb -p outpost-gateway "${target_arg[@]}" --locked --output "$target_dir/debian/${arch[$t]}/"
  deb=$(ls "$target_dir"/debian/"${arch[$t]}"/outpost_*_"${arch[$t]}".deb)
  echo "package $t: $(( $(date +%s) - s )) s, $(stat -c %s "$deb") bytes: $deb"
  dpkg-deb -I "$deb" | sed -n '/Package:/,$p'
  dpkg-deb -c "$deb"
  lintian --fail-on error --tag-display-limit 0 "$deb" | tee "$target_dir/debian/lintian-${arch[$t]}.txt"
  ! grep -q '^E:' "$target_dir/debian/lintian-${arch[$t]}.txt"
  echo "lintian ${arch[$t]}: no errors ($(grep -c '^W:' "$target_dir/debian/lintian-${arch[$t]}.txt" || true) warnings)"
done
# The upgrade test needs a newer version of the same package.
mkdir -p "$target_dir/debian/upgrade"
cargo deb -p outpost-gateway --target aarch64-unknown-linux-gnu --locked --no-build \
  --deb-revision 2 --output "$target_dir/debian/upgrade/"
ls -l "$target_dir"/debian/*/*.deb
# The install test runs in the image's cached base root file system.
OUTPOST_IMAGE_BASE_ONLY=1 image/build.sh
base=$(ls -d "${OUTPOST_IMAGE_CACHE:-/var/cache/outpost-image}"/base-bookworm-arm64-* | grep -v '\.tmp$' | head -1)
scripts/deb-install-test.sh "$base" "$(ls "$target_dir"/debian/arm64/outpost_*_arm64.deb)" \
  "$(ls "$target_dir"/debian/upgrade/outpost_*_arm64.deb)"
