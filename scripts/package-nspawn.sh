#!/usr/bin/env bash
# The package under a real systemd: a Debian 12 tree made by debootstrap (from the package
# archive; minutes, so not part of `npm test`), booted with systemd-nspawn, the package
# installed, upgraded and removed in it (docs/install.md, "Under a real systemd").
#   scripts/package-nspawn.sh [TREE]   (default /tmp/vmshift-nspawn; reused when it exists)
# On these machines PID 1 is not systemd and there is no system D-Bus: nspawn only boots with
# --keep-unit --register=no (else "Failed to open system bus"). The tree has no nodejs >= 20
# in Debian 12, so the host's node binary is copied in and dpkg gets --force-depends.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=${1:-/tmp/vmshift-nspawn}
work=$(mktemp -d /tmp/vmshift-nsp-XXXXXX)
made_run_dir=; [ -e /run/systemd/nspawn ] || made_run_dir=yes
nspawn=
cleanup() {
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then kill "$nspawn"; wait "$nspawn" 2>/dev/null || true; fi
  # nspawn leaves its lock and propagation dirs in the host's /run: ours only.
  if [ -n "$made_run_dir" ]; then rm -rf /run/systemd/nspawn; fi
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -x "$tree/lib/systemd/systemd" ]; then
  (cd "$work" && apt-get download debootstrap >/dev/null 2>&1 && dpkg -x debootstrap_*.deb dbs)
  DEBOOTSTRAP_DIR=$work/dbs/usr/share/debootstrap "$work/dbs/usr/sbin/debootstrap" --variant=minbase \
    --include=systemd,systemd-sysv,dbus bookworm "$tree" http://deb.debian.org/debian >"$work/debootstrap.log"
fi
cp "$(command -v node)" "$tree/usr/bin/node"
# A reused tree starts without the last run's package, shims and state.
rm -rf "$tree/var/lib/vmshift" "$tree/var/lib/libvirt/images/d.raw" "$tree"/root/vmshift_*.deb
chroot "$tree" dpkg --purge vmshift >/dev/null 2>&1 || true
v=$(node -p 'require("./package.json").version')
old=$(bash scripts/build-deb.sh "$work/out" | tail -n 1)
new=$(VMSHIFT_PKG_VERSION="$v+nspawn2" bash scripts/build-deb.sh "$work/out" | tail -n 1)
cp "$old" "$new" "$tree/root/"

systemd-nspawn --boot -D "$tree" --private-network --register=no --keep-unit -M vmshift-nspawn >"$work/console.log" 2>&1 &
nspawn=$!
init=
for _ in $(seq 1 300); do
  init=$(pgrep -P "$nspawn" -x systemd || true)
  if [ -n "$init" ] && [ "$(nsenter -t "$init" -a systemctl is-system-running 2>/dev/null)" = running ]; then break; fi
  init=
  sleep 0.2
done
[ -n "$init" ] || { cat "$work/console.log"; exit 1; }
# Only a clean environment goes in (the tree has no CA bundle for NODE_EXTRA_CA_CERTS and such).
inside() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin nsenter -t "$init" -a "$@" 2>&1; }
step() { echo; echo "== $*"; }

step "install (systemd runs: enabled and started)"
inside dpkg -i --force-depends "/root/$(basename "$old")" | grep -v -e '^(Reading' -e depends -e 'not installed' -e 'configuring anyway'
sleep 2
inside systemctl is-enabled vmshiftd.service
inside systemctl is-active vmshiftd.service
inside sh -c 'mkdir -p /var/lib/libvirt/images && truncate -s 16M /var/lib/libvirt/images/d.raw && vmshift shim-start ns-d0 /var/lib/libvirt/images/d.raw'
echo "vmshiftd pid $(inside systemctl show -p MainPID --value vmshiftd.service)"

step "upgrade: vmshiftd restarted by systemd, then the shim"
inside dpkg -i --force-depends "/root/$(basename "$new")" | grep -v -e '^(Reading' -e depends -e 'not installed' -e 'configuring anyway'
echo "vmshiftd pid $(inside systemctl show -p MainPID --value vmshiftd.service)"
inside vmshift list

step "remove: vmshiftd stopped, the shim left running"
shim=$(inside vmshift list --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).shims[0].pid))')
inside dpkg -r vmshift | grep -v '^(Reading'
inside systemctl is-active vmshiftd.service || true
if inside test -e "/proc/$shim"; then echo "shim pid $shim still serves"; else echo "shim pid $shim is gone"; exit 1; fi
inside systemctl poweroff
wait "$nspawn" || true
nspawn=
