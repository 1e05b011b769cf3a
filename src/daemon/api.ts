// vmshiftd's API: the methods on its unix socket (JSON lines, see src/control/protocol.ts).
//   ping                                   -> {pong, pid, version}
//   shim.start {name, source, export?, track?, group?, startedBy?, owner?}  start (idempotent
//                                          for name+source; source only from the allowed
//                                          datastores; any earlier path of the disk serves
//                                          where it lives now)
//   shim.locate {name, waitRecordedMs?}    where the disk lives (also after its shim stopped)
//                                          and whether its domain's XML records that yet
//   shim.forget {name}                     drop the state file a stopped shim left
//   shim.stop  {name, force?, startedBy?}  SIGTERM the shim, wait, drop its record (with
//                                          startedBy: only a shim that caller started)
//   shim.restart {name, abortJob?}         swap the shim's process under a running guest (a
//                                          stall: QEMU reconnects); refused during a job
//                                          unless abortJob; answers with the measured stall
//   shim.list                              the registry's records
//   shim.hold-io {names, delay}            (libvirt hook, `started`) give QEMU's NBD nodes of
//                                          these shims a reconnect delay through libvirt's
//                                          monitor, in the background; answers at once
//   status                                 every shim with its live status and job
//   job.start  {name, to, ...migrate params, follow?, abortOnDisconnect?}   forwarded to the
//                                          shim's migrate.start; its events are relayed to the caller
//   job.status {name} / job.abort {name}   forwarded to migrate.status / migrate.abort
// Jobs run inside the shim process, so they survive a daemon restart like the shim does.
import type { Logger } from 'pino';
import { ControlServer } from '../control/server.ts';
import { ControlError } from '../control/protocol.ts';
import { controlCall } from '../control/client.ts';
import { OwnerSchema, RegistryError } from './registry.ts';
import { isNbdUri } from '../block/open.ts';
import type { Supervisor } from './supervisor.ts';
import type { ReconnectGiver } from './reconnect-giver.ts';
import { checkReconnectDelay } from '../qemu/nbd-reconnect.ts';

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

/** The libvirt domain a hook starts a shim for (validated: it becomes virsh arguments). */
function owner(v: unknown) {
  if (v === undefined || v === null) return undefined;
  const parsed = OwnerSchema.safeParse(v);
  if (!parsed.success) throw new ControlError('bad-request', `"owner": ${parsed.error.issues[0]?.path.join('.')}: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}

export function registerApi(server: ControlServer, sup: Supervisor, log: Logger, giver?: ReconnectGiver): void {
  server.on('ping', () => ({ pong: true, pid: process.pid, version: API_VERSION }));

  server.on('shim.start', (p) =>
    guard(() =>
      sup.start({
        name: str(p, 'name'),
        source: str(p, 'source'),
        export: optional(p, 'export'),
        track: optional(p, 'track', ['bitmap', 'bloom', 'none'] as const),
        group: optional(p, 'group'),
        startedBy: optional(p, 'startedBy'),
        owner: owner(p.owner),
      }),
    ),
  );

  server.on('shim.stop', (p) => guard(() => sup.stop(str(p, 'name'), p.force === true, optional(p, 'startedBy'))));

  server.on('shim.restart', (p) => guard(() => sup.restart(str(p, 'name'), { abortJob: p.abortJob === true })));

  server.on('shim.list', () => ({ shims: sup.registry.list() }));

  server.on('shim.hold-io', (p) =>
    guard(() => {
      if (!giver) throw new ControlError('bad-request', 'shim.hold-io: this daemon does not talk to libvirt');
      const names = p.names;
      if (!Array.isArray(names) || names.length === 0 || names.length > 64 || !names.every((n) => typeof n === 'string')) throw new ControlError('bad-request', '"names" must be a list of shim names');
      let delay: number;
      try {
        delay = checkReconnectDelay(p.delay, '"delay"');
      } catch (e) {
        throw new ControlError('bad-request', (e as Error).message);
      }
      return giver.request(names as string[], delay);
    }),
  );

  server.on('shim.forget', (p) => guard(() => sup.forgetState(str(p, 'name'))));

  server.on('shim.locate', (p) =>
    guard(async () => {
      const name = str(p, 'name');
      const waitMs = typeof p.waitRecordedMs === 'number' ? Math.min(Math.max(0, p.waitRecordedMs), 600_000) : 0;
      const deadline = Date.now() + waitMs;
      for (;;) {
        const where = await sup.locate(name);
        if (!where) throw new ControlError('unknown-shim', `no shim named "${name}" and no state file left by one`);
        const rec = sup.registry.get(name);
        const recorded = rec?.owner ? rec.recorded === where.backing : null;
        if (recorded !== false || Date.now() >= deadline) return { ...where, owner: rec?.owner ?? null, recorded };
        await new Promise((r) => setTimeout(r, 200));
      }
    }),
  );

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
      await sup.checkDestination(params.to);
      const follow = params.follow !== false;
      log.info({ shim: name, to: params.to, mode: params.mode ?? 'auto' }, 'job starting');
      // The caller going away stops the relay; the job goes on (abort it with job.abort)
      // unless the caller asked for abortOnDisconnect (the shim then sees the relay close).
      const gone = new AbortController();
      void ctx.closed.then(() => gone.abort());
      try {
        const result = await controlCall<{ ok?: boolean; to?: string }>(ctl, 'migrate.start', { ...params, follow }, { onEvent: (e, d) => ctx.emit(e, d), signal: gone.signal });
        log.info({ shim: name, to: params.to, follow }, follow ? 'job finished' : 'job started (detached)');
        return result;
      } catch (e) {
        if (!gone.signal.aborted) log.warn({ shim: name, to: params.to, err: (e as Error).message }, 'job failed');
        throw e;
      } finally {
        // The move (if it committed) is in the shim's state file: follow it now, not at the next tick.
        if (follow) await sup.followState(str(p, 'name')).catch(() => {});
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
