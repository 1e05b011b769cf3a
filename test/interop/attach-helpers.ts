// Shared by the attach, detach and Proxmox hookscript tests: a run directory per test for
// vmshift's shims and attach records, a short-lived look at the guest's block graph over QMP
// (QEMU serves one QMP client at a time, so never hold it while the CLI runs), and the
// writer guest's final check.
import { join } from 'node:path';
import { existsSync, readdirSync } from 'node:fs';
import * as assert from 'uvu/assert';
import { QmpClient } from '../../src/qemu/qmp.ts';
import { findDisk, queryNamedNodes, type DiskPicture } from '../../src/qemu/block-graph.ts';
import { DirectShims } from '../../src/attach/direct-shims.ts';
import { onCleanup, run, tempDir } from '../helpers/proc.ts';
import { verifyWriterLog, type Guest } from '../helpers/guest.ts';

export const VMSHIFT = new URL('../../bin/vmshift', import.meta.url).pathname;
export const SLOTS = 256;

/** A run dir for vmshift (VMSHIFT_RUN_DIR); every shim started in it is stopped at cleanup. */
export function runDir(): { dir: string; env: NodeJS.ProcessEnv; shims: DirectShims } {
  const dir = tempDir('vmshift-att-');
  const shims = new DirectShims(join(dir, 'shims'));
  onCleanup(async () => {
    for (const name of shims.list()) await shims.stop(name);
  });
  // No vmshiftd here: its socket would make the CLI hand shims to it.
  return { dir, env: { ...process.env, VMSHIFT_RUN_DIR: dir, VMSHIFT_SOCKET: join(dir, 'no-vmshiftd.sock') }, shims };
}

export async function withQmp<T>(sock: string, fn: (q: QmpClient) => Promise<T>): Promise<T> {
  const q = await QmpClient.connect(sock, { connectTimeoutMs: 30_000 });
  try {
    return await fn(q);
  } finally {
    await q.close();
  }
}

export async function disk(sock: string, ref: string): Promise<DiskPicture & { nodes: string[]; fileCacheDirect?: boolean }> {
  return withQmp(sock, async (q) => {
    const d = await findDisk(q, ref);
    const nodes = await queryNamedNodes(q);
    const file = nodes.find((n) => n['node-name'] === d.fileNode);
    return { ...d, nodes: nodes.map((n) => n['node-name']), fileCacheDirect: file?.cache?.direct };
  });
}

/** Running shims and attach records in a run dir. */
export function leftovers(dir: string, shims: DirectShims): { running: string[]; records: string[] } {
  const rec = join(dir, 'attached');
  return {
    running: shims.list().filter((n) => shims.runningPid(n) !== null),
    records: existsSync(rec) ? readdirSync(rec) : [],
  };
}

/** Wait until the writer has acknowledged `n` more records than now; returns the new mark. */
export async function writesMore(guest: Guest, n: number): Promise<number> {
  const target = guest.lastSeq() + n;
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${target}$`), 120_000);
  return target;
}

/** Stop the guest and check every acknowledged writer record is on `image` (raw or qcow2). */
export async function stopAndVerify(guest: Guest, image: string, format: 'raw' | 'qcow2', scratch: string): Promise<number> {
  await guest.stop();
  const last = guest.lastSeq();
  let raw = image;
  if (format === 'qcow2') {
    await run('qemu-img', ['check', image]);
    raw = join(scratch, 'flat.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
  }
  const bad = verifyWriterLog(raw, last, SLOTS);
  assert.equal(bad, [], `records lost or torn on ${image} (last acknowledged ${last}): ${JSON.stringify(bad.slice(0, 5))}`);
  return last;
}
