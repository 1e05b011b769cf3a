// The libvirt hook as libvirt runs it (hooks/libvirt-qemu, argv, XML on stdin, no useful
// environment) for everything that needs no running daemon: domains that are not ours,
// garbage arguments and XML, the daemon down, incoming-migration path mapping; plus the
// pure pieces (shim names, path prefixes, the plan read from an enabled XML).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, runStatus, tempDir } from '../helpers/proc.ts';
import { enableShim } from '../../src/libvirt/domain-xml.ts';
import { parseHookArgs } from '../../src/libvirt/hook.ts';
import { mapPath } from '../../src/libvirt/hook-config.ts';
import { planShims, shimName, shimSocket } from '../../src/libvirt/shim-plan.ts';

test.after(cleanupAll);

const HOOK = new URL('../../hooks/libvirt-qemu', import.meta.url).pathname;
const typical = readFileSync(new URL('../fixtures/domains/typical.xml', import.meta.url), 'utf8');
const dir = tempDir('vhk-');
const RUN = '/run/vmshift';
const enabled = enableShim(typical, { disks: ['vda', 'vdb'], socketFor: (dev) => shimSocket(RUN, shimName('web01', 'x', dev)), exportName: (dev) => dev });

/** Run the hook like libvirt: argv, XML on stdin, an environment of LC_ALL, PATH, HOME only. */
function hook(args: string[], xml: string, config: object = { daemonSocket: join(dir, 'nobody-here.sock') }) {
  const cfg = join(dir, `cfg-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(cfg, JSON.stringify(config));
  return runStatus(HOOK, args, { input: xml, env: { PATH: process.env.PATH, HOME: '/root', LC_ALL: 'C', VMSHIFT_HOOK_CONFIG: cfg } });
}

test('shim names: DOMAIN-DEV when valid, else UUID-DEV; sockets under the run dir', () => {
  assert.is(shimName('web01', 'u', 'vda'), 'web01-vda');
  assert.is(shimName('my vm/with odd name', '4a1d3b8e-6f0c-4f61-9d8e-3c2b1a0f9e77', 'vdb'), '4a1d3b8e-6f0c-4f61-9d8e-3c2b1a0f9e77-vdb');
  assert.throws(() => shimName('bad name', '', 'vda'), /cannot derive a shim name/);
  assert.is(shimSocket('/run/vmshift', 'web01-vda'), '/run/vmshift/web01-vda/nbd.sock');
});

test('the plan of an enabled domain names each disk, its shim, socket and current path', () => {
  assert.is(planShims(typical), null);
  const plan = planShims(enabled)!;
  assert.is(plan.domain, 'web01');
  assert.equal(plan.disks, [
    { dev: 'vda', name: 'web01-vda', source: '/var/lib/libvirt/images/web01.qcow2', socket: '/run/vmshift/web01-vda/nbd.sock', export: 'vda' },
    { dev: 'vdb', name: 'web01-vdb', source: '/dev/vg0/web01-data', socket: '/run/vmshift/web01-vdb/nbd.sock', export: 'vdb' },
  ]);
});

test('path prefixes map whole components only, longest prefix first', () => {
  const map = { '/srv/ds1': '/mnt/a', '/srv/ds1/fast/': '/mnt/fast/' };
  assert.is(mapPath('/srv/ds1/x.raw', map), '/mnt/a/x.raw');
  assert.is(mapPath('/srv/ds1/fast/y.raw', map), '/mnt/fast/y.raw');
  assert.is(mapPath('/srv/ds10/x.raw', map), undefined);
});

test('argument parsing refuses garbage', () => {
  assert.equal(parseHookArgs(['web01', 'prepare', 'begin', '-']), { domain: 'web01', op: 'prepare', subop: 'begin', extra: '-' });
  assert.throws(() => parseHookArgs([]), /expected DOMAIN OP SUBOP/);
  assert.throws(() => parseHookArgs(['a', 'b', 'c', 'd', 'e']), /5 argument/);
  assert.throws(() => parseHookArgs(['', 'prepare', 'begin']), /bad arguments/);
  assert.throws(() => parseHookArgs(['web01', 'PREPARE; rm', 'begin']), /bad arguments/);
});

test('a domain without vmshift passes every operation at once, even with the daemon down', async () => {
  for (const op of ['prepare', 'start', 'started', 'stopped', 'release', 'reconnect', 'migrate', 'restore']) {
    const r = await hook(['web01', op, 'begin', '-'], typical);
    assert.is(r.code, 0, `${op}: ${r.stderr}`);
    assert.is(r.stdout, '', op);
    assert.is(r.stderr, '', op);
  }
});

test('an enabled domain is refused at prepare when vmshiftd is down, with the reason', async () => {
  const r = await hook(['web01', 'prepare', 'begin', '-'], enabled);
  assert.is(r.code, 1);
  assert.match(r.stderr, /domain 'web01' prepare: refused: vmshiftd is not running \(socket .*nobody-here.sock\)/);
});

test('release, reconnect and started never fail (libvirt would kill the guest): a warning only', async () => {
  for (const op of ['release', 'reconnect', 'started']) {
    const r = await hook(['web01', op, 'end', '-'], enabled);
    assert.is(r.code, 0, op);
    assert.match(r.stderr, /warning: vmshiftd is not running/, op);
  }
});

test('started asks vmshiftd nothing when libvirt kept <reconnect delay> or enable asked for none', async () => {
  const kept = enableShim(typical, { disks: ['vda'], socketFor: (dev) => shimSocket(RUN, shimName('web01', 'x', dev)), exportName: (dev) => dev, reconnectDelay: 30 });
  const none = enableShim(typical, { disks: ['vda'], socketFor: (dev) => shimSocket(RUN, shimName('web01', 'x', dev)), exportName: (dev) => dev, reconnectDelay: 0 });
  for (const xml of [kept, none]) {
    // The daemon is down: any call would print a warning.
    const r = await hook(['web01', 'started', 'begin', '-'], xml);
    assert.is(r.code, 0);
    assert.is(r.stderr, '');
  }
});

test('garbage arguments exit 2; garbage XML carrying our namespace is refused at prepare', async () => {
  let r = await hook(['web01'], typical);
  assert.is(r.code, 2);
  assert.match(r.stderr, /expected DOMAIN OP SUBOP/);
  r = await hook(['web01', 'prepare', 'begin', '-', 'x', 'y'], typical);
  assert.is(r.code, 2);
  const broken = enabled.replace('</devices>', '');
  r = await hook(['web01', 'prepare', 'begin', '-'], broken);
  assert.is(r.code, 1);
  assert.match(r.stderr, /refused: domain XML is not well-formed/);
  r = await hook(['web01', 'release', 'end', '-'], broken);
  assert.is(r.code, 0);
  assert.match(r.stderr, /warning: domain XML is not well-formed/);
  // Garbage without our namespace is not ours to judge.
  r = await hook(['web01', 'prepare', 'begin', '-'], '\u0000\u0001 not xml');
  assert.is(r.code, 0);
});

test('oversized input is refused at prepare', async () => {
  const r = await hook(['web01', 'prepare', 'begin', '-'], 'x'.repeat(5 * 1024 * 1024));
  assert.is(r.code, 1);
  assert.match(r.stderr, /larger than 4194304 bytes/);
});

test('a bad config file is refused at prepare of an enabled domain, naming the file', async () => {
  const r = await hook(['web01', 'prepare', 'begin', '-'], enabled, { pathMap: { relative: '/x' } });
  assert.is(r.code, 1);
  assert.match(r.stderr, /cfg-.*\.json: pathMap/);
});

test('incoming migrate maps datastore paths, live and recorded, and prints the XML', async () => {
  const r = await hook(['web01', 'migrate', 'begin', '-'], enabled, { pathMap: { '/var/lib/libvirt/images': '/mnt/nfs/images', '/dev/vg0/': '/dev/vg1/' } });
  assert.is(r.code, 0, r.stderr);
  const plan = planShims(r.stdout)!;
  assert.equal(plan.disks.map((d) => d.source), ['/mnt/nfs/images/web01.qcow2', '/dev/vg1/web01-data']);
  // Nothing else changed.
  assert.is(r.stdout, enabled.replace('/var/lib/libvirt/images/web01.qcow2', '/mnt/nfs/images/web01.qcow2').replace('/dev/vg0/web01-data', '/dev/vg1/web01-data'));
  // No mapping configured: no output, libvirt keeps its XML.
  const none = await hook(['web01', 'migrate', 'begin', '-'], enabled, {});
  assert.is(none.code, 0);
  assert.is(none.stdout, '');
});

test.run();
