// QEMU's own migration parameters, chosen from what vmshift knows before the migration starts
// (issue 14 §3): the compression in use, the cache budget, the downtime the operator allows,
// the link's rate (given or measured) and the guest's dirty rate (QEMU's calc-dirty-rate).
// Every choice comes with the figures behind it, for the log. Capabilities cannot change while
// a migration runs, so auto-converge is decided here, up front.
import { formatBytes } from '../util/size.ts';
export type Compress = 'none' | 'cache' | 'xbzrle';

export interface ParamInputs {
  compress: Compress;
  /** Bytes: the memory cache's budget, or QEMU's XBZRLE cache at the same memory. */
  cacheSize: number;
  maxDowntimeMs: number;
  /** Bytes per second the operator set (--bandwidth), 0 = not set. */
  bandwidth: number;
  /** Bytes per second the link carries, null when not known. */
  linkRate: number | null;
  /** Bytes per second the guest dirties, null when not measured. */
  dirtyRate: number | null;
}

export interface ParamChoice {
  capabilities: Record<string, boolean>;
  parameters: Record<string, unknown>;
  /** One line per choice, with its figures. */
  reasons: string[];
}

/** QEMU's max-bandwidth when vmshift's cache compresses: high enough that the link, not QEMU's limit, sets the pace. */
export const CACHE_MAX_BANDWIDTH = 4 * 1024 ** 3;

export function chooseParameters(i: ParamInputs): ParamChoice {
  const capabilities: Record<string, boolean> = {};
  const parameters: Record<string, unknown> = { 'downtime-limit': i.maxDowntimeMs };
  const reasons = [`downtime-limit ${i.maxDowntimeMs} ms: the pause allowed at the switch-over (--max-downtime)`];

  // Every capability decided here is set both ways: QEMU keeps capabilities across migrations,
  // and a guest that arrived by an XBZRLE migration (its destination had xbzrle set) would
  // otherwise go on with XBZRLE under --compress none or cache.
  capabilities.xbzrle = i.compress === 'xbzrle';
  capabilities['auto-converge'] = false;
  if (i.compress === 'xbzrle') {
    // QEMU's XBZRLE cache holds a power-of-two number of pages: the largest that fits the budget.
    const pages = 2 ** Math.floor(Math.log2(Math.max(1, Math.floor(i.cacheSize / 4096))));
    parameters['xbzrle-cache-size'] = pages * 4096;
    reasons.push(`xbzrle on, xbzrle-cache-size ${formatBytes(pages * 4096)}: the largest power of two of pages within the ${formatBytes(i.cacheSize)} budget`);
  } else {
    reasons.push(`xbzrle off: --compress ${i.compress}`);
  }

  if (i.bandwidth) {
    parameters['max-bandwidth'] = i.bandwidth;
    reasons.push(`max-bandwidth ${formatBytes(i.bandwidth)}/s: set by --bandwidth`);
  } else if (i.compress === 'cache') {
    parameters['max-bandwidth'] = CACHE_MAX_BANDWIDTH;
    reasons.push(`max-bandwidth ${formatBytes(CACHE_MAX_BANDWIDTH)}/s: QEMU counts bytes before vmshift's cache compresses them, so its default limit (128 MiB/s) would cap the stream below what the link carries compressed`);
  }

  if (i.dirtyRate !== null && i.linkRate !== null) {
    // With compression the link carries more than its raw rate, but by how much is not known
    // before the stream starts: judge by the raw rate (the cautious side).
    const on = i.dirtyRate > i.linkRate * 0.8;
    capabilities['auto-converge'] = on;
    reasons.push(`auto-converge ${on ? 'on' : 'off'}: the guest dirties ${formatBytes(i.dirtyRate)}/s, the link carries ${formatBytes(i.linkRate)}/s${on ? ' (above 80% of it: without throttling the copy may never catch up)' : ''}`);
  } else {
    reasons.push(`auto-converge off: ${i.linkRate === null ? 'the link rate is not known (--link-rate)' : 'the dirty rate could not be measured'}`);
  }
  return { capabilities, parameters, reasons };
}
