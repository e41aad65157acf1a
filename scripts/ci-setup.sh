#!/usr/bin/env bash
# Installs what the appliance CI stages need on a fresh Debian 12 machine (root or sudo):
# cross linkers and qemu-user, Mosquitto for the smoke tests, lintian, the image tools,
# and qemu-system-arm from bookworm-backports (the preinstalled qemu-utils 10.x breaks
# bookworm's own qemu-system-common 7.2).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
. /etc/os-release
pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  qemu-user qemu-user-static binfmt-support mosquitto mosquitto-clients socat openssl python3 lintian
  dpkg-dev mmdebstrap arch-test genimage mtools dosfstools e2fsprogs fdisk xz-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
backports=0
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed" || backports=1
  if [ $backports = 1 ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
elif ! dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed"; then
  missing+=(qemu-system-arm)
fi
if ((${#missing[@]})) || [ $backports = 1 ]; then
  echo "installing: ${missing[*]} $([ $backports = 1 ] && echo 'qemu-system-arm (bookworm-backports)')"
  $sudo apt-get update -qq
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ $backports = 1 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-arm >/dev/null
  fi
fi
# The cross targets come from rust-toolchain.toml (`targets = [...]`).
rustup toolchain install >/dev/null 2>&1 || rustup show >/dev/null
if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
