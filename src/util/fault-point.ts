// Test-only pauses at the points a crash is hardest to get right, so that a test can kill -9
// a shim exactly there (test/interop/shim-restart.test.ts). Off unless whoever starts the
// shim sets VMSHIFT_FAULT_FILE; then the point named by that file's content logs
// `vmshift: fault point NAME reached` and never returns (the process waits to be killed).
import { readFileSync } from 'node:fs';

export type FaultPointName = 'switchover-before-commit' | 'switchover-after-commit';

export async function faultPoint(name: FaultPointName): Promise<void> {
  const file = process.env.VMSHIFT_FAULT_FILE;
  if (!file) return;
  let wanted: string;
  try {
    wanted = readFileSync(file, 'utf8').trim();
  } catch {
    return;
  }
  if (wanted !== name) return;
  process.stderr.write(`vmshift: fault point ${name} reached\n`);
  await new Promise<never>(() => {});
}
