#!/usr/bin/env bash
# Idle memory per client at 100,000 clients (issue #16 item 1), Outpost and Mosquitto side
# by side in one run, where the host cannot hold that many sockets: this container's hard
# open-file limit is 20,000 and it lacks CAP_SYS_RESOURCE to raise it. So the run happens
# in a qemu guest (Debian bookworm amd64 with its own kernel) whose init raises the limits
# and runs `outpost-bench idle` against each broker in turn, then powers off. RSS does not
# depend on how fast the guest runs, so software emulation (TCG, the default) serves:
# this machine's /dev/kvm, nested under Firecracker, hangs a guest kernel at boot.
#
#   bench/idle_vm.sh [OUT]        (as root)
#
# Env: SIZES (client counts, default "10000 100000"), SOURCES (loopback source addresses,
# default 8: each has about 64,000 ephemeral ports towards one broker port), BROKERS
# (default "outpost mosquitto"; OUTPOST_BEFORE_BIN adds "outpost-before", an earlier
# build to compare with), ACCEL (qemu's -accel, default "tcg,thread=multi"; "kvm"
# where nested KVM works), OUTPOST_BIN and BENCH_BIN (default target/release/...;
# built against the host's glibc, which is the guest's: both are bookworm), VM_MEM
# (default 8G), OUT (default /tmp/idle-vm).
# What it writes: OUT/idle.jsonl (one line per run, as `outpost-bench --json`),
# OUT/console.log (the guest's serial console).
#
# The guest's root file system is cached in $OUTPOST_BENCH_VM_CACHE (default
# /var/cache/outpost-bench-vm), keyed by its package list and its init; delete the
# directory, or set OUTPOST_BENCH_VM_REBUILD=1, to build it again from scratch;
# OUTPOST_BENCH_VM_BASE_ONLY=1 stops after it.
# Needs Debian's qemu-system-x86, mmdebstrap and e2fsprogs (installed if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$(realpath -m "${1:-${OUT:-/tmp/idle-vm}}")
sizes=${SIZES:-10000 100000}
sources=${SOURCES:-8}
brokers=${BROKERS:-outpost mosquitto}
outpost_bin=$(realpath -m "${OUTPOST_BIN:-$repo/target/release/outpost}")
bench_bin=$(realpath -m "${BENCH_BIN:-$repo/target/release/outpost-bench}")
cache=${OUTPOST_BENCH_VM_CACHE:-/var/cache/outpost-bench-vm}
mirror=${OUTPOST_IMAGE_MIRROR:-http://deb.debian.org/debian}
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

[ "$(id -u)" -eq 0 ] || { echo "bench/idle_vm.sh must run as root (mmdebstrap, the guest's file system)" >&2; exit 1; }
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mke2fs >/dev/null || [ -x /usr/sbin/mke2fs ] || need+=(e2fsprogs)
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
export PATH=$PATH:/usr/sbin:/sbin

# ---- the guest's root file system (cached) ----
packages="linux-image-amd64,initramfs-tools,kmod,procps,iproute2,mosquitto"
# The guest's init: the root stays read-only, /tmp is memory, the second disk holds this
# run's binaries and script, and the console carries the results out.
init='#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mkdir -p /tmp/payload
mount -o ro /dev/vdb /tmp/payload
sh /tmp/payload/run.sh
echo "BENCH-VM: done"
sync
echo o >/proc/sysrq-trigger
sleep 60'
key=$(printf '%s|%s|%s|v1' "$packages" "$init" "$mirror" | sha256sum | cut -c1-16)
base="$cache/bookworm-amd64-$key"
if [ -f "$base/root.ext4" ] && [ "${OUTPOST_BENCH_VM_REBUILD:-0}" != 1 ]; then
  stamp "guest root fs: cached $base"
else
  stamp "guest root fs: building $base (mmdebstrap)"
  rm -rf "$base"
  mkdir -p "$base"
  tree=$(mktemp -d /var/tmp/outpost-bench-vm.XXXXXX)
  trap 'rm -rf "$tree"' EXIT
  mmdebstrap --arch=amd64 --variant=minbase --mode=root --include="$packages" \
    --format=directory bookworm "$tree/root" "deb $mirror bookworm main"
  printf '%s\n' "$init" >"$tree/root/sbin/bench-init"
  chmod 755 "$tree/root/sbin/bench-init"
  kver=$(ls "$tree/root/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
  cp "$tree/root/boot/vmlinuz-$kver" "$base/vmlinuz.tmp"
  cp "$tree/root/boot/initrd.img-$kver" "$base/initrd.img.tmp"
  rm -rf "$tree/root/var/cache/apt/archives/"*.deb "$tree/root/var/lib/apt/lists/"*
  mke2fs -q -t ext4 -d "$tree/root" -E root_owner=0:0 "$base/root.ext4.tmp" 2G
  mv "$base/vmlinuz.tmp" "$base/vmlinuz"
  mv "$base/initrd.img.tmp" "$base/initrd.img"
  mv "$base/root.ext4.tmp" "$base/root.ext4"
  rm -rf "$tree"
  trap - EXIT
  find "$cache" -mindepth 1 -maxdepth 1 -name 'bookworm-amd64-*' ! -name "$(basename "$base")" -exec rm -rf {} +
fi

[ "${OUTPOST_BENCH_VM_BASE_ONLY:-0}" = 1 ] && exit 0
for f in "$outpost_bin" "$bench_bin"; do
  [ -x "$f" ] || { echo "$f is missing: cargo build --release -p outpost-gateway --bin outpost && cargo build --release -p outpost-bench" >&2; exit 1; }
done

# ---- this run's payload: binaries, configs, the script the guest runs ----
mkdir -p "$out"
payload=$(mktemp -d /var/tmp/outpost-bench-vm-payload.XXXXXX)
trap 'rm -rf "$payload"' EXIT
cp "$outpost_bin" "$payload/outpost"
cp "$bench_bin" "$payload/outpost-bench"
# An earlier build to compare with, run as broker "outpost-before".
if [ -n "${OUTPOST_BEFORE_BIN:-}" ]; then
  cp "$OUTPOST_BEFORE_BIN" "$payload/outpost-before"
  case " $brokers " in *" outpost-before "*) ;; *) brokers="$brokers outpost-before";; esac
