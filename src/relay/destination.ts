// The destination half of `vmshift migrate` (memory), run inside `vmshift link-agent
// --dest-qmp PATH` on the peer host. It talks to the destination QEMU (started with
// `-incoming defer -S`) and to the source host over the link's `control` stream:
//   prepare -> set the same capabilities, `migrate-incoming unix:PATH`, answer `ready`
//   memory stream -> relayed to PATH (src/relay/memory-relay.ts)
//   commit  -> the source reached postmigrate: wait for the incoming side to complete, `cont`,
//              then give the guest back the memory the source's balloon policy took (if any)
//   abort, or the link failing before a commit -> `quit` the destination QEMU
// The one exception: if the link fails after this QEMU received the whole state but before
// a commit arrived, the source may be in postmigrate (it sent the commit) or running (its
// completion failed): this side cannot tell, so it neither runs nor quits its copy; it stays
// paused and the log says so (docs/memory-migration.md, "who wins at a cut at the end").
import { isAbsolute } from 'node:path';
import { QmpClient } from '../qemu/qmp.ts';
import type { Link } from '../link/link.ts';
import type { LinkStream } from '../link/stream.ts';
import { CONTROL_STREAM, Control, type ControlMsg } from './control.ts';
import { MEMORY_STREAM, cpuMsSince, destRelay, type RelayCounts } from './memory-relay.ts';

interface MigrateStatus { status?: string; 'error-desc'?: string }

/** The QEMU behind `q` waits for an incoming migration (`-incoming defer`, none started). */
async function stillWaiting(q: QmpClient): Promise<boolean> {
  try {
    const st = await q.execute<{ status: string }>('query-status');
    const m = await q.execute<MigrateStatus>('query-migrate');
    return st.status === 'inmigrate' && !m.status;
  } catch {
    return false;
  }
}

/**
 * `fixedQmp`: the destination QMP socket this agent was started for (SSH: one agent per
 * migration); undefined for a listener (TLS) that serves many: then `prepare` names it.
 */
