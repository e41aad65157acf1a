#!/usr/bin/env bash
# Builds the flashable Raspberry Pi SD image (arm64, Debian bookworm) with the outpost
# .deb installed and enabled:
#
#   image/build.sh [path/to/outpost_*_arm64.deb] [output dir]
#
# Without a .deb it builds one (cargo-deb, aarch64). Output: OUT/outpost-rpi-arm64.img.xz,
# OUT/outpost-rpi-arm64.dpkg-l.txt (the package versions inside) and, for the boot test,
# OUT/vmlinuz + OUT/initrd.img. OUT defaults to target/image.
#
# Stages:
#  1. base root file system (mmdebstrap: systemd, kernel, raspi-firmware, initramfs, ssh,
#     networkd, timesyncd): cached in $OUTPOST_IMAGE_CACHE (default
#     /var/cache/outpost-image), keyed by a hash of image/base/ and this stage's options.
#     OUTPOST_IMAGE_REBUILD=1 ignores the cache (always rebuildable from scratch).
#  2. the outpost .deb, first-boot provisioning, network/ssh settings (every build).
#  3. assembly without mounts: mkfs.vfat + mcopy (boot), mke2fs -d (root), genimage (MBR).
# Needs root, and Debian's mmdebstrap arch-test qemu-user-static binfmt-support genimage
# mtools dosfstools e2fsprogs xz-utils (scripts/ci-image.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
deb=${1:-}
out=${2:-$repo/target/image}
suite=bookworm
mirror=${OUTPOST_IMAGE_MIRROR:-http://deb.debian.org/debian}
security=${OUTPOST_IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
cache=${OUTPOST_IMAGE_CACHE:-/var/cache/outpost-image}
name=outpost-rpi-arm64
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

[ "$(id -u)" -eq 0 ] || { echo "image/build.sh must run as root (chroot, file ownership)" >&2; exit 1; }

# Foreign-architecture chroots: qemu-aarch64 through binfmt_misc, with the F flag so it
# works inside the chroot.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
fi

mkdir -p "$out" "$cache"
out=$(realpath "$out")

# ---- 1. base root file system (cached) ----
components="main non-free-firmware"
sources="deb $mirror $suite $components
deb $mirror $suite-updates $components
deb $security $suite-security $components"
key=$( (cd "$here/base" && find . -type f -print0 | sort -z | xargs -0 sha256sum; echo "$suite|$sources|v1") | sha256sum | cut -c1-16)
base="$cache/base-$suite-arm64-$key"
if [ -d "$base" ] && [ "${OUTPOST_IMAGE_REBUILD:-0}" != 1 ]; then
  stamp "base root fs: cached $base"
else
  stamp "base root fs: building $base (mmdebstrap)"
  include=$(grep -v '^\s*#' "$here/base/packages.txt" | grep -v '^\s*$' | paste -sd, -)
  # The files under image/base/etc are in place before the packages install (the
  # initramfs module list, the root partition for raspi-firmware's cmdline.txt);
  # force-confold keeps them where they are conffiles.
  rm -rf "$base.tmp"
  mmdebstrap --arch=arm64 --variant=minbase --mode=root \
    --include="$include" \
    --dpkgopt=force-confold --dpkgopt=force-confdef \
    --setup-hook="cp -a '$here/base/etc/.' \"\$1/etc/\"" \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --format=directory "$suite" "$base.tmp" - <<<"$sources"
  # Older bases are dead weight.
  find "$cache" -mindepth 1 -maxdepth 1 -name "base-$suite-arm64-*" ! -name "$(basename "$base").tmp" -exec rm -rf {} +
  mv "$base.tmp" "$base"
fi

[ "${OUTPOST_IMAGE_BASE_ONLY:-0}" = 1 ] && exit 0

if [ -z "$deb" ]; then
  stamp "building the arm64 .deb"
  (cd "$repo" && cargo deb -p outpost-gateway --target aarch64-unknown-linux-gnu --locked)
  deb=$(ls -t "${CARGO_TARGET_DIR:-$repo/target}"/aarch64-unknown-linux-gnu/debian/outpost_*_arm64.deb | head -1)
fi
deb=$(realpath "$deb")

# ---- 2. the appliance layer ----
work=$(mktemp -d /var/tmp/outpost-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"
stamp "copying the base"
cp -a "$base/." "$root/"
stamp "installing $(basename "$deb")"
cp "$deb" "$root/tmp/outpost.deb"
# No service starts inside the build chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
chroot "$root" dpkg -i /tmp/outpost.deb
rm -f "$root/tmp/outpost.deb" "$root/usr/sbin/policy-rc.d"

cp -a "$here/overlay/." "$root/"
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service \
  systemd-timesyncd.service ssh.service outpost.service outpost-firstboot.service outpost-sshkeys.service >/dev/null
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
echo outpost >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\toutpost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# A fresh machine id on first boot (empty file: systemd generates and commits it).
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# No default password anywhere: every account is locked (root:* from the base; checked).
if awk -F: '$2 !~ /^[*!]/ { print $1; bad=1 } END { exit !bad }' "$root/etc/shadow"; then
  echo "accounts with a usable password in the image (above): refusing" >&2; exit 1
fi
COLUMNS=200 chroot "$root" dpkg -l >"$out/$name.dpkg-l.txt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/tmp/*

# ---- 3. assembly ----
stamp "assembling"
kver=$(ls "$root/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
# The boot partition's files come from /boot/firmware (raspi-firmware's kernel hooks
# keep it filled); in the root file system that directory is only the mount point.
img=$work/img
mkdir -p "$img"
boot_mib=256
mkfs.vfat -C -n RASPIFIRM -F 32 "$img/boot.vfat" $((boot_mib * 1024)) >/dev/null
mcopy -s -p -m -i "$img/boot.vfat" "$root/boot/firmware/"* ::/
rm -rf "${root:?}/boot/firmware/"*
used_mib=$(du -sm --apparent-size "$root" | cut -f1)
root_mib=$(( used_mib * 5 / 4 + 256 ))
mke2fs -q -t ext4 -L RASPIROOT -d "$root" -E root_owner=0:0 "$img/root.ext4" "${root_mib}M"
cat >"$img/genimage.cfg" <<CFG
image $name.img {
  hdimage {
    partition-table-type = "mbr"
  }
  partition boot {
    partition-type = 0xC
    bootable = true
    image = "boot.vfat"
    offset = 4M
  }
  partition root {
    partition-type = 0x83
    image = "root.ext4"
  }
}
CFG
mkdir -p "$work/empty-root"
genimage --config "$img/genimage.cfg" --inputpath "$img" --outputpath "$img" \
  --rootpath "$work/empty-root" --tmppath "$work/genimage-tmp" >/dev/null 2>"$work/genimage.log" \
  || { cat "$work/genimage.log" >&2; exit 1; }
stamp "compressing"
xz -T0 -1 -c "$img/$name.img" >"$out/$name.img.xz.tmp"
mv "$out/$name.img.xz.tmp" "$out/$name.img.xz"
echo "kernel $kver; outpost $(dpkg-deb -f "$deb" Version)" >"$out/$name.versions.txt"
stamp "done: $out/$name.img.xz ($(du -h "$out/$name.img.xz" | cut -f1), $(du -h --apparent-size "$img/$name.img" | cut -f1) raw)"
