// The hooks' configuration file. libvirt runs its hooks with an environment scrubbed down to
// LC_ALL, PATH and HOME, so what a hook needs beyond defaults lives in a file:
//   /etc/vmshift/hooks.json (or $VMSHIFT_HOOK_CONFIG), all keys optional:
//   { "daemonSocket": "/run/vmshift/vmshiftd.sock",
//     "runDir": "/run/vmshift",               // vmshiftd's --run-dir
//     "group": "libvirt-qemu",            // group allowed to reach a shim's socket (QEMU's user)
//     "reconnectDelay": 30,               // VDSM: seconds QEMU holds I/O while a shim restarts
//     "pathMap": { "/srv/ds1/": "/mnt/ds1/" } }   // incoming migration: datastore prefixes
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { DEFAULT_RECONNECT_DELAY_S, MAX_RECONNECT_DELAY_S } from '../qemu/nbd-reconnect.ts';

export const DEFAULT_HOOK_CONFIG = '/etc/vmshift/hooks.json';

const HookConfigSchema = z
  .object({
    daemonSocket: z.string().min(1).optional(),
    /** vmshiftd's --run-dir (the VDSM hook writes socket paths under it). */
    runDir: z.string().startsWith('/').optional(),
    group: z.string().min(1).nullable().optional(),
    /** Seconds QEMU holds the guest's I/O while a shim restarts (src/qemu/nbd-reconnect.ts). */
    reconnectDelay: z.number().int().min(0).max(MAX_RECONNECT_DELAY_S).default(DEFAULT_RECONNECT_DELAY_S),
    pathMap: z.record(z.string().startsWith('/'), z.string().startsWith('/')).default({}),
  })
  .strict();
export type HookConfig = z.infer<typeof HookConfigSchema>;

export async function loadHookConfig(path = process.env.VMSHIFT_HOOK_CONFIG || DEFAULT_HOOK_CONFIG): Promise<HookConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return HookConfigSchema.parse({});
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: not JSON: ${(e as Error).message}`);
  }
  const parsed = HookConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const i = parsed.error.issues[0]!;
    throw new Error(`${path}: ${i.path.join('.') || 'top level'}: ${i.message}`);
  }
  return parsed.data;
}

/**
 * Map a path by the longest matching prefix of `pathMap`; undefined when none matches.
 * A prefix matches whole path components only ("/srv/ds1" does not match "/srv/ds10/x").
 */
export function mapPath(path: string, pathMap: Record<string, string>): string | undefined {
  let best: string | undefined;
  for (const from of Object.keys(pathMap)) {
    const base = from.endsWith('/') ? from : `${from}/`;
    if ((path === from || path.startsWith(base)) && (!best || from.length > best.length)) best = from;
  }
  if (best === undefined) return undefined;
  return pathMap[best]! + path.slice(best.length);
}
