#!/usr/bin/env bash
# Idempotent setup: installs the system packages and npm dependencies vmshift's tests and
# demo need. Quick (well under a second for the checks) when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for cmd in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils qemu-nbd:qemu-utils \
           nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio virsh:libvirt-clients \
           libvirtd:libvirt-daemon-system /usr/sbin/sshd:openssh-server busybox:busybox-static \
           ip:iproute2 socat:socat cpio:cpio gcc:gcc openssl:openssl fincore:util-linux-extra \
           systemd-analyze:systemd; do
  bin=${cmd%%:*}; pkg=${cmd##*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "$bin" ]; then need+=("$pkg"); fi
done
# nbdkit's memory plugin and the file plugin ship in nbdkit itself on Debian 12.
if ((${#need[@]})); then
  echo "setup: installing system packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -q >&2
  $SUDO apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils nbdkit \
    libnbd-bin fio libvirt-daemon-system libvirt-clients openssh-server busybox-static \
    iproute2 socat cpio kmod gcc libc6-dev openssl util-linux-extra systemd >&2
fi

# npm dependencies: reinstall only when the lockfile changed since the last install.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm dependencies" >&2
  npm ci --no-audit --no-fund >&2
fi

# The sparse-file addon (SEEK_DATA/SEEK_HOLE, hole punching); FileDevice works without it.
bash scripts/build-native.sh >&2 || echo "setup: native addon not built; files will not stay sparse" >&2

# The CLI bundle (faster start for hooks and tests; bin/vmshift falls back to tsx).
bash scripts/build-cli.sh >&2

# The tiny guest (kernel + busybox initramfs), built once into .cache/guest.
bash scripts/build-guest.sh >&2
