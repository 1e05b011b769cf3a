// vmshiftd's configuration file, /etc/vmshift/vmshiftd.json (or --config), all keys optional:
//   { "datastores": ["/var/lib/libvirt/images", "/srv/vm-disks", "/dev/vg0"],
//     "allowNbdSources": false,
//     "balloon": { "enabled": false, "floor": "1G", "headroom": "256M" } }
// datastores replaces the default list (src/daemon/datastores.ts); vmshiftd --datastore DIR
// adds to it. balloon: the defaults of `vmshift migrate` on this host (--balloon/--no-balloon,
// --balloon-floor, --balloon-headroom override them; src/balloon/policy.ts has the policy). The file tells root what it may serve, so it is read only when root owns it and
// nobody else may write it (src/util/trusted-fs.ts).
import { z } from 'zod';
import { loadConfigFile } from '../util/config-file.ts';
import { parseSize } from '../util/size.ts';
import { DEFAULT_DATASTORES, type SourcePolicy } from './datastores.ts';

import { DEFAULT_DAEMON_CONFIG } from './defaults.ts';

export { DEFAULT_DAEMON_CONFIG };

const DaemonConfigSchema = z
  .object({
    datastores: z.array(z.string().startsWith('/', 'a datastore is an absolute directory path')).optional(),
    allowNbdSources: z.boolean().default(false),
    balloon: z
      .object({
        enabled: z.boolean().default(false),
        floor: z.string().optional(),
        headroom: z.string().optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

export interface BalloonDefaults { enabled: boolean; floor?: number; headroom?: number }

/** The `balloon` section (defaults when the file or the section is absent); sizes as "1G", "256M". */
export async function loadBalloonDefaults(path = DEFAULT_DAEMON_CONFIG): Promise<BalloonDefaults> {
  const b = (await loadConfigFile(path, DaemonConfigSchema)).balloon;
  const size = (v: string | undefined, key: string) => (v === undefined ? undefined : parseSize(v, `${path}: balloon.${key}`));
  return { enabled: b?.enabled ?? false, floor: size(b?.floor, 'floor'), headroom: size(b?.headroom, 'headroom') };
}

/** The source policy from the config file (defaults when it does not exist) plus extra datastores. */
export async function loadSourcePolicy(path = DEFAULT_DAEMON_CONFIG, extra: { datastores?: string[]; allowNbd?: boolean } = {}): Promise<SourcePolicy> {
  const config = await loadConfigFile(path, DaemonConfigSchema);
  for (const d of extra.datastores ?? []) if (!d.startsWith('/')) throw new Error(`--datastore ${d}: give an absolute directory path`);
  return {
    datastores: [...(config.datastores ?? DEFAULT_DATASTORES), ...(extra.datastores ?? [])],
    allowNbd: extra.allowNbd || config.allowNbdSources,
  };
}
