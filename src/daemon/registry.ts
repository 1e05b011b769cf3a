// vmshiftd's durable record of the shims it owns: one JSON file under the state dir,
// replaced atomically on every change, validated on load. The daemon refuses to start on a
// file it cannot read rather than start empty: forgetting a shim would orphan a guest's disk.
import { z } from 'zod';
import { join } from 'node:path';
import { readJsonIfExists, writeFileAtomic } from '../util/atomic-file.ts';
import { isNbdUri } from '../block/open.ts';

export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Who the shim serves, when a hook started it: vmshiftd keeps that domain's XML in step. */
export const OwnerSchema = z.object({
  kind: z.literal('libvirt'),
  /** libvirt URI the daemon's virsh calls use. */
  uri: z.string().min(1),
  domain: z.string().min(1),
  uuid: z.string(),
  /** Guest disk target (vda...). */
  dev: z.string().min(1),
});
export type Owner = z.infer<typeof OwnerSchema>;

export const ShimRecordSchema = z.object({
  name: z.string().regex(NAME_RE),
  /** What the operator gave: an absolute path or NBD URI (the shim's state file has where it lives now). */
  source: z.string().min(1),
  export: z.string().min(1),
  track: z.enum(['bitmap', 'bloom', 'none']),
  /** Group allowed to reach the NBD socket (QEMU's user), or null for root only. */
  group: z.string().nullable(),
  socket: z.string().min(1),
  statePath: z.string().min(1),
  logPath: z.string().min(1),
  /** Who started it (`libvirt:UUID` for a domain's hook), or null when started by hand: only it may stop the shim by naming itself. */
  startedBy: z.string().nullable().default(null),
  /** What the operator wants: a `stopped` record is dropped once its process is gone. */
  desired: z.enum(['running', 'stopped']),
  pid: z.number().int().positive().nullable(),
  startedAt: z.string().nullable(),
  restarts: z.number().int().nonnegative(),
  createdAt: z.string(),
  /** Where the disk lives now, followed from the shim's state file (the truth) by the daemon. */
  backing: z.string().min(1).optional(),
  owner: OwnerSchema.optional(),
  /** The backing last seen recorded in the owner's persistent XML (null: not yet). */
  recorded: z.string().nullable().optional(),
});
export type ShimRecord = z.infer<typeof ShimRecordSchema>;

const RegistryFileSchema = z.object({
  version: z.literal(1),
  shims: z.array(ShimRecordSchema),
});

export class RegistryError extends Error {
  override name = 'RegistryError';
}

/** Names become directory and file names: no slashes, no dot-dot, bounded length. */
export function checkName(name: unknown): string {
  if (typeof name !== 'string' || !NAME_RE.test(name)) {
    throw new RegistryError(`invalid shim name ${JSON.stringify(name)}: use 1-64 characters A-Z a-z 0-9 . _ -, starting with a letter or digit`);
  }
  return name;
}

/** The daemon's shims run in other directories: sources must not depend on a cwd. */
export function checkSource(source: unknown): string {
  if (typeof source !== 'string' || !(source.startsWith('/') || isNbdUri(source))) {
    throw new RegistryError(`invalid source ${JSON.stringify(source)}: give an absolute path or an nbd:// / nbd+unix:// URI`);
  }
  return source;
}

export class Registry {
  private readonly shims = new Map<string, ShimRecord>();
  private saving: Promise<void> = Promise.resolve();

  private constructor(readonly path: string) {}

  static fileIn(stateDir: string): string {
    return join(stateDir, 'vmshiftd.json');
  }

  /** Load (or start empty when the file does not exist); throws naming the file when it is corrupt. */
  static async load(stateDir: string): Promise<Registry> {
    const path = Registry.fileIn(stateDir);
    const reg = new Registry(path);
    let raw: unknown;
    try {
      raw = await readJsonIfExists<unknown>(path);
    } catch (e) {
      throw new RegistryError(`${path}: corrupt registry (${(e as Error).message}); vmshiftd will not start without knowing its shims: repair or move the file`);
    }
    if (raw === undefined) return reg;
    const parsed = RegistryFileSchema.safeParse(raw);
    if (!parsed.success) {
      const i = parsed.error.issues[0]!;
      throw new RegistryError(`${path}: corrupt registry (${i.path.join('.') || 'top level'}: ${i.message}); vmshiftd will not start without knowing its shims: repair or move the file`);
    }
    for (const r of parsed.data.shims) reg.shims.set(r.name, r);
    return reg;
  }

  get(name: string): ShimRecord | undefined {
    return this.shims.get(name);
  }

  list(): ShimRecord[] {
    return [...this.shims.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Insert or replace a record and persist; the in-memory copy changes only once it is on disk. */
  async put(record: ShimRecord): Promise<void> {
    const valid = ShimRecordSchema.parse(record);
    return this.update((m) => m.set(valid.name, valid));
  }

  remove(name: string): Promise<void> {
    return this.update((m) => m.delete(name));
  }

  /**
   * Changes are applied one after the other, each to the state the previous one left, so two
   * concurrent changes cannot lose each other and a slow fsync cannot reorder them.
   */
  private update(mutate: (m: Map<string, ShimRecord>) => void): Promise<void> {
    const done = this.saving.then(async () => {
      const next = new Map(this.shims);
      mutate(next);
      await writeFileAtomic(this.path, JSON.stringify({ version: 1, shims: [...next.values()] }, null, 2) + '\n');
      this.shims.clear();
      for (const [k, v] of next) this.shims.set(k, v);
    });
    this.saving = done.catch(() => {});
    return done;
  }
}
