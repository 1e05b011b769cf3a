#!/usr/bin/env bash
# Bundles the CLI into dist/vmshift.mjs with esbuild (shipped with tsx) so that `vmshift`
# starts in a third of the time tsx needs: hooks and tests call it often. bin/vmshift uses
# the bundle only while it is newer than every source file, else runs src/ through tsx.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist/vmshift.mjs
if [ -f "$out" ] && [ -z "$(find src package-lock.json -newer "$out" -print -quit)" ]; then exit 0; fi
mkdir -p dist
node_modules/.bin/esbuild src/cli/main.ts --bundle --platform=node --format=esm --target=node20 \
  --packages=external --outfile="$out.tmp" --log-level=warning
mv "$out.tmp" "$out"
