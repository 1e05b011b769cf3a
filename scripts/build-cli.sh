#!/usr/bin/env bash
# Bundles the CLI (and the libvirt hook) into dist/ with esbuild (shipped with tsx) so that `vmshift` starts in a
# third of the time tsx needs: hooks and tests call it often. Code splitting keeps each
# verb's packages in its own chunk: `vmshift serve` (one long-lived process per disk) loads
# neither xmlbuilder2 nor cli-progress. bin/vmshift uses the bundle only while it is newer
# than every source file, else runs src/ through tsx.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist/vmshift.mjs
if [ -f "$out" ] && [ -z "$(find src package-lock.json -newer "$out" -print -quit)" ]; then exit 0; fi
rm -rf dist.tmp
# Two entry points: the CLI, and the libvirt hook (hooks/libvirt-qemu), which libvirt runs
# on every guest start and stop and which should cost ~0.5 s of CPU, not tsx's ~1.5 s.
node_modules/.bin/esbuild vmshift=src/cli/main.ts hook=src/libvirt/hook-main.ts --bundle --splitting --platform=node --format=esm --target=node20 \
  --packages=external --outdir=dist.tmp --entry-names=[name] --chunk-names=chunks/[name]-[hash] \
  --out-extension:.js=.mjs --log-level=warning
rm -rf dist && mv dist.tmp dist
