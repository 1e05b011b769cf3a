// vmshiftd's configuration file, /etc/vmshift/vmshiftd.json (or --config), all keys optional:
//   { "datastores": ["/var/lib/libvirt/images", "/srv/vm-disks", "/dev/vg0"],
//     "allowNbdSources": false }
// datastores replaces the default list (src/daemon/datastores.ts); vmshiftd --datastore DIR
// adds to it. The file tells root what it may serve, so it is read only when root owns it and
// nobody else may write it (src/util/trusted-fs.ts).
import { z } from 'zod';
import { loadConfigFile } from '../util/config-file.ts';
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
  const config = await loadConfigFile(path, DaemonConfigSchema);
  for (const d of extra.datastores ?? []) if (!d.startsWith('/')) throw new Error(`--datastore ${d}: give an absolute directory path`);
  return {
    datastores: [...(config.datastores ?? DEFAULT_DATASTORES), ...(extra.datastores ?? [])],
    allowNbd: extra.allowNbd || config.allowNbdSources,
  };
}
