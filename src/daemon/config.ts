// vmshiftd's configuration file, /etc/vmshift/vmshiftd.json (or --config), all keys optional:
//   { "datastores": ["/var/lib/libvirt/images", "/srv/vm-disks", "/dev/vg0"],
//     "allowNbdSources": false }
// datastores replaces the default list (src/daemon/datastores.ts); vmshiftd --datastore DIR
// adds to it. The file tells root what it may serve, so it is read only when root owns it and
// nobody else may write it (src/util/trusted-fs.ts).
import { z } from 'zod';
import { readTrustedFile } from '../util/trusted-fs.ts';
import { DEFAULT_DATASTORES, type SourcePolicy } from './datastores.ts';

export const DEFAULT_DAEMON_CONFIG = '/etc/vmshift/vmshiftd.json';

const DaemonConfigSchema = z
  .object({
    datastores: z.array(z.string().startsWith('/', 'a datastore is an absolute directory path')).optional(),
    allowNbdSources: z.boolean().default(false),
  })
  .strict();

/** The source policy from the config file (defaults when it does not exist) plus extra datastores. */
export async function loadSourcePolicy(path = DEFAULT_DAEMON_CONFIG, extra: { datastores?: string[]; allowNbd?: boolean } = {}): Promise<SourcePolicy> {
  let raw: unknown = {};
  let data: Buffer | undefined;
  try {
    data = await readTrustedFile(path);
  } catch (e) {
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  if (data !== undefined) {
    try {
      raw = JSON.parse(data.toString('utf8'));
    } catch (e) {
      throw new Error(`${path}: not JSON: ${(e as Error).message}`);
    }
  }
  const parsed = DaemonConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const i = parsed.error.issues[0]!;
    throw new Error(`${path}: ${i.path.join('.') || 'top level'}: ${i.message}`);
  }
  for (const d of extra.datastores ?? []) if (!d.startsWith('/')) throw new Error(`--datastore ${d}: give an absolute directory path`);
  return {
    datastores: [...(parsed.data.datastores ?? DEFAULT_DATASTORES), ...(extra.datastores ?? [])],
    allowNbd: extra.allowNbd || parsed.data.allowNbdSources,
  };
}
