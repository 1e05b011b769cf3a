// giveReconnectDelay against a small model of QEMU's block graph (the real QEMU under libvirt
// is test/e2e/libvirt.test.ts): the node ends up with libvirt's own name and the delay, no
// temporary node is left, and a failure at any step leaves the disk reading through a node of
// libvirt's name, with the error passed on. The model refuses what QEMU 7.2 refuses: a
// duplicate node name, deleting a node in use, changing an option of an open nbd node.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { giveReconnectDelay } from '../../src/qemu/nbd-reconnect-live.ts';
import { QmpError, type QmpTransport } from '../../src/qemu/transport.ts';

const SOCK = '/run/vmshift/web01-vda/nbd.sock';

class FakeQemu implements QmpTransport {
  nodes = new Map<string, Record<string, unknown>>([['libvirt-1-storage', { driver: 'nbd', server: { type: 'unix', path: SOCK }, export: 'vda' }]]);
  file = 'libvirt-1-storage';
  calls: string[] = [];
  constructor(private readonly failAt = -1) {}

  async execute<T>(command: string, args: Record<string, unknown> = {}): Promise<T> {
    const mutating = ['blockdev-add', 'blockdev-reopen', 'blockdev-del'].includes(command);
    if (mutating) {
      this.calls.push(command);
      if (this.calls.length - 1 === this.failAt) throw new QmpError(command, 'GenericError', 'injected', 'fake');
    }
    const nodeInfo = (name: string) => ({ 'node-name': name, drv: 'nbd', file: `nbd+unix:///vda?socket=${SOCK}`, ro: false, cache: { direct: true, 'no-flush': false, writeback: true } });
    switch (command) {
      case 'query-block':
        return [{ device: '', qdev: '/machine/peripheral/virtio-disk0/virtio-backend', inserted: { 'node-name': 'libvirt-1-format', drv: 'raw', file: 'x', ro: false } }] as T;
      case 'query-named-block-nodes':
        return [{ 'node-name': 'libvirt-1-format', drv: 'raw', file: 'x', ro: false, cache: { direct: true, 'no-flush': false } }, ...[...this.nodes.keys()].map(nodeInfo)] as T;
      case 'x-debug-query-block-graph': {
        const names = ['libvirt-1-format', ...this.nodes.keys()];
        return { nodes: names.map((name, id) => ({ id, name, type: 'block-driver' })), edges: [{ parent: 0, child: names.indexOf(this.file), name: 'file' }] } as T;
      }
      case 'blockdev-add': {
        const name = args['node-name'] as string;
        if (this.nodes.has(name)) throw new QmpError(command, 'GenericError', `Duplicate nodes with node-name='${name}'`, 'fake');
        this.nodes.set(name, args);
        return {} as T;
      }
      case 'blockdev-reopen': {
        const opts = (args.options as Array<Record<string, unknown>>)[0]!;
        if (opts['node-name'] !== 'libvirt-1-format') throw new QmpError(command, 'GenericError', "Cannot change the option 'reconnect-delay'", 'fake');
        if (!this.nodes.has(opts.file as string)) throw new QmpError(command, 'GenericError', `Cannot find node ${String(opts.file)}`, 'fake');
        this.file = opts.file as string;
        return {} as T;
      }
      case 'blockdev-del': {
        const name = args['node-name'] as string;
        if (name === this.file) throw new QmpError(command, 'GenericError', `Node ${name} is in use`, 'fake');
        if (!this.nodes.delete(name)) throw new QmpError(command, 'GenericError', `Failed to find node with node-name='${name}'`, 'fake');
        return {} as T;
      }
    }
    throw new Error(`unexpected ${command}`);
  }

  async close(): Promise<void> {}
}

test('the nbd node gets the delay and keeps libvirt\'s name; the temporary node is gone', async () => {
  const q = new FakeQemu();
  const r = await giveReconnectDelay(q, SOCK, 'vda', 30);
  assert.equal({ node: r.node, formatNode: r.formatNode, delayS: r.delayS }, { node: 'libvirt-1-storage', formatNode: 'libvirt-1-format', delayS: 30 });
  assert.is(q.file, 'libvirt-1-storage');
  assert.equal([...q.nodes.keys()], ['libvirt-1-storage']);
  const node = q.nodes.get('libvirt-1-storage')!;
  assert.equal(node, {
    driver: 'nbd', 'node-name': 'libvirt-1-storage', server: { type: 'unix', path: SOCK }, export: 'vda', 'reconnect-delay': 30,
    'read-only': false, discard: 'unmap', cache: { direct: true, 'no-flush': false },
  });
  assert.equal(q.calls, ['blockdev-add', 'blockdev-reopen', 'blockdev-del', 'blockdev-add', 'blockdev-reopen', 'blockdev-del']);
});

test('a failure at any step is undone: the disk reads through a node of libvirt\'s name, no temporary node, the error passed on', async () => {
  for (let step = 0; step < 5; step++) {
    const q = new FakeQemu(step);
    const err = await giveReconnectDelay(q, SOCK, 'vda', 30).catch((e: Error) => e);
    assert.instance(err, QmpError, `step ${step}`);
    assert.match((err as Error).message, /injected/);
    assert.is(q.file, 'libvirt-1-storage', `step ${step}`);
    assert.equal([...q.nodes.keys()], ['libvirt-1-storage'], `step ${step}`);
  }
  // The last deletion failing leaves only an idle node behind: the change stands.
  const q = new FakeQemu(5);
  await giveReconnectDelay(q, SOCK, 'vda', 30);
  assert.is(q.file, 'libvirt-1-storage');
  assert.is(q.nodes.get('libvirt-1-storage')!['reconnect-delay'], 30);
});

test('a disk the guest does not have on this socket is refused before anything changes', async () => {
  const q = new FakeQemu();
  const err = await giveReconnectDelay(q, '/run/vmshift/other/nbd.sock', 'vda', 30).catch((e: Error) => e);
  assert.match(String(err), /no disk of the guest reads export 'vda' on \/run\/vmshift\/other\/nbd\.sock/);
  assert.equal(q.calls, []);
});

test.run();
