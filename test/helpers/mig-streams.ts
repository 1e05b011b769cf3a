// Real QEMU migration streams for tests of the stream reader and the memory cache: a guest's
// migration written to a file (`migrate exec:cat > FILE`; with `passes`, it is let complete once QEMU began
// that many passes over the dirty pages and `until` holds), after which the source is resumed
// (`cont` from postmigrate) so that one guest can record several streams.
import { QmpClient } from '../../src/qemu/qmp.ts';

interface MigrateInfo { status?: string; 'error-desc'?: string; ram?: { transferred?: number; 'dirty-sync-count'?: number }; xbzrle?: Record<string, number> }

export interface Recorded { file: string; info: MigrateInfo }

export async function recordStream(qmp: string, file: string, o: { capabilities?: Record<string, boolean>; parameters?: Record<string, unknown>; timeoutMs?: number; passes?: number; until?: () => boolean } = {}): Promise<Recorded> {
  const q = await QmpClient.connect(qmp, { connectTimeoutMs: 5000 });
  try {
    const caps = Object.entries(o.capabilities ?? {}).map(([capability, state]) => ({ capability, state }));
    if (caps.length) await q.execute('migrate-set-capabilities', { capabilities: caps });
    if (o.parameters) await q.execute('migrate-set-parameters', o.parameters);
    await q.execute('migrate', { uri: `exec:cat > '${file.replaceAll("'", "'\\''")}'` });
    const deadline = Date.now() + (o.timeoutMs ?? 120_000);
    let info: MigrateInfo;
    let forced = false;
    for (;;) {
      info = await q.execute<MigrateInfo>('query-migrate');
      if (info.status === 'completed') break;
      // Enough passes seen: let it complete whatever is left (a guest that keeps dirtying may never converge).
      if (o.passes && (info.ram?.['dirty-sync-count'] ?? 0) >= o.passes && (o.until?.() ?? true) && !forced) { forced = true; await q.execute('migrate-set-parameters', { 'downtime-limit': 60_000 }); }
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`recording ${file}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
      if (Date.now() > deadline) { await q.execute('migrate_cancel').catch(() => {}); throw new Error(`recording ${file}: not completed in time (${JSON.stringify(info.ram)})`); }
      await new Promise((r) => setTimeout(r, 100));
    }
    await q.execute('cont');
    return { file, info };
  } finally {
    await q.close().catch(() => {});
  }
}
