// vmshiftd's API: the methods on its unix socket (JSON lines, see src/control/protocol.ts).
//   ping                                   -> {pong, pid, version}
//   shim.start {name, source, export?, track?, group?}  start (idempotent for name+source)
//   shim.stop  {name, force?}              SIGTERM the shim, wait, drop its record
//   shim.restart {name, abortJob?}         swap the shim's process under a running guest (a
//                                          stall: QEMU reconnects); refused during a job
//                                          unless abortJob; answers with the measured stall
//   shim.list                              the registry's records
//   status                                 every shim with its live status and job
//   job.start  {name, to, ...migrate params, follow?}   forwarded to the shim's migrate.start;
//                                          its events are relayed to the caller
//   job.status {name} / job.abort {name}   forwarded to migrate.status / migrate.abort
// Jobs run inside the shim process, so they survive a daemon restart like the shim does.
import type { Logger } from 'pino';
import { ControlServer } from '../control/server.ts';
import { ControlError } from '../control/protocol.ts';
import { controlCall } from '../control/client.ts';
import { RegistryError } from './registry.ts';
import { isNbdUri } from '../block/open.ts';
import type { Supervisor } from './supervisor.ts';

export const API_VERSION = 1;

/** Registry validation errors travel as `bad-request`, like the shim's own. */
function guard<T>(fn: () => Promise<T> | T): Promise<T> {
  return Promise.resolve()
    .then(fn)
    .catch((e) => {
      throw e instanceof RegistryError ? new ControlError('bad-request', e.message) : e;
    });
}

function str(params: Record<string, unknown>, key: string): string {
  const v = params[key];
  if (typeof v !== 'string' || !v) throw new ControlError('bad-request', `missing "${key}" (a string)`);
  return v;
}

function optional<T extends string>(params: Record<string, unknown>, key: string, allowed?: readonly T[]): T | undefined {
  const v = params[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || (allowed && !allowed.includes(v as T))) {
    throw new ControlError('bad-request', `"${key}" must be ${allowed ? `one of ${allowed.join(', ')}` : 'a string'}`);
  }
  return v as T;
}

export function registerApi(server: ControlServer, sup: Supervisor, log: Logger): void {
  server.on('ping', () => ({ pong: true, pid: process.pid, version: API_VERSION }));

  server.on('shim.start', (p) =>
    guard(() =>
      sup.start({
        name: str(p, 'name'),
        source: str(p, 'source'),
        export: optional(p, 'export'),
        track: optional(p, 'track', ['bitmap', 'bloom', 'none'] as const),
        group: optional(p, 'group'),
      }),
    ),
  );

  server.on('shim.stop', (p) => guard(() => sup.stop(str(p, 'name'), p.force === true)));

  server.on('shim.restart', (p) => guard(() => sup.restart(str(p, 'name'), { abortJob: p.abortJob === true })));

  server.on('shim.list', () => ({ shims: sup.registry.list() }));

  server.on('status', async () => {
    const shims = await Promise.all(sup.registry.list().map(async (rec) => ({ ...rec, ...(await sup.describe(rec)) })));
    return { daemon: { pid: process.pid, version: API_VERSION }, shims };
  });

  server.on('job.start', (p, ctx) =>
    guard(async () => {
      const { name, ...params } = p;
      const ctl = sup.controlSocket(str(p, 'name'));
      if (typeof params.to !== 'string' || !(params.to.startsWith('/') || isNbdUri(params.to))) {
        throw new ControlError('bad-request', `job.start: "to" must be an absolute path or an NBD URI, not ${JSON.stringify(params.to)}`);
      }
      const follow = params.follow !== false;
      log.info({ shim: name, to: params.to, mode: params.mode ?? 'auto' }, 'job starting');
      // The caller going away stops the relay, not the job (abort it with job.abort).
      const gone = new AbortController();
      void ctx.closed.then(() => gone.abort());
      try {
        const result = await controlCall<{ ok?: boolean; to?: string }>(ctl, 'migrate.start', { ...params, follow }, { onEvent: (e, d) => ctx.emit(e, d), signal: gone.signal });
        log.info({ shim: name, to: params.to, follow }, follow ? 'job finished' : 'job started (detached)');
        return result;
      } catch (e) {
        if (!gone.signal.aborted) log.warn({ shim: name, to: params.to, err: (e as Error).message }, 'job failed');
        throw e;
      }
    }),
  );

  server.on('job.status', (p) => guard(() => controlCall(sup.controlSocket(str(p, 'name')), 'migrate.status', {}, { timeoutMs: 10_000 })));

  server.on('job.abort', (p) =>
    guard(async () => {
      const name = str(p, 'name');
      log.info({ shim: name }, 'job abort requested');
      return controlCall(sup.controlSocket(name), 'migrate.abort', {}, { timeoutMs: 120_000 });
    }),
  );
}
