#!/usr/bin/env bash
# Installs the outpost .deb into a Debian root file system (a chroot; a foreign one runs
# through qemu-user binfmt), then checks what the package promises without a running
# systemd (as in any chroot or image build):
#   scripts/deb-install-test.sh ROOTFS_DIR OLD.deb NEW.deb
# ROOTFS_DIR is copied, never changed. Checks: files, conffile mode root:outpost 0640,
# user outpost in dialout, the unit enabled, `systemd-analyze verify` silent and the
# exposure score at most 2.0 against that root; then outpost started from the package
# (as user outpost, STATE_DIRECTORY=/var/lib/outpost as systemd sets it) spools QoS 1
# messages while the cloud is down, the package is upgraded to NEW.deb (stop, dpkg -i,
# start, as systemd's restart-after-upgrade does), the cloud comes back and every
# message arrives; remove keeps the state, purge deletes it.
set -euo pipefail
base=$1 old=$(realpath "$2") new=$(realpath "$3")
export PATH="$PATH:/usr/sbin"
work=$(mktemp -d /var/tmp/outpost-debtest.XXXXXX)
root=$work/root
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount -l "$root/proc" 2>/dev/null || true
  umount -l "$root/dev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "DEB TEST FAIL: $*" >&2; echo "--- outpost log:" >&2; tail -25 "$work/outpost.log" >&2 2>/dev/null || true; exit 1; }