export function serveDestination(link: Link, fixedQmp: string | undefined, incomingPath: string, log: (m: string) => void): void {
  let destQmp = fixedQmp ?? '(not named yet)';
  let qmp: QmpClient | null = null;
  let prepared = false;
  /** The QEMU was waiting for an incoming migration: this migration's to quit on a rollback. */
  let ours = false;
  let committed = false;
  let quitting = false;
  /** The source runs the memory cache: the memory stream is its frames. */
  let cache = false;
  let restore: number | null = null;
  /** What this side gave the destination QEMU (set once the memory stream arrives). */
  let relayed: RelayCounts | null = null;

  /** Quit the destination QEMU unless it runs the guest or is in doubt; false when in doubt. */
  const quitDest = async (why: string): Promise<boolean> => {
    if (committed || quitting) return true;
    // An SSH agent is started for one destination QEMU (fixedQmp): if the migration fails
    // before its prepare arrived (the first contact took longer than the source waited), that
    // QEMU still waits for it and nobody else will quit it. Only a QEMU still waiting is.
    // The client prepare opened, if any: QEMU serves one QMP client per socket, a second
    // connection would wait for this one.
    if (!ours && fixedQmp && !prepared) {
      qmp ??= await QmpClient.connect(fixedQmp, { connectTimeoutMs: 5000 }).catch(() => null);
      if (qmp) ours = await stillWaiting(qmp);
    }
    if (!ours) {
      log(`not quitting the QEMU at ${destQmp}: it was not waiting for this migration (${why})`);
      await qmp?.close().catch(() => {});
      qmp = null;
      return true;
    }
    quitting = true;
    try {
      const q = qmp ?? await QmpClient.connect(destQmp, { connectTimeoutMs: 5000 });
      const m = await q.execute<MigrateStatus>('query-migrate').catch(() => ({} as MigrateStatus));
      if (prepared && m.status === 'completed' && why.startsWith('link')) {
        log(`IN DOUBT: ${why} after the destination QEMU received the whole state but before the commit; leaving it paused (resume it with QMP "cont" only if the source is in postmigrate, else "quit" it)`);
        await q.close().catch(() => {});
        qmp = null;
        return false;
      }
      log(`quitting the destination QEMU (${destQmp}): ${why}`);
      await q.execute('quit').catch(() => {});
      await q.close().catch(() => {});
      qmp = null;
    } catch (e) {
      log(`cannot quit the destination QEMU at ${destQmp}: ${(e as Error).message}`);
    }
    return true;
  };

  /**
   * Null when the destination QEMU was given exactly the bytes the source QEMU wrote; else
   * why not. The last bytes may still be on their way to the socket: waited for, briefly.
   */
  const streamDiffers = async (want: { bytes: number; crc: number }): Promise<string | null> => {
    for (let i = 0; i < 200 && (relayed?.forward ?? 0) < want.bytes; i++) await new Promise((r) => setTimeout(r, 50));
    const got = relayed ?? { forward: 0, forwardCrc: 0 };
    if (got.forward === want.bytes && got.forwardCrc === want.crc) return null;
    return `the migration stream it received (${got.forward} bytes, crc32 ${got.forwardCrc.toString(16)}) differs from what the source QEMU sent (${want.bytes} bytes, crc32 ${want.crc.toString(16)})`;
  };

  const onControl = async (ctl: Control) => {
    for (;;) {
      let m: ControlMsg;
      try { m = await ctl.next(); } catch { return; }
      try {
        if (m.op === 'prepare') {
          if (fixedQmp && m.destQmp && m.destQmp !== fixedQmp) throw new Error(`prepare names ${m.destQmp}, but this agent serves ${fixedQmp}`);
          if (!fixedQmp) {
            if (typeof m.destQmp !== 'string' || !isAbsolute(m.destQmp)) throw new Error('prepare must name the destination QMP socket as an absolute path');
            destQmp = m.destQmp;
          }
          qmp = await QmpClient.connect(destQmp, { connectTimeoutMs: 5000 });
          const st = await qmp.execute<{ status: string }>('query-status');
          if (st.status !== 'inmigrate') throw new Error(`the destination QEMU at ${destQmp} is "${st.status}", not waiting for a migration (start it with -incoming defer -S)`);
          ours = true;
          cache = m.cache === true;
          restore = m.balloon?.restore ?? null;
          const caps = Object.entries(m.capabilities).map(([capability, state]) => ({ capability, state }));
          if (caps.length) await qmp.execute('migrate-set-capabilities', { capabilities: caps });
          await qmp.execute('migrate-incoming', { uri: `unix:${incomingPath}` });
          prepared = true;
          log(`destination QEMU ${destQmp} waits on ${incomingPath}`);
          ctl.send({ op: 'ready', sharedDir: link.opts.sharedDir ?? null });
        } else if (m.op === 'commit') {
          if (!qmp) throw new Error('commit before prepare');
          // The source is in postmigrate, so everything it sent was taken; the load may still be finishing.
          for (let i = 0; ; i++) {
            const s = await qmp.execute<MigrateStatus>('query-migrate');
            if (s.status === 'completed') break;
            if (s.status === 'failed' || i > 600) throw new Error(`the destination's incoming migration is "${s.status}"${s['error-desc'] ? `: ${s['error-desc']}` : ''}`);
            await new Promise((r) => setTimeout(r, 50));
          }
          if (m.stream) {
            const why = await streamDiffers(m.stream);
            if (why) {
              log(`refusing to run the guest: ${why}`);
              await quitDest(why);
              ctl.send({ op: 'refused', message: `on the destination: ${why}; its QEMU was quit` });
              ctl.end();
              return;
            }
          }
          committed = true;
          if (m.paused) log('commit received: destination QEMU left paused, as asked (resume it with QMP "cont")');
          else {
            await qmp.execute('cont');
            log('commit received: destination QEMU resumed');
          }
          const balloon = restore === null ? undefined : await qmp.execute('balloon', { value: restore }).then(
            () => { log(`balloon target set back to ${restore} bytes`); return { target: restore! }; },
            (e: Error) => { log(`cannot give the guest its memory back: ${e.message}`); return { error: e.message }; });
          // QEMU serves one QMP client per socket: let the operator (and libvirt) have it back.
          await qmp.close().catch(() => {});
          qmp = null;
          ctl.send({ op: 'running', ...(balloon ? { balloon } : {}) });
          ctl.end();
          return;
        } else if (m.op === 'abort') {
          await quitDest(`the source aborted: ${m.reason}`);
          ctl.send({ op: 'aborted' });
          ctl.end();
          return;
        }
      } catch (e) {
        const msg = (e as Error).message;
        log(`error: ${msg}`);
        ctl.send({ op: 'error', message: `on the destination: ${msg}` });
        await quitDest(msg);
      }
    }
  };

  link.on('stream', (s: LinkStream) => {
    if (s.streamName === CONTROL_STREAM) void onControl(new Control(s, 'the source host'));
    else if (s.streamName === MEMORY_STREAM) {
      const cpu0 = process.cpuUsage();
      destRelay(incomingPath, s, cache).then(
        (r) => { relayed = r.counts; return r.done.then(() => log(`memory stream done: ${r.counts.link} bytes from the link${cache ? ` (the cache rebuilt ${r.counts.forward} in ${r.counts.codecMs} ms of decoding)` : ''}, ${r.counts.back} bytes of return path out; crc32 of what QEMU got ${r.counts.forwardCrc.toString(16).padStart(8, '0')}; this process's CPU ${cpuMsSince(cpu0)} ms in the stream`), (e: Error) => log(`memory relay: ${e.message}`)); },
        (e: Error) => { log(e.message); s.destroy(e); },
      );
    }
  });
  // Files in the shared directory stay (renamed .failed) only while the outcome is in doubt.
  link.once('failed', (e: Error) => void quitDest(`link failed: ${e.message}`).then((decided) => { if (decided) link.discardFiles(); }));
}
