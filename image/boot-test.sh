#!/usr/bin/env bash
# Boots the SD image under qemu-system-aarch64 (-M virt) and checks the appliance from
# inside (ci-smoke.service, pulled in only by a kernel argument):
#   image/boot-test.sh [OUT dir of image/build.sh, default target/image]
# A test copy of the image gets outpost.toml, authorized_keys and hostname on its FAT
# boot partition (mtools, no mount) and 512 MiB more disk (so the first boot grows the
# root file system); the image itself is not changed. The guest prints "CI-SMOKE: PASS"
# on the serial console; the host greps it. Needs qemu-system-arm (bookworm-backports on
# bookworm), mtools, xz-utils.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath "${1:-$here/../target/image}")
name=outpost-rpi-arm64
work=$(mktemp -d /var/tmp/outpost-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT
img=$work/test.img
xz -dc "$out/$name.img.xz" >"$img"
truncate -s +512M "$img"
# The boot partition starts at 4 MiB (image/build.sh, genimage offset).
start=$(python3 - "$img" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    mbr = f.read(512)
lba = struct.unpack_from("<I", mbr, 446 + 8)[0]
print(lba * 512)
PY
)
fat="$img@@$start"
cat >"$work/outpost.toml" <<'CONF'
# ci-smoke: the boot test's config, put on the boot partition before the first boot.
# No gateway_id: it defaults to the host name, set from the boot partition too.
[broker]
listeners = [{ bind = "127.0.0.1:1884" }]
# A Modbus TCP device nobody answers for: its retained status topic carries the
# gateway_id, and STATUS= counts it as a sensor offline.
[[sensors.modbus]]
name = "probe"
transport = { tcp = { host = "127.0.0.1", port = 1502 } }
points = [{ name = "t", kind = "holding", address = 0 }]
CONF
echo "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootTestKeyBootTestKeyBootTestKeyBootTest ci@test" >"$work/authorized_keys"
printf 'ci-outpost\r\n' >"$work/hostname"
mcopy -o -i "$fat" "$work/outpost.toml" "$work/authorized_keys" "$work/hostname" ::/
mdir -i "$fat" ::/ | grep -Ei 'outpost|authoriz|hostname' || true

log=$out/boot-test.log
echo "booting (serial log: $log)"
s=$(date +%s)
set +e
timeout 900 qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 1024 -nographic -no-reboot \
  -nic none -kernel "$out/vmlinuz" -initrd "$out/initrd.img" \
  -append "console=ttyAMA0 root=LABEL=RASPIROOT rw rootwait systemd.wants=ci-smoke.service" \
  -drive "if=none,file=$img,format=raw,id=hd0" -device virtio-blk-pci,drive=hd0 \
  </dev/null >"$log" 2>&1
rc=$?
set -e
secs=$(( $(date +%s) - s ))
tr -d '\r' <"$log" | grep -a 'CI-SMOKE' | sed 's/^.*CI-SMOKE/CI-SMOKE/' || true
echo "qemu exited with $rc after $secs s"
# Not `tr | grep -q`: grep -q exits at the first match, tr then dies of SIGPIPE, and
# pipefail turns a passing boot into a failure whenever console lines follow the match.
if grep -aq 'CI-SMOKE: PASS' "$log"; then
  echo "BOOT TEST PASS ($secs s from qemu start to power-off)"
else
  echo "BOOT TEST FAIL; last lines of the console:" >&2
  tail -40 "$log" >&2
  exit 1
fi
