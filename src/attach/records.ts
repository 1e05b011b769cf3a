// What an attach did, kept until detach undoes it: one JSON file per attached disk under
// RUN_DIR/attached/ (runtime state: it means nothing once the QEMU process is gone). It
// holds what QMP cannot tell later: the original file node's name and options, and which
// shim serves the disk. Written before QEMU's graph changes, so an attach interrupted
// midway still leaves a record that detach can act on (it checks the live graph first).
import { z } from 'zod';
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { readJsonIfExists, writeFileAtomic } from '../util/atomic-file.ts';

export const MonitorRefSchema = z.union([
  z.object({ kind: z.literal('qmp'), path: z.string() }),
  z.object({ kind: z.literal('libvirt'), domain: z.string(), uri: z.string().optional() }),
]);
export type MonitorRef = z.infer<typeof MonitorRefSchema>;

export const FileNodeOptionsSchema = z.object({
  node: z.string(),
  driver: z.enum(['file', 'host_device']),
  filename: z.string(),
  cache: z.object({ direct: z.boolean(), 'no-flush': z.boolean() }).optional(),
  /** Not visible through QMP in QEMU 7.2: only set when the caller knew (libvirt XML). */
  aio: z.string().optional(),
  locking: z.string().optional(),
});
export type FileNodeOptions = z.infer<typeof FileNodeOptionsSchema>;

export const AttachRecordSchema = z.object({
  version: z.literal(1),
  guest: z.string(),
  monitor: MonitorRefSchema,
  /** The disk as named to the operator (device id, drive id or node name). */
  disk: z.string(),
  formatNode: z.string(),
  formatDriver: z.string(),
  nbdNode: z.string(),
  originalFile: FileNodeOptionsSchema,
  shim: z.object({ name: z.string(), socket: z.string(), exportName: z.string() }),
  /** Who runs the shim: a `vmshift serve` of its own, or vmshiftd. Detach asks the same one. */
  starter: z.enum(['direct', 'daemon']).default('direct'),
  state: z.enum(['attaching', 'attached']),
  at: z.string(),
});
export type AttachRecord = z.infer<typeof AttachRecordSchema>;

export function sameMonitor(a: MonitorRef, b: MonitorRef): boolean {
  if (a.kind === 'qmp' && b.kind === 'qmp') return a.path === b.path;
  if (a.kind === 'libvirt' && b.kind === 'libvirt') return a.domain === b.domain && (a.uri ?? '') === (b.uri ?? '');
  return false;
}

export class AttachRecords {
  constructor(readonly dir: string) {}

  private file(shimName: string): string {
    return join(this.dir, `${shimName}.json`);
  }

  async save(rec: AttachRecord): Promise<void> {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(this.file(rec.shim.name), JSON.stringify(rec, null, 2) + '\n');
  }

  remove(shimName: string): void {
    rmSync(this.file(shimName), { force: true });
  }

  async get(shimName: string): Promise<AttachRecord | undefined> {
    const raw = await readJsonIfExists<unknown>(this.file(shimName));
    if (raw === undefined) return undefined;
    const parsed = AttachRecordSchema.safeParse(raw);
    if (!parsed.success) throw new Error(`${this.file(shimName)}: not a vmshift attach record: ${parsed.error.issues[0]?.message}`);
    return parsed.data;
  }

  /** Every record of the guest behind `monitor`. */
  async forMonitor(monitor: MonitorRef): Promise<AttachRecord[]> {
    if (!existsSync(this.dir)) return [];
    const out: AttachRecord[] = [];
    for (const f of readdirSync(this.dir).filter((n) => n.endsWith('.json')).sort()) {
      const rec = await this.get(f.slice(0, -5));
      if (rec && sameMonitor(rec.monitor, monitor)) out.push(rec);
    }
    return out;
  }
}
