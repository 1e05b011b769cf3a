// Domain XML rewriting: listing disks, enabling the shim on chosen disks and disabling it
// again (exact round trip, unknown elements and comments kept), moved paths, path mapping,
// and clear typed errors for bad input.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import {
  disableShim, DomainXmlError, enableShim, formatDomainXml, isEnabled, listDisks, mapPaths, recordedReconnectDelay, VMSHIFT_NS,
} from '../../src/libvirt/domain-xml.ts';
import { planShims } from '../../src/libvirt/shim-plan.ts';

const fixture = (name: string) => readFileSync(new URL(`../fixtures/domains/${name}`, import.meta.url), 'utf8');
const typical = fixture('typical.xml');
const minimal = fixture('minimal.xml');
const shimOpts = { disks: ['vda', 'vdb'], socketFor: (dev: string) => `/run/vmshift/web01-${dev}.sock`, exportName: 'disk' };

function expectError(fn: () => unknown, kind: DomainXmlError['kind'], message: RegExp): void {
  try {
    fn();
  } catch (e) {
    assert.instance(e, DomainXmlError);
    assert.is((e as DomainXmlError).kind, kind);
    assert.match((e as Error).message, message);
    return;
  }
  assert.unreachable(`expected a ${kind} error`);
}

test('listDisks reports target, source kind and format of every disk', () => {
  assert.equal(listDisks(typical), [
    { target: 'vda', device: 'disk', type: 'file', source: { kind: 'file', path: '/var/lib/libvirt/images/web01.qcow2' }, driverType: 'qcow2', shimmed: false },
    { target: 'vdb', device: 'disk', type: 'block', source: { kind: 'block', path: '/dev/vg0/web01-data' }, driverType: 'raw', shimmed: false },
    { target: 'sda', device: 'cdrom', type: 'file', source: null, driverType: 'raw', shimmed: false },
    { target: 'vdc', device: 'disk', type: 'network', source: { kind: 'nbd', export: 'scratch', host: '127.0.0.1', port: '10809' }, driverType: 'raw', shimmed: false },
  ]);
  assert.equal(listDisks(minimal)[0]!.source, { kind: 'file', path: '/srv/tiny & co/disk.raw' });
});

test('enableShim turns the chosen disks into NBD disks on their sockets and records the originals', () => {
  const on = enableShim(typical, shimOpts);
  assert.ok(isEnabled(on));
  assert.not.ok(isEnabled(typical));
  const disks = listDisks(on);
  assert.equal(disks[0], { target: 'vda', device: 'disk', type: 'network', source: { kind: 'nbd', export: 'disk', socket: '/run/vmshift/web01-vda.sock' }, driverType: 'qcow2', shimmed: true });
  assert.equal(disks[1]!.source, { kind: 'nbd', export: 'disk', socket: '/run/vmshift/web01-vdb.sock' });
  assert.is(disks[1]!.driverType, 'raw');
  assert.equal(disks.slice(2), listDisks(typical).slice(2), 'other disks untouched');
  // The driver keeps its format and options; the record sits in <metadata> in our namespace.
  assert.match(on, /<driver name="qemu" type="qcow2" cache="none" io="native" discard="unmap"\/>/);
  assert.match(on, /<source protocol="nbd" name="disk"><host transport="unix" socket="\/run\/vmshift\/web01-vda.sock"\/><\/source>/);
  assert.ok(on.includes(`<vmshift:disks xmlns:vmshift="${VMSHIFT_NS}">`));
  assert.match(on, /<vmshift:disk dev="vda" type="file"><vmshift:source file="\/var\/lib\/libvirt\/images\/web01.qcow2" index="2"\/><\/vmshift:disk>/);
  assert.match(on, /<vmshift:source dev="\/dev\/vg0\/web01-data" index="1">\s*<vmshift:seclabel model="dac" relabel="no"\/>\s*<\/vmshift:source>/);
  // The libosinfo metadata is still there, unchanged.
  assert.match(on, /<libosinfo:os id="http:\/\/debian.org\/debian\/12"\/>/);
});

test('enableShim with a reconnect delay writes <reconnect delay> into each NBD source, and listDisks reads it back', () => {
  const on = enableShim(typical, { ...shimOpts, reconnectDelay: 30 });
  assert.match(on, /<source protocol="nbd" name="disk"><host transport="unix" socket="\/run\/vmshift\/web01-vda.sock"\/><reconnect delay="30"\/><\/source>/);
  assert.equal(listDisks(on)[1]!.source, { kind: 'nbd', export: 'disk', socket: '/run/vmshift/web01-vdb.sock', reconnectDelay: 30 });
  assert.not.match(enableShim(typical, { ...shimOpts, reconnectDelay: 0 }), /<reconnect/, '0 writes no element');
  // disable takes the whole NBD source away, the element with it.
  assert.fixture(disableShim(on), formatDomainXml(typical));
});

