// QEMU 7.2's own mirror as the bench's anchor: a qemu-storage-daemon (QMP + NBD export, no
// guest needed) serves the source; `blockdev-mirror` copies it to a destination node while
// fio writes through the export; after BLOCK_JOB_READY, `job-complete` pivots the export.
import { closeSync, openSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { startDaemon, waitForSocket } from '../test/helpers/proc.ts';
import { QmpClient, type QmpEvent } from '../src/qemu/qmp.ts';
import type { JobOutcome, JobSpec, MigrateSystem } from './migrate-system.ts';

const JOB = 'bench-mirror';

export function qemuMirror(copyMode: 'background' | 'write-blocking'): MigrateSystem {
  return {
    system: 'QEMU',
    mode: copyMode,
    async start(dir, source) {
      const qmpPath = join(dir, 'qmp');
      const nbd = join(dir, 'nbd');
      const daemon = startDaemon('qemu-storage-daemon', [
        '--chardev', `socket,path=${qmpPath},server=on,wait=off,id=mon`, '--monitor', 'chardev=mon',
        '--blockdev', `driver=file,filename=${source},node-name=src-file`,
        '--blockdev', 'driver=raw,file=src-file,node-name=src',
      ]);
      let qmp: QmpClient | undefined;
      try {
        await waitForSocket(qmpPath, daemon);
        qmp = await QmpClient.connect(qmpPath);
        await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
        await qmp.execute('block-export-add', { type: 'nbd', id: 'exp', 'node-name': 'src', name: 'disk', writable: true });
      } catch (e) {
        await qmp?.close();
        await daemon.stop();
        throw new Error(`qemu-storage-daemon on ${source}: ${(e as Error).message}\n${daemon.output()}`, { cause: e });
      }
      const client = qmp;
      return {
        uri: `nbd+unix:///disk?socket=${nbd}`,
        pid: daemon.pid,
        migrate: (spec) => mirror(client, copyMode, spec),
        async stop() {
          await client.close();
          await daemon.stop();
        },
      };
    },
  };
}

async function mirror(qmp: QmpClient, copyMode: string, spec: JobSpec): Promise<JobOutcome> {
  // blockdev-add opens files, it does not create them: a fresh sparse file, as vmshift makes.
  const fd = openSync(spec.dest, 'wx');
  ftruncateSync(fd, spec.size);
  closeSync(fd);
  await qmp.execute('blockdev-add', { driver: 'file', filename: spec.dest, 'node-name': 'dst-file' });
  await qmp.execute('blockdev-add', { driver: 'raw', file: 'dst-file', 'node-name': 'dst' });

  const untilReady = nextJobEvent(qmp, ['BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED'], spec.capMs);
  const startMs = Date.now();
  await qmp.execute('blockdev-mirror', {
    'job-id': JOB, device: 'src', target: 'dst', sync: 'full', 'copy-mode': copyMode,
    ...(spec.bandwidth > 0 ? { speed: spec.bandwidth } : {}),
  });
  const ready = await untilReady;
  if (ready?.event === 'BLOCK_JOB_COMPLETED') {
    return { converged: false, startMs, endMs: Date.now(), bytesToDest: Number(ready.data.offset), passes: '-', switchMs: NaN, error: `mirror failed before ready: ${String(ready.data.error)}` };
  }
  if (!ready) {
    // The background mirror cannot catch up when guest writes outpace its copy rate.
    const cancelled = nextJobEvent(qmp, ['BLOCK_JOB_CANCELLED', 'BLOCK_JOB_COMPLETED'], 60_000);
    await qmp.execute('block-job-cancel', { device: JOB, force: true });
    const ev = await cancelled;
    return { converged: false, startMs, endMs: Date.now(), bytesToDest: Number(ev?.data.offset ?? NaN), passes: '-', switchMs: NaN, error: `did not converge within ${Math.round(spec.capMs / 1000)} s` };
  }
  const untilDone = nextJobEvent(qmp, ['BLOCK_JOB_COMPLETED'], 300_000);
  const switchStart = Date.now();
  await qmp.execute('job-complete', { id: JOB });
  const done = await untilDone;
  const endMs = Date.now();
  if (!done) throw new Error(`QEMU mirror (${copyMode}): no BLOCK_JOB_COMPLETED within 300 s of job-complete`);
  return {
    converged: done.data.error === undefined,
    startMs, endMs,
    bytesToDest: Number(done.data.offset),
    passes: '-',
    switchMs: endMs - switchStart,
    ...(done.data.error !== undefined ? { error: `mirror failed: ${String(done.data.error)}` } : {}),
  };
}

/** The first of `names` for the bench's job, or null after `timeoutMs`. Subscribe before the command that causes it. */
function nextJobEvent(qmp: QmpClient, names: string[], timeoutMs: number): Promise<QmpEvent | null> {
  return new Promise((resolve) => {
    const off = qmp.onEvent((ev) => {
      if (!names.includes(ev.event) || ev.data.device !== JOB) return;
      finish(ev);
    });
    const timer = setTimeout(() => finish(null), timeoutMs);
    function finish(ev: QmpEvent | null) {
      clearTimeout(timer);
      off();
      resolve(ev);
    }
  });
}
