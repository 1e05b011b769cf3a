// The libvirt hook against a real vmshiftd, called as libvirt calls it: prepare starts the
// shims (and again is a no-op), release stops them, and an XML whose socket is not where
// the daemon serves is refused with both paths named and no shim left behind.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, runStatus } from '../helpers/proc.ts';
import { enableShim } from '../../src/libvirt/domain-xml.ts';
import { shimName, shimSocket } from '../../src/libvirt/shim-plan.ts';
import { LIBVIRT_HOOK, vmshiftHost } from '../e2e/libvirt-host.ts';
import { controlCall } from '../../src/control/client.ts';

test.after(cleanupAll);

const vm = vmshiftHost('vhd-');
const disk = join(vm.dir, 'disk.raw');
const domainXml = `<domain type='qemu'>
  <name>hooked</name>
  <uuid>6f1c2b3a-0000-4000-8000-000000000001</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;
const enabledIn = (runDir: string) => enableShim(domainXml, { disks: ['vda'], socketFor: (dev) => shimSocket(runDir, shimName('hooked', '', dev)), exportName: 'vda' });

function hook(op: string, xml: string) {
  const cfg = join(vm.dir, 'hooks.json');
  writeFileSync(cfg, JSON.stringify({ daemonSocket: vm.api, group: null }));
  return runStatus(LIBVIRT_HOOK, ['hooked', op, op === 'release' ? 'end' : 'begin', '-'], { input: xml, env: { PATH: process.env.PATH, HOME: '/root', LC_ALL: 'C', VMSHIFT_HOOK_CONFIG: cfg } });
}

test('prepare starts the shim, a second prepare finds it running, release stops it', async () => {
  writeFileSync(disk, Buffer.alloc(4 * 1024 * 1024));
  await vm.start();
  const xml = enabledIn(vm.runDir);
  let r = await hook('prepare', xml);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /vda: shim 'hooked-vda' serves .*disk\.raw on .*hooked-vda\/nbd\.sock/);
  assert.equal(vm.shims().map((s) => [s.name, s.source, s.export]), [['hooked-vda', disk, 'vda']]);
  const pid = vm.shims()[0]!.pid;
  r = await hook('prepare', xml);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /already serves/);
  assert.is(vm.shims()[0]!.pid, pid);
  r = await hook('release', xml);
  assert.is(r.code, 0, r.stderr);
  assert.is(vm.shims().length, 0);
  // Releasing again (libvirt may) is fine.
  r = await hook('release', xml);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stderr, '');
});

test('an XML pointing at another run dir is refused with both paths, nothing left running', async () => {
  const r = await hook('prepare', enabledIn('/run/elsewhere'));
  assert.is(r.code, 1);
  assert.match(r.stderr, /points at \/run\/elsewhere\/hooked-vda\/nbd\.sock but vmshiftd serves shim 'hooked-vda' on .*\/run\/hooked-vda\/nbd\.sock/);
  assert.is(vm.shims().length, 0);
});

test('shim.hold-io (the started hook) refuses bad input and queues only shims a libvirt domain started', async () => {
  const call = (params: Record<string, unknown>) => controlCall<{ queued: string[] }>(vm.api, 'shim.hold-io', params).catch((e: Error) => e);
  assert.match(String(await call({ names: 'hooked-vda', delay: 30 })), /"names" must be a list of shim names/);
  assert.match(String(await call({ names: ['hooked-vda'], delay: -1 })), /"delay": -1 is not a whole number of seconds from 0 to 3600/);
  assert.match(String(await call({ names: ['hooked-vda'], delay: '30; rm' })), /is not a whole number/);
  // No such shim running (nothing is asked of libvirt).
  assert.equal(await call({ names: ['hooked-vda', '../etc'], delay: 30 }), { queued: [] });
});

test.run();