test('the vmshift record keeps the reconnect delay: what vmshiftd gives QEMU where libvirt dropped <reconnect>', () => {
  // libvirt 9.0 drops <reconnect> from the NBD source on define: the record is what is left.
  const dropped = (xml: string) => xml.replace(/<reconnect delay="\d+"\/>/g, '');
  const plan = planShims(dropped(enableShim(typical, { ...shimOpts, reconnectDelay: 7 })))!;
  assert.is(plan.reconnectDelay, 7);
  assert.equal(plan.disks.map((d) => d.xmlReconnectDelay), [undefined, undefined]);
  const kept = planShims(enableShim(typical, { ...shimOpts, reconnectDelay: 7 }))!;
  assert.equal(kept.disks.map((d) => d.xmlReconnectDelay), [7, 7]);
  assert.is(planShims(enableShim(typical, { ...shimOpts, reconnectDelay: 0 }))!.reconnectDelay, 0);
  // A record from before the attribute existed: the default.
  assert.is(planShims(enableShim(typical, shimOpts))!.reconnectDelay, 30);
  assert.is(recordedReconnectDelay(enableShim(typical, shimOpts)), undefined);
});

test('disableShim gives back the original document exactly, comments and unknown elements included', () => {
  const back = disableShim(enableShim(typical, shimOpts));
  assert.fixture(back, formatDomainXml(typical));
  for (const kept of ['<!-- managed by ops: do not edit by hand -->', '<!-- data disk, resized 2026-10 -->',
    '<vendor-extension flavour="strawberry" xmlns="urn:example:unknown">kept as is</vendor-extension>',
    '<qemu:arg value="timestamp=on"/>']) {
    assert.ok(back.includes(kept), `lost: ${kept}`);
  }
  // Whitespace is preserved: formatting the fixture only changes quote style.
  assert.fixture(formatDomainXml(typical), typical.replace(/'/g, '"').trimEnd());
});

test('a domain without <metadata> gets one for the record, and loses it again on disable', () => {
  const on = enableShim(minimal, { disks: ['vda'], socketFor: () => '/run/s.sock', exportName: (dev) => `tiny-${dev}` });
  assert.match(on, /<name>tiny<\/name>\n {2}<metadata><vmshift:disks [^>]*created-metadata="yes">/);
  assert.equal(listDisks(on)[0]!.source, { kind: 'nbd', export: 'tiny-vda', socket: '/run/s.sock' });
  assert.fixture(disableShim(on), formatDomainXml(minimal));
});

test('disableShim with newPaths restores the disk at its new location, keeping other source attributes', () => {
  const on = enableShim(typical, shimOpts);
  const back = disableShim(on, { newPaths: { vda: '/mnt/fast/web01.qcow2' } });
  assert.equal(listDisks(back)[0]!.source, { kind: 'file', path: '/mnt/fast/web01.qcow2' });
  assert.equal(listDisks(back)[1]!.source, { kind: 'block', path: '/dev/vg0/web01-data' });
  assert.match(back, /<source file="\/mnt\/fast\/web01.qcow2" index="2"\/>/);
  assert.fixture(back, formatDomainXml(typical).replace('/var/lib/libvirt/images/web01.qcow2', '/mnt/fast/web01.qcow2'));
});

test('mapPaths rewrites live and recorded paths for an incoming migration', () => {
  const mapping = { '/var/lib/libvirt/images/web01.qcow2': '/srv/b/web01.qcow2', '/dev/vg0/web01-data': '/dev/vgB/web01-data' };
  const plain = mapPaths(typical, mapping);
  assert.equal(listDisks(plain).map((d) => d.source), [
    { kind: 'file', path: '/srv/b/web01.qcow2' }, { kind: 'block', path: '/dev/vgB/web01-data' }, null,
    { kind: 'nbd', export: 'scratch', host: '127.0.0.1', port: '10809' },
  ]);
  // With the shim enabled, the paths live in the record: disabling on the destination uses the new ones.
  const moved = mapPaths(enableShim(typical, shimOpts), mapping);
  assert.fixture(disableShim(moved), formatDomainXml(plain));
  assert.fixture(mapPaths(typical, {}), formatDomainXml(typical));
});

test('bad input gives typed errors and changes nothing', () => {
  expectError(() => listDisks(''), 'bad-xml', /empty/);
  expectError(() => listDisks('junk'), 'bad-xml', /text outside the root element/);
  expectError(() => listDisks('<domain><name>x</nam></domain>'), 'bad-xml', /<\/nam> at offset \d+ closes <name>/);
  expectError(() => listDisks('<domain><devices>'), 'bad-xml', /<devices> is never closed/);
  expectError(() => listDisks('<domain/><domain/>'), 'bad-xml', /second root/);
  expectError(() => enableShim('<network><name>default</name></network>', shimOpts), 'no-domain', /expected a <domain> root element, found <network>/);
  expectError(() => enableShim(typical, { ...shimOpts, disks: ['vda', 'vdz'] }), 'disk-not-found', /no disk with target 'vdz' \(disks: vda, vdb, sda, vdc\)/);
  expectError(() => enableShim(typical, { ...shimOpts, disks: ['vdc'] }), 'unsupported-disk', /'vdc' is type 'network'/);
  expectError(() => enableShim(typical, { ...shimOpts, disks: ['sda'] }), 'unsupported-disk', /without a source/);
  expectError(() => enableShim(minimal.replace("<driver name='qemu' type='raw'/>", ''), { ...shimOpts, disks: ['vda'] }), 'unsupported-disk', /format must be explicit/);
  const on = enableShim(typical, shimOpts);
  expectError(() => enableShim(on, shimOpts), 'already-enabled', /already enabled/);
  expectError(() => disableShim(typical), 'not-enabled', /not enabled/);
  expectError(() => disableShim(on, { newPaths: { vdc: '/x' } }), 'disk-not-found', /'vdc', which is not shimmed/);
});

test.run();
