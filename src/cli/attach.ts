// `vmshift attach GUEST [--disk vda] [--qmp PATH]` puts shims under the disks of a running
// guest; `vmshift detach GUEST [--disk vda] [--qmp PATH]` takes them out again, onto the file
// each shim backs now. GUEST is a libvirt domain, or with --qmp a label for the guest behind
// that QMP socket. Exit 0 when every named (or, without --disk, every attachable) disk
// was handled, 1 otherwise; the guest's disks are never left half-switched.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { join, resolve } from 'node:path';
import { attachGuest, type AttachOutcome } from '../attach/attach.ts';
import { cleanupStoppedGuest, detachGuest, type DetachOutcome } from '../attach/detach.ts';
import { DirectShims, defaultRunDir } from '../attach/direct-shims.ts';
import { openGuest } from '../attach/guest-target.ts';
import { AttachRecords, type MonitorRef } from '../attach/records.ts';
import { printJson, UsageError } from './output.ts';
import { daemonSocket, daemonSocketOption } from './daemon-client.ts';
import { DaemonShims } from '../attach/daemon-shims.ts';
import type { ShimStarter } from '../attach/shim-starter.ts';
import { existsSync } from 'node:fs';
import { Virsh } from '../libvirt/virsh.ts';
import { reconnectDelayArg, reconnectDelayOption } from './reconnect-option.ts';

interface Args {
  guest?: string;
  disk?: string;
  qmp?: string;
  json: boolean;
  guestStopped?: boolean;
  daemonSocket?: string;
  reconnectDelay?: number;
}

/**
 * Shims belong to vmshiftd when it runs (its socket exists), else each is a `vmshift serve`
 * of its own. Detach asks whichever owner the attach record names.
 */
function context(daemonSocketFlag?: string) {
  const run = defaultRunDir();
  const records = new AttachRecords(join(run, 'attached'));
  const direct = new DirectShims(join(run, 'shims'));
  const sock = daemonSocket(daemonSocketFlag);
  const daemon = new DaemonShims(sock);
  const kind: 'daemon' | 'direct' = existsSync(sock) ? 'daemon' : 'direct';
  // An attach in progress has no record yet (or one naming `kind`): the current owner.
  const owner = async (name: string) => (((await records.get(name))?.starter ?? kind) === 'daemon' ? daemon : direct);
  const shims: ShimStarter = {
    start: (name, source) => (kind === 'daemon' ? daemon : direct).start(name, source),
    backing: async (name) => (await owner(name)).backing(name),
    stop: async (name) => (await owner(name)).stop(name),
  };
  return { shims, records, starterKind: kind };
}

const common = (y: Argv) =>
  y
    .positional('guest', { type: 'string', describe: 'libvirt domain name (with --qmp: a label for the guest)' })
    .option('disk', { type: 'string', describe: 'only this disk: target dev (vda) for libvirt, else device id, drive id or node name' })
    .option('qmp', { type: 'string', describe: "the guest's QMP socket, for guests libvirt does not run" })
    .option('daemon-socket', daemonSocketOption)
    .check((a) => {
      if (!a.guest && !a.qmp) throw new UsageError('name a guest: a libvirt domain, or --qmp PATH');
      return true;
    });

function report(guest: string, outcomes: Array<AttachOutcome | DetachOutcome>, json: boolean): void {
  const plain = outcomes.map((o) => {
    const { record: _r, ...rest } = o as AttachOutcome & { record?: unknown };
    return rest;
  });
  if (json) printJson({ guest, disks: plain });
  for (const o of outcomes) {
    if (o.status === 'failed' || (o.status === 'refused' && !json)) process.stderr.write(`vmshift: ${o.reason}\n`);
    if (json) continue;
    if (o.status === 'attached') process.stdout.write(`${o.disk}: attached: ${o.filename} served by shim ${o.shim.name} on ${o.shim.socket}\n`);
    if (o.status === 'detached') {
      process.stdout.write(`${o.disk}: detached: back on ${o.filename}\n`);
      for (const w of o.warnings) process.stderr.write(`vmshift: ${o.disk}: warning: ${w}\n`);
    }
    if (o.status === 'stale') process.stdout.write(`${o.disk}: ${o.reason}\n`);
  }
}

export const attachCommand = {
  command: 'attach [guest]',
  describe: 'Put shims under the disks of a running guest without stopping it',
  builder: (y: Argv) =>
    common(y).option('reconnect-delay', reconnectDelayOption),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    const reconnectDelayS = reconnectDelayArg(argv.reconnectDelay);
    const target = await openGuest({ guest: argv.guest, qmp: argv.qmp });
    try {
      const outcomes = await attachGuest(target, { ...context(argv.daemonSocket), disk: argv.disk, reconnectDelayS });
      report(target.label, outcomes, argv.json);
      const attached = outcomes.filter((o) => o.status === 'attached').length;
      // Without --disk, disks vmshift cannot sit under are only reported; with it, a refusal fails.
      const bad = outcomes.filter((o) => o.status === 'failed' || (argv.disk && o.status === 'refused')).length;
      if (bad > 0 || attached === 0) {
        if (attached === 0 && bad === 0 && !argv.json) process.stderr.write(`vmshift: no disk of ${target.label} can be attached\n`);
        process.exitCode = 1;
      }
    } finally {
      await target.close();
    }
  },
};

export const detachCommand = {
  command: 'detach [guest]',
  describe: 'Take the shims out from under the disks of a running guest, onto the files they back now',
  builder: (y: Argv) =>
    common(y).option('guest-stopped', { type: 'boolean', default: false, describe: 'the guest has exited: only stop its shims (no QMP)' }),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    const ctx = { ...context(argv.daemonSocket), disk: argv.disk };
    let label: string;
    let outcomes: DetachOutcome[];
    if (argv.guestStopped) {
      const monitor: MonitorRef = argv.qmp
        ? { kind: 'qmp', path: resolve(argv.qmp) }
        : { kind: 'libvirt', domain: argv.guest!, uri: new Virsh().uri };
      label = argv.guest ?? argv.qmp!;
      outcomes = await cleanupStoppedGuest(monitor, label, ctx);
    } else {
      const target = await openGuest({ guest: argv.guest, qmp: argv.qmp });
      label = target.label;
      try {
        outcomes = await detachGuest(target, ctx);
      } finally {
        await target.close();
      }
    }
    report(label, outcomes, argv.json);
    if (outcomes.length === 0 && !argv.json) process.stdout.write(`${label}: no disk is attached to vmshift\n`);
    if (outcomes.some((o) => o.status === 'failed')) process.exitCode = 1;
  },
};
