// The logic of `vmshift migrate DOMAIN URI` that needs no host: the destination URI as libvirt
// reads it, virsh's job and disk listings, and the shared-storage handover's proof that the
// peer sees the disk's directory (a peer here is a function reading files).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, rejection, tempDir } from '../helpers/proc.ts';
import { DestUriError, parseDestUri } from '../../src/libvirt/dest-uri.ts';
import { parseJobInfo } from '../../src/libvirt/migrate-domain.ts';
import { parseDomainDisks } from '../../src/cli/migrate-domain.ts';
import { UsageError } from '../../src/cli/output.ts';
import { HandoverError, SharedStorageHandover, diskCache, parseDomblklist, type DomainDisk } from '../../src/libvirt/disk-handover.ts';

test.after(cleanupAll);

test('destination URI: qemu+ssh with user, port and libvirt\'s keyfile/known_hosts/socket parameters', () => {
  assert.equal(parseDestUri('qemu+ssh://hostb/system'), { user: 'root', host: 'hostb', port: 22, socket: '/run/libvirt/libvirt-sock', keyfile: undefined, knownHosts: undefined });
  assert.equal(parseDestUri('qemu+ssh://admin@10.0.0.2:2222/system?keyfile=/k&known_hosts=/kh&socket=/s/sock'), { user: 'admin', host: '10.0.0.2', port: 2222, socket: '/s/sock', keyfile: '/k', knownHosts: '/kh' });
  for (const [uri, msg] of [
    ['qemu:///system', /expected qemu\+ssh:\/\//],
    ['qemu+tcp://hostb/system', /expected qemu\+ssh/],
    ['qemu+ssh://hostb/session', /only the system instance/],
    ['qemu+ssh://hostb:70000/system', /out of range/],
    ['qemu+ssh://hostb/system?no_verify=1', /always verifies the peer's host key/],
    ['qemu+ssh://hostb/system?evil=1', /unknown parameter "evil"/],
  ] as const) {
    assert.throws(() => parseDestUri(uri), (e: Error) => e instanceof DestUriError && msg.test(e.message), uri);
  }
});

test('virsh domjobinfo: an active job, a completed one with its downtime, none', () => {
  const active = parseJobInfo('Job type:         Unbounded   \nOperation:        Outgoing migration\nTime elapsed:     1200         ms\nData processed:   91.978 MiB\nData remaining:   12.500 MiB\nData total:       256.508 MiB\n');
  assert.equal(active, { type: 'Unbounded', operation: 'Outgoing migration', processed: Math.round(91.978 * 2 ** 20), remaining: Math.round(12.5 * 2 ** 20), total: Math.round(256.508 * 2 ** 20), downtimeMs: null });
  assert.is(parseJobInfo('Job type:         Completed\nTotal downtime:   146          ms\n').downtimeMs, 146);
  assert.is(parseJobInfo('Job type:         None        \n').type, 'None');
});

const XML = `<domain><devices>
  <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/x/a.raw'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw' cache='writeback'/><source file='/x/b.raw'/><target dev='vdb' bus='virtio'/></disk>
</devices></domain>`;

test('domblklist --details and each disk\'s cache mode', () => {
  const text = ' Type   Device   Target   Source\n------------------------------------\n file   disk     vda      /x/a b.raw\n file   cdrom    sda      -\n';
  assert.equal(parseDomblklist(text), [{ type: 'file', device: 'disk', target: 'vda', source: '/x/a b.raw' }, { type: 'file', device: 'cdrom', target: 'sda', source: '-' }]);
  assert.is(diskCache(XML, 'vda'), 'none');
  assert.is(diskCache(XML, 'vdb'), 'writeback');
  assert.is(diskCache(XML, 'vdc'), null);
});

function handover(disks: DomainDisk[], xml: string) {
  return new SharedStorageHandover('vm1', disks, xml, 'root@hostb:22');
}
const oneDisk = (dir: string): DomainDisk[] => [{ type: 'file', device: 'disk', target: 'vda', source: join(dir, 'a.raw') }];
const xmlFor = (dir: string, cache = 'none') => `<domain><devices><disk type='file' device='disk'><driver name='qemu' type='raw' cache='${cache}'/><source file='${join(dir, 'a.raw')}'/><target dev='vda'/></disk></devices></domain>`;

test('--disk DEV=PATH with a DOMAIN: absolute paths per target; anything else is a usage error', () => {
  assert.equal(parseDomainDisks(['vda=/srv/b/web.raw', 'vdb=/srv/b/data.raw']), { vda: '/srv/b/web.raw', vdb: '/srv/b/data.raw' });
  assert.equal(parseDomainDisks(undefined), {});
  for (const [spec, msg] of [['/run/vmshift/x/nbd.sock', /expected DEV=\/PATH/], ['vda=rel.raw', /expected DEV=\/PATH/], ['vd a=/x', /expected DEV=/]] as const) {
    assert.throws(() => parseDomainDisks([spec]), (e: Error) => e instanceof UsageError && msg.test(e.message));
  }
  assert.throws(() => parseDomainDisks(['vda=/a', 'vda=/b']), /--disk vda: given twice/);
});

test('shared storage: a peer that reads back the probe token proves it; --unsafe then; no probe file is left', async () => {
  const dir = tempDir('vlm-');
  const h = handover(oneDisk(dir), xmlFor(dir));
  let asked: string[] = [];
  await h.prepare({ readFiles: async (paths) => { asked = paths; return paths.map((p) => readFileSync(p, 'utf8')); } });
  assert.is(asked.length, 1);
  assert.ok(asked[0]!.startsWith(join(dir, '.vmshift-probe-')));
  assert.equal(h.virshFlags(), ['--unsafe']);
  assert.equal(readdirSync(dir), []);
});

test('shared storage refused: a peer that does not see the file, a cached disk, a block disk, a vmshift-enabled domain', async () => {
  const dir = tempDir('vlm-');
  const blind = { readFiles: async (paths: string[]) => paths.map(() => null) };
  const e1 = await rejection(handover(oneDisk(dir), xmlFor(dir)).prepare(blind)) as Error;
  assert.ok(e1 instanceof HandoverError);
  assert.match(e1.message, /root@hostb:22 does not see .* \(disk vda: .*a\.raw\) as this host does/);
  assert.equal(readdirSync(dir), [], 'probe file left behind');
  // A peer that sees another file at that path (another host's local directory) is refused too.
  const other = { readFiles: async (paths: string[]) => paths.map(() => 'vmshift-probe 0000\n') };
  assert.match(((await rejection(handover(oneDisk(dir), xmlFor(dir)).prepare(other))) as Error).message, /does not see/);
  const seeing = { readFiles: async (paths: string[]) => paths.map((p) => (existsSync(p) ? readFileSync(p, 'utf8') : null)) };
  assert.match(((await rejection(handover(oneDisk(dir), xmlFor(dir, 'writeback')).prepare(seeing))) as Error).message, /uses cache='writeback': a disk shared between hosts must use cache='none'/);
  const block: DomainDisk[] = [{ type: 'block', device: 'disk', target: 'vda', source: '/dev/sdz' }];
  assert.match(((await rejection(handover(block, xmlFor(dir)).prepare(seeing))) as Error).message, /block device \/dev\/sdz/);
  const enabled = xmlFor(dir).replace('<devices>', "<metadata><vmshift:disks xmlns:vmshift='https://vmshift.dev/xmlns/1'/></metadata><devices>");
  assert.match(((await rejection(handover(oneDisk(dir), enabled).prepare(seeing))) as Error).message, /enabled with vmshift/);
});

test.run();