ok() { echo "ok   $*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 $(($2 * 10))); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

mkdir -p "$root"
cp -a "$base/." "$root/"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
cp "$old" "$new" "$root/tmp/"

# ---- install ----
chroot "$root" dpkg -i "/tmp/$(basename "$old")" >"$work/dpkg-install.log" 2>&1 || { cat "$work/dpkg-install.log"; fail "dpkg -i"; }
ok "installed $(basename "$old")"
[ -x "$root/usr/bin/outpost" ] || fail "no /usr/bin/outpost"
mode=$(chroot "$root" stat -c '%U:%G %a' /etc/outpost/outpost.toml)
[ "$mode" = "root:outpost 640" ] || fail "conffile mode: $mode"
ok "/etc/outpost/outpost.toml root:outpost 0640"
chroot "$root" id outpost | grep -q '(dialout)' || fail "user outpost not in dialout: $(chroot "$root" id outpost)"
ok "user outpost: $(chroot "$root" id outpost)"
[ -L "$root/etc/systemd/system/multi-user.target.wants/outpost.service" ] || fail "outpost.service not enabled"
ok "outpost.service enabled"
grep -q '^/etc/outpost/outpost.toml$' "$root/var/lib/dpkg/info/outpost.conffiles" || fail "not a conffile"
ok "outpost.toml is a conffile"
grep -q 'bind = "127.0.0.1:1883"' "$root/etc/outpost/outpost.toml" || fail "default config is not loopback-only"
! grep -Eq '^\s*\{ bind = "(0\.0\.0\.0|\[::\])' "$root/etc/outpost/outpost.toml" || fail "default config listens beyond loopback"
ok "default config: loopback only"
[ -f "$root/usr/share/doc/outpost/examples/outpost.toml" ] && [ -f "$root/usr/share/doc/outpost/README.md" ] || fail "docs"
out=$(systemd-analyze verify --man=no --root="$root" /lib/systemd/system/outpost.service 2>&1 || true)
[ -z "$out" ] || fail "systemd-analyze verify printed: $out"
ok "systemd-analyze verify: no output"
score=$(systemd-analyze security --offline=yes --root="$root" /lib/systemd/system/outpost.service 2>&1 | sed -n 's/.*Overall exposure level for outpost.service: \([0-9.]*\).*/\1/p')
python3 -c "import sys; sys.exit(0 if float('$score') <= 2.0 else 1)" || fail "exposure $score > 2.0"
ok "exposure $score (at most 2.0)"
chroot "$root" /usr/bin/outpost check --config /etc/outpost/outpost.toml >/dev/null || fail "default config does not check"
ok "default config checks"

# ---- run, spool during an outage ----
P=$(free_port); C=$(free_port)
cat >"$root/etc/outpost/outpost.toml" <<CONF
# Changed by the administrator: an upgrade must keep it.
gateway_id = "debtest"
[broker]
listeners = [{ bind = "127.0.0.1:$P" }]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:$C"
protocol = "3.1.1"
topics = [{ pattern = "sensors/#", direction = "out", qos = 1 }]
# Reconnect promptly when the cloud returns (the default backoff grows to 60 s).
reconnect = { min = "1s", max = "2s" }
CONF
mkdir -p "$work/cloud"
# `user root`: started as root, Mosquitto would drop to its own user, fail to save its
# database in this private directory and forget the collector's session on restart.
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/cloud/\nuser root\n' "$C" "$work" >"$work/cloud.conf"
start_cloud() { mosquitto -c "$work/cloud.conf" >>"$work/cloud.log" 2>&1 & cloud=$!; pids+=("$cloud"); wait_port "$C" 10 || fail "cloud"; }
start_outpost() {
  chroot --userspec=outpost:outpost "$root" env STATE_DIRECTORY=/var/lib/outpost \
    /usr/bin/outpost --config /etc/outpost/outpost.toml >>"$work/outpost.log" 2>&1 &
  gw=$!; pids+=("$gw")
  wait_port "$P" 30 || fail "outpost did not start"
}
start_cloud
mosquitto_sub -p "$C" -i debtest-cloud -c -q 1 -t 'sensors/#' -E
kill "$cloud"; wait "$cloud" 2>/dev/null || true
[ -s "$work/cloud/mosquitto.db" ] || fail "the cloud did not save its database: $(tail -3 "$work/cloud.log")"
start_outpost
ok "outpost runs as user outpost from the package"
for i in 1 2 3 4 5; do mosquitto_pub -p "$P" -q 1 -t "sensors/up$i" -m "m$i" || fail "publish $i"; done
spool=$root/var/lib/outpost/bridge-cloud.sqlite
rows() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from messages').fetchone()[0])" "$spool"; }
[ "$(rows)" = 5 ] || fail "spool holds $(rows), expected 5"
ok "5 messages spooled with the cloud down"

# ---- upgrade with messages in the spool ----
kill -TERM "$gw"; wait "$gw" 2>/dev/null || true
cp "$root/etc/outpost/outpost.toml" "$work/config.before"
chroot "$root" dpkg -i "/tmp/$(basename "$new")" </dev/null >"$work/dpkg-upgrade.log" 2>&1 || { cat "$work/dpkg-upgrade.log"; fail "upgrade"; }
ok "upgraded to $(chroot "$root" dpkg-query -W -f='${Version}' outpost)"
cmp -s "$root/etc/outpost/outpost.toml" "$work/config.before" || fail "the upgrade changed the administrator's config"
ok "config kept across the upgrade"
[ "$(rows)" = 5 ] || fail "spool holds $(rows) after the upgrade, expected 5"
ok "spool kept across the upgrade"
start_outpost
start_cloud
mosquitto_sub -p "$C" -i debtest-cloud -c -q 1 -t 'sensors/#' -C 5 -W 60 -v >"$work/got" || true
for i in 1 2 3 4 5; do grep -qx "sensors/up$i m$i" "$work/got" || fail "sensors/up$i lost: $(cat "$work/got")"; done
ok "all 5 spooled messages delivered after the upgrade"
kill -TERM "$gw"; wait "$gw" 2>/dev/null || true

# ---- remove keeps state, purge deletes it ----
chroot "$root" dpkg -r outpost >/dev/null 2>&1 || fail "dpkg -r"
[ -f "$spool" ] || fail "remove deleted the spool"
ok "remove keeps /var/lib/outpost"
chroot "$root" dpkg -P outpost >/dev/null 2>&1 || fail "dpkg -P"
[ ! -e "$root/var/lib/outpost" ] && [ ! -e "$root/etc/outpost" ] || fail "purge left state or config"
ok "purge deletes /var/lib/outpost and /etc/outpost"
echo "DEB INSTALL TEST PASS"