fi
cp "$here/broker_configs.sh" "$payload/"
cat >"$payload/run.sh" <<RUN
set -u
ip link set lo up
# Every client is one socket in the broker and one in the load generator.
ulimit -n 400000
sysctl -q -w fs.file-max=2000000 net.ipv4.ip_local_port_range="1024 64999" \
  net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096
echo "BENCH-VM: kernel \$(uname -r), \$(nproc) CPUs, \$(awk '/MemTotal/ {print \$2}' /proc/meminfo) KiB, open files \$(ulimit -n)"
echo "BENCH-VM: mosquitto \$(mosquitto -h 2>&1 | sed -n 's/^mosquitto version //p' | head -1)"
mkdir -p /tmp/cfg
. /tmp/payload/broker_configs.sh
write_broker_configs /tmp/cfg 28840 28841 20
for n in $sizes; do
  for b in $brokers; do
    case \$b in
      outpost) port=28840; cmd="/tmp/payload/outpost --config /tmp/cfg/outpost.toml";;
      outpost-before) port=28840; cmd="/tmp/payload/outpost-before --config /tmp/cfg/outpost.toml";;
      mosquitto) port=28841; cmd="mosquitto -c /tmp/cfg/mosquitto.conf";;
    esac
    /tmp/payload/outpost-bench idle --addr 127.0.0.1:\$port -c \$n --sources $sources \
      --connect-timeout 600s --hold 3s --burst 3 --rest 25s \
      --label "idle \$n clients (qemu guest)" --broker-name \$b --json /tmp/idle.jsonl -- \$cmd 2>&1 \
      | grep '^\[' || echo "BENCH-VM: FAILED \$b \$n"
  done
done
sed 's/^/BENCH-VM-JSON: /' /tmp/idle.jsonl
RUN
payload_img=$out/payload.ext4
rm -f "$payload_img"
mke2fs -q -t ext4 -d "$payload" "$payload_img" 256M

stamp "booting the guest (sizes: $sizes; brokers: $brokers)"
rm -f "$out/console.log"
accel=${ACCEL:-tcg,thread=multi}
cpu=max
[ "${accel%%,*}" = kvm ] && cpu=host
timeout 3600 qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -smp 2 -m "${VM_MEM:-8G}" \
  -kernel "$base/vmlinuz" -initrd "$base/initrd.img" \
  -append "console=ttyS0 root=/dev/vda ro init=/sbin/bench-init quiet" \
  -drive "file=$base/root.ext4,if=virtio,format=raw,snapshot=on" \
  -drive "file=$payload_img,if=virtio,format=raw,readonly=on" \
  -display none -monitor none -serial "file:$out/console.log" -no-reboot -net none
rm -f "$payload_img"
grep -a '^BENCH-VM: ' "$out/console.log" || true
grep -a '^\[' "$out/console.log" || true
grep -a '^BENCH-VM-JSON: ' "$out/console.log" | sed 's/^BENCH-VM-JSON: //' | tr -d '\r' >"$out/idle.jsonl"
grep -aq '^BENCH-VM: done' "$out/console.log" || { echo "the guest did not finish; see $out/console.log" >&2; exit 1; }
if grep -aq 'BENCH-VM: FAILED' "$out/console.log"; then exit 1; fi
stamp "results in $out/idle.jsonl"
