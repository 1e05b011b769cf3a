// Test-only pauses at the points a crash is hardest to get right, so that a test can kill -9
// a shim (or `vmshift migrate`) exactly there (test/interop/shim-restart.test.ts). Off unless whoever starts the
// process sets VMSHIFT_FAULT_FILE; then the point named by that file's content logs
// `vmshift: fault point NAME reached` and never returns (the process waits to be killed).
import { readFileSync } from 'node:fs';

// libvirt-finish-answered: `vmshift migrate DOMAIN URI` saw Finish's answer reach virsh and has not
// resumed the destination yet (test/e2e/libvirt-migrate.test.ts).
export type FaultPointName = 'switchover-before-commit' | 'switchover-after-commit' | 'libvirt-finish-answered';

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
