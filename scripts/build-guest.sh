#!/usr/bin/env bash
# Builds vmshift's tiny test guest into .cache/guest: vmlinuz (Debian's cloud kernel) and
# initramfs.cpio.gz (static busybox, guest/init, guest/blocks.awk and the virtio modules).
# Idempotent: a stamp holds a hash of this script and guest/*, so an unchanged guest costs a
# few milliseconds and an edit under guest/ rebuilds only the initramfs. The kernel package
# is downloaded once into .cache/guest/kernel. Needs only Debian packages: apt, dpkg,
# busybox-static, cpio, gzip.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=.cache/guest
KDIR=$OUT/kernel
# virtio_pci pulls virtio, virtio_ring and the pci_*_dev helpers in through their depends=.
MODULES="virtio_pci virtio_blk virtio_console virtio_balloon"
mkdir -p "$OUT"

# Parallel `npm test` runs may call this at once: one builds, the others wait and then see
# the stamp.
exec 9>"$OUT/.lock"
flock 9

want=$(find scripts/build-guest.sh guest -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$want" ] \
   && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
  exit 0
fi

log() { echo "build-guest: $*" >&2; }
BUSYBOX=$(command -v busybox || true)
if [ -z "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
  log "needs a static busybox (apt-get install busybox-static)"; exit 1
fi
command -v cpio >/dev/null || { log "needs cpio (apt-get install cpio)"; exit 1; }
TMP=$(mktemp -d /tmp/vmshift-guest.XXXXXX)
chmod 755 "$TMP"   # apt-get download runs as _apt and wants to write here
trap 'rm -rf "$TMP"' EXIT

# 1. The kernel: once. `linux-image-cloud-amd64` is a meta package naming the real one.
if [ ! -s "$KDIR/vmlinuz" ] || [ ! -s "$KDIR/version" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    log "apt-cache does not know linux-image-cloud-amd64; running apt-get update"
    apt-get update -q >&2
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 to a kernel package"; exit 1; }
  log "downloading $pkg"
  if ! (cd "$TMP" && apt-get download -q "$pkg" >&2); then
    log "download failed; running apt-get update and retrying"
    apt-get update -q >&2
    (cd "$TMP" && apt-get download -q "$pkg" >&2)
  fi
  dpkg -x "$TMP"/"$pkg"_*.deb "$TMP/deb"
  kver=$(ls "$TMP/deb/lib/modules")
  rm -rf "$KDIR.new"; mkdir -p "$KDIR.new"
  cp "$TMP/deb/boot/vmlinuz-$kver" "$KDIR.new/vmlinuz"
  # Keep only the modules we load and what they depend on (read from each .ko's modinfo).
  todo=$MODULES; done_=" "
  while [ -n "${todo// /}" ]; do
    set -- $todo; m=$1; shift; todo="$*"
    case "$done_" in *" $m "*) continue ;; esac
    done_="$done_$m "
    ko=$(find "$TMP/deb/lib/modules/$kver" -name "$m.ko" | head -n1)
    if [ -z "$ko" ]; then
      # Built into the kernel: nothing to copy.
      grep -q "/$m.ko\$" "$TMP/deb/lib/modules/$kver/modules.builtin" 2>/dev/null || log "note: no module $m (assuming built in)"
      continue
    fi
    rel=${ko#"$TMP/deb/"}
    mkdir -p "$KDIR.new/$(dirname "$rel")"
    cp "$ko" "$KDIR.new/$rel"
    deps=$(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    todo="$todo $deps"
  done
  echo "$kver" > "$KDIR.new/version"
  echo "$pkg" > "$KDIR.new/package"
  rm -rf "$KDIR"; mv "$KDIR.new" "$KDIR"
fi
kver=$(cat "$KDIR/version")

# 2. The initramfs: busybox with its applets as links, our /init, the modules.
ROOT=$TMP/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,lib/vmshift}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$ROOT/bin/$applet"
done
install -m 755 guest/init "$ROOT/init"
install -m 644 guest/blocks.awk "$ROOT/lib/vmshift/blocks.awk"
cp -a "$KDIR/lib" "$ROOT/"
"$BUSYBOX" depmod -b "$ROOT" "$kver"
(cd "$ROOT" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$TMP/initramfs.cpio.gz"

cp "$KDIR/vmlinuz" "$OUT/vmlinuz.new" && mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
mv "$TMP/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
echo "$want" > "$OUT/stamp"
log "built $OUT (kernel $kver, $(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB initramfs)"
