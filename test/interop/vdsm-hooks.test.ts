// The VDSM hooks run as VDSM runs them: `_hook_domxml` names a file holding the domain XML,
// the VM's custom property `vmshift` comes as an environment variable, exit 2 fails the VM
// operation. A real vmshiftd serves the shims; qemu-io writes through the shim's socket and
// the data lands in the disk file.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, run, runStatus } from '../helpers/proc.ts';
import { planShims } from '../../src/libvirt/shim-plan.ts';
import { vmshiftHost, type VmshiftHost } from '../e2e/libvirt-host.ts';

test.after(cleanupAll);

const BEFORE = new URL('../../hooks/vdsm/before_vm_start', import.meta.url).pathname;
const AFTER = new URL('../../hooks/vdsm/after_vm_destroy', import.meta.url).pathname;
let vm: VmshiftHost, diskPath: string, xmlPath: string, original: string;

/** A domain XML as VDSM 4.5 writes it (trimmed): ovirt metadata, file disk on a storage domain path. */
const vdsmXml = (disk: string) => `<?xml version='1.0' encoding='utf-8'?>
<domain xmlns:ovirt-vm="http://ovirt.org/vm/1.0" type="kvm">
  <name>ovirt-vm-7</name>
  <uuid>0b6c1a3e-2f0d-4d5e-9c1a-7e2f3d4c5b6a</uuid>
  <metadata>
    <ovirt-vm:vm><ovirt-vm:clusterVersion>4.7</ovirt-vm:clusterVersion></ovirt-vm:vm>
  </metadata>
  <memory>262144</memory>
  <devices>
    <disk device="disk" snapshot="no" type="file">
      <source file="${disk}"><seclabel model="dac" relabel="no" type="none"/></source>
      <target bus="virtio" dev="vda"/>
      <driver cache="none" error_policy="stop" io="threads" name="qemu" type="raw"/>
      <serial>3f5e0a1b</serial>
    </disk>
    <disk device="cdrom" type="file"><target bus="sata" dev="sdc"/><readonly/><driver name="qemu" type="raw"/></disk>
  </devices>
</domain>
`;

function env(extra: Record<string, string>): NodeJS.ProcessEnv {
  const cfg = join(vm.dir, 'hooks.json');
  writeFileSync(cfg, JSON.stringify({ daemonSocket: vm.api, runDir: vm.runDir, group: null }));
  return { PATH: process.env.PATH, HOME: '/root', _hook_domxml: xmlPath, VMSHIFT_HOOK_CONFIG: cfg, ...extra };
}

test('setup: vmshiftd and a VDSM domain XML file', async () => {
  vm = vmshiftHost('vdh-');
  await vm.start();
  diskPath = join(vm.dir, 'sd-images-3f5e0a1b.raw');
  writeFileSync(diskPath, Buffer.alloc(8 * 1024 * 1024));
  xmlPath = join(vm.dir, 'domxml');
  original = vdsmXml(diskPath);
  writeFileSync(xmlPath, original);
});

test('without the vmshift custom property the hooks change nothing', async () => {
  for (const hook of [BEFORE, AFTER]) {
    const r = await runStatus(hook, [], { env: env({}) });
    assert.is(r.code, 0, r.stderr);
  }
  assert.is(readFileSync(xmlPath, 'utf8'), original);
  assert.is(vm.shims().length, 0);
});

test('bad input fails the start (exit 2) and leaves the XML alone', async () => {
  let r = await runStatus(BEFORE, [], { env: env({ vmshift: 'vdq' }) });
  assert.is(r.code, 2);
  assert.match(r.stderr, /no disk with target 'vdq'/);
  r = await runStatus(BEFORE, [], { env: env({ vmshift: 'sdc' }) });
  assert.is(r.code, 2);
  assert.match(r.stderr, /disk 'sdc' is type 'file' without a source/);
  r = await runStatus(BEFORE, [], { env: { ...env({ vmshift: 'vda' }), _hook_domxml: '' } });
  assert.is(r.code, 2);
  assert.match(r.stderr, /_hook_domxml is not set/);
  const garbage = join(vm.dir, 'garbage');
  writeFileSync(garbage, '<domain><name>x</name><devices>');
  r = await runStatus(BEFORE, [], { env: { ...env({ vmshift: 'vda' }), _hook_domxml: garbage } });
  assert.is(r.code, 2);
  assert.match(r.stderr, /not well-formed/);
  // The daemon down: refused, XML untouched.
  const cfg = join(vm.dir, 'down.json');
  writeFileSync(cfg, JSON.stringify({ daemonSocket: join(vm.dir, 'none.sock'), runDir: vm.runDir }));
  r = await runStatus(BEFORE, [], { env: { ...env({ vmshift: 'vda' }), VMSHIFT_HOOK_CONFIG: cfg } });
  assert.is(r.code, 2);
  assert.match(r.stderr, /vmshiftd is not running/);
  assert.is(readFileSync(xmlPath, 'utf8'), original);
  assert.is(vm.shims().length, 0);
});

test('before_vm_start rewrites the chosen disk in place and starts its shim; writes reach the file', async () => {
  const r = await runStatus(BEFORE, [], { env: env({ vmshift: 'vda' }) });
  assert.is(r.code, 0, r.stderr);
  const xml = readFileSync(xmlPath, 'utf8');
  const plan = planShims(xml)!;
  assert.equal(plan.disks.map((d) => [d.dev, d.name, d.source]), [['vda', 'ovirt-vm-7-vda', diskPath]]);
  assert.ok(xml.includes('<serial>3f5e0a1b</serial>') && xml.includes('ovirt-vm:clusterVersion'), 'the rest of the XML is kept');
  // QEMU is asked to hold the guest's I/O while vmshiftd restarts a shim (hooks.json default).
  assert.match(xml, /<source protocol="nbd" name="vda"><host transport="unix" socket="[^"]+"\/><reconnect delay="30"\/><\/source>/);
  assert.is(vm.shims()[0]?.socket, plan.disks[0]!.socket);
  await run('qemu-io', ['--image-opts', `driver=nbd,server.type=unix,server.path=${plan.disks[0]!.socket},export=vda`, '-c', 'write -P 0x5a 1M 256k', '-c', 'flush']);
  const data = readFileSync(diskPath);
  assert.ok(data.subarray(1024 * 1024, 1024 * 1024 + 256 * 1024).every((b) => b === 0x5a));
  assert.ok(data.subarray(0, 1024 * 1024).every((b) => b === 0));
});

test('after_vm_destroy stops the shims', async () => {
  const r = await runStatus(AFTER, [], { env: env({ vmshift: 'vda' }) });
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /vda: shim 'ovirt-vm-7-vda' stopped/);
  assert.is(vm.shims().length, 0);
});

test.run();
