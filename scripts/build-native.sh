#!/usr/bin/env bash
# Builds native/build/vmshift_native.node (lseek SEEK_DATA/SEEK_HOLE, fallocate, BLKGETSIZE64
# for FileDevice) with the system C compiler against Node's own headers. Idempotent: does
# nothing when the addon is newer than its source and this script. vmshift still works
# without the addon (no sparseness, real zeroes), so a failure here is reported, not fatal
# to callers that use `|| true`.
set -euo pipefail
cd "$(dirname "$0")/.."

src=native/vmshift_native.c
out=native/build/vmshift_native.node
if [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ]; then exit 0; fi

# Node's headers: next to the running node, the distro's, or node-gyp's cache.
node_prefix=$(dirname "$(dirname "$(node -p process.execPath)")")
node_version=$(node -p 'process.versions.node')
inc=
for d in "$node_prefix/include/node" /usr/include/node /usr/local/include/node \
         "$HOME/.cache/node-gyp/$node_version/include/node"; do
  if [ -f "$d/node_api.h" ]; then inc=$d; break; fi
done

mkdir -p native/build
if [ -n "$inc" ]; then
  cc=$(command -v gcc || command -v cc || command -v g++ || true)
  if [ -z "$cc" ]; then echo "build-native: no C compiler (gcc/cc) found" >&2; exit 1; fi
  # An N-API addon resolves napi_* symbols from the node binary at load time.
  "$cc" -O2 -Wall -Wextra -fPIC -shared -pthread -x c -std=gnu11 \
    -DNAPI_VERSION=8 -DNODE_GYP_MODULE_NAME=vmshift_native -I"$inc" \
    -o "$out.$$.tmp" "$src"
  mv -f "$out.$$.tmp" "$out"   # atomic: a concurrent loader never sees half a file
else
  # No headers on disk: npm's bundled node-gyp fetches them and builds from binding.gyp.
  gyp="$(dirname "$(command -v npm)")/../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"
  if [ ! -f "$gyp" ]; then echo "build-native: no Node headers and no node-gyp found" >&2; exit 1; fi
  (cd native && node "$gyp" rebuild >&2)
  cp -f native/build/Release/vmshift_native.node "$out.$$.tmp" && mv -f "$out.$$.tmp" "$out"
fi
echo "build-native: built $out" >&2
