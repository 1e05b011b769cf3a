#!/usr/bin/env node
// Runs the uvu test files under the given folders (default: test/) with tsx, one file per
// process so that a crashed file cannot hide the others, and prints `N passed, N failed`
// last. Exits non-zero when anything failed or when no test ran at all.
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const args = process.argv.slice(2);
const filter = process.env.TEST_FILTER ? new RegExp(process.env.TEST_FILTER) : null;
const dirs = args.length ? args : ['test'];

function collect(p) {
  const st = statSync(p);
  if (st.isFile()) return p.endsWith('.test.ts') ? [p] : [];
  return readdirSync(p).sort().flatMap((n) => collect(join(p, n)));
}
const files = dirs.flatMap((d) => collect(join(root, d))).filter((f) => !filter || filter.test(f));

let passed = 0, failed = 0, skipped = 0;
const broken = [];
for (const file of files) {
  const rel = relative(root, file);
  process.stdout.write(`\n### ${rel}\n`);
  const started = Date.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'node_modules/uvu/bin.js'), '.', rel], {
    env: { ...withoutColor(process.env), NO_COLOR: '1' },
    cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15 * 60 * 1000,
  });
  process.stdout.write(r.stdout ?? '');
  process.stderr.write(r.stderr ?? '');
  const num = (label) => Number((r.stdout ?? '').match(new RegExp(`${label}:\\s+(\\d+)`))?.[1] ?? NaN);
  const total = num('Total'), ok = num('Passed'), skip = num('Skipped') || 0;
  if (Number.isNaN(total) || Number.isNaN(ok)) {
    failed += 1; broken.push(`${rel} (crashed: exit ${r.status ?? r.signal})`);
    continue;
  }
  passed += ok; skipped += skip;
  const bad = total - ok - skip;
  failed += bad;
  if (bad > 0 || r.status !== 0) {
    if (bad === 0) failed += 1;
    broken.push(`${rel} (exit ${r.status})`);
  }
  process.stdout.write(`# ${rel}: ${ok}/${total} in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
}
if (broken.length) process.stdout.write(`\nFailing files:\n  ${broken.join('\n  ')}\n`);
if (passed + failed === 0) {
  process.stdout.write('\nno test ran\n0 passed, 1 failed\n');
  process.exit(1);
}
process.stdout.write(`\n${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`);
process.exit(failed ? 1 : 0);

function withoutColor(env) {
  const { FORCE_COLOR: _drop, ...rest } = env;
  return rest;
}
