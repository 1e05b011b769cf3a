#!/usr/bin/env bash
# `npm run package`: the Debian package vmshift_VERSION_amd64.deb, from a staged tree with
# dpkg-deb (no network: everything comes from this checkout, its node_modules and native/build).
#   scripts/build-deb.sh [OUT_DIR]     (default: dist-deb/; also vmshift-VERSION.tar.gz there)
#                                      VMSHIFT_PKG_VERSION overrides the
#                                      version (package.json's otherwise), e.g. for upgrade tests
# Layout (docs/install.md):
#   /usr/lib/vmshift/{bin,dist,hooks,native/build,node_modules,package.json}   the program
#   /usr/bin/vmshift, /usr/bin/vmshiftd -> ../lib/vmshift/bin/...
#   /lib/systemd/system/vmshiftd.service, /etc/vmshift/{vmshiftd,hooks}.json (conffiles)
#   /usr/share/doc/vmshift/   README and docs
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist-deb}")
version=${VMSHIFT_PKG_VERSION:-$(node -p 'require("./package.json").version')}
[[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || { echo "build-deb: bad version '$version'" >&2; exit 2; }

bash scripts/build-cli.sh
bash scripts/build-native.sh >/dev/null
stage=$(mktemp -d /tmp/vmshift-deb-XXXXXX)
trap 'rm -rf "$stage"' EXIT
lib=$stage/usr/lib/vmshift
install -d -m 0755 "$lib/bin" "$lib/native/build" "$lib/hooks/vdsm" "$stage/usr/bin" \
  "$stage/lib/systemd/system" "$stage/etc/vmshift" "$stage/usr/share/doc/vmshift" "$stage/DEBIAN"

cp -r dist "$lib/dist"
install -m 0755 bin/vmshift bin/vmshiftd "$lib/bin/"
install -m 0755 hooks/libvirt-qemu hooks/proxmox-hookscript "$lib/hooks/"
install -m 0755 hooks/vdsm/* "$lib/hooks/vdsm/"
install -m 0644 native/build/vmshift_native.node "$lib/native/build/"
# package.json marks the tree (src/util/paths.ts looks for it) and names the version.
node -e '
  const p = require("./package.json");
  const out = { name: p.name, version: process.argv[1], type: p.type, license: p.license, dependencies: p.dependencies };
  delete out.dependencies.tsx; // the bundle runs without it (bin/vmshift falls back to tsx only with src/)
  process.stdout.write(JSON.stringify(out, null, 2) + "\n");' "$version" > "$lib/package.json"
# The runtime modules the bundle imports (esbuild --packages=external) and what they need:
# the closure of package.json's dependencies without tsx (and its esbuild).
node -e '
  const fs = require("fs"), path = require("path");
  const seen = new Set();
  const walk = (name, from, optional = false) => {
    for (let dir = from; ; dir = path.dirname(dir)) {
      const at = path.join(dir, "node_modules", name);
      if (fs.existsSync(path.join(at, "package.json"))) {
        if (seen.has(at)) return;
        seen.add(at);
        const p = JSON.parse(fs.readFileSync(path.join(at, "package.json"), "utf8"));
        // Optional ones are per platform (the prebuilt lz4-napi binaries): take what npm installed.
        for (const d of Object.keys(p.dependencies ?? {})) walk(d, at);
        for (const d of Object.keys(p.optionalDependencies ?? {})) walk(d, at, true);
        return;
      }
      if (dir === path.dirname(dir)) { if (!optional && !isOptional(name)) throw new Error("missing module " + name); return; }
    }
  };
  const isOptional = (n) => ["cpu-features", "nan"].includes(n);
  for (const d of Object.keys(require("./package.json").dependencies)) if (d !== "tsx") walk(d, process.cwd());
  for (const at of [...seen].sort()) console.log(path.relative(process.cwd(), at));' > "$stage/modules.txt"
# Without what only development needs (type declarations, TypeScript sources, source maps,
# the compilers' object files): a third of the files.
tar -cf - --exclude='*.ts' --exclude='*.map' --exclude=obj.target --exclude='*.gyp*' \
  --exclude=test --exclude=tests --exclude=docs --exclude=.github -T "$stage/modules.txt" | tar -xf - -C "$lib"
rm "$stage/modules.txt"
ln -s ../lib/vmshift/bin/vmshift "$stage/usr/bin/vmshift"
ln -s ../lib/vmshift/bin/vmshiftd "$stage/usr/bin/vmshiftd"

install -m 0644 systemd/vmshiftd.service "$stage/lib/systemd/system/"
install -m 0644 packaging/vmshiftd.json packaging/hooks.json "$stage/etc/vmshift/"
install -m 0644 README.md docs/*.md "$stage/usr/share/doc/vmshift/"
install -m 0644 packaging/copyright "$stage/usr/share/doc/vmshift/"

# Control files: maintainer scripts from packaging/, the version and size filled in.
install -m 0755 packaging/postinst packaging/prerm packaging/postrm "$stage/DEBIAN/"
printf '/etc/vmshift/vmshiftd.json\n/etc/vmshift/hooks.json\n' > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" packaging/control > "$stage/DEBIAN/control"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles"
# Everything root-owned (dpkg-deb --root-owner-group) with the modes Debian expects, whatever
# this checkout's umask and the npm tarballs' modes were: directories and programs 0755,
# the rest 0644.
find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -type f -perm -u+x -exec chmod 0755 {} +
find "$stage" -type f ! -perm -u+x -exec chmod 0644 {} +
mkdir -p "$out"
deb=$out/vmshift_${version}_amd64.deb
dpkg-deb --root-owner-group -Zgzip -z1 --build "$stage" "$deb" >/dev/null
# The same tree as a tarball for hosts without dpkg or systemd (docs/install.md): vmshift/
# with systemd/vmshiftd.service and etc/ beside it.
tar -C "$stage" --owner=0 --group=0 -czf "$out/vmshift-$version.tar.gz" \
  --transform 's,^usr/lib/vmshift,vmshift,;s,^lib/systemd/system,vmshift/systemd,;s,^etc/vmshift,vmshift/etc,' \
  usr/lib/vmshift lib/systemd/system/vmshiftd.service etc/vmshift
echo "$deb"
