// The virsh wrapper and VirshMonitor: argument vectors (with a recording ExecFn), error
// mapping from virsh's stderr, and the real virsh against libvirt's built-in test driver
// (test:///default runs inside virsh itself: no daemon, nothing persists).
import { test } from 'uvu';
import { existsSync } from 'node:fs';
import * as assert from 'uvu/assert';
import { Virsh, VirshError, type ExecFn } from '../../src/libvirt/virsh.ts';
import { VirshMonitor } from '../../src/qemu/virsh-monitor.ts';
import { QmpConnectionError, QmpError } from '../../src/qemu/transport.ts';

function recorder(answer: (args: string[]) => string | Error) {
  const calls: Array<{ file: string; args: string[]; input?: string; timeoutMs: number }> = [];
  const exec: ExecFn = async (file, args, opts) => {
    calls.push({ file, args, input: opts.input, timeoutMs: opts.timeoutMs });
    const a = answer(args);
    if (a instanceof Error) throw a;
    return { stdout: a, stderr: '' };
  };
  return { calls, exec };
}

test('commands build argument vectors with -c URI and --domain (no shell, no option injection)', async () => {
  const { calls, exec } = recorder(() => 'running\n');
  const v = new Virsh({ uri: 'qemu:///system', exec, timeoutMs: 1234 });
  await v.dumpxml('-evil name', { inactive: true });
  await v.domstate('g1');
  await v.start('g1');
  await v.destroy('g1');
  await v.define('<domain/>');
  await v.qemuMonitorCommand('g1', '{"execute":"query-status"}');
  assert.equal(calls.map((c) => c.args), [
    ['-c', 'qemu:///system', 'dumpxml', '--inactive', '--domain', '-evil name'],
    ['-c', 'qemu:///system', 'domstate', '--domain', 'g1'],
    ['-c', 'qemu:///system', 'start', '--domain', 'g1'],
    ['-c', 'qemu:///system', 'destroy', '--domain', 'g1'],
    ['-c', 'qemu:///system', 'define', '--file', calls[4]!.args[4]!],
    ['-c', 'qemu:///system', 'qemu-monitor-command', '--domain', 'g1', '--pretty', '--cmd', '{"execute":"query-status"}'],
  ]);
  assert.ok(calls.every((c) => c.file === 'virsh' && c.timeoutMs === 1234));
  assert.match(calls[4]!.args[4]!, /vmshift-define-.*\/domain\.xml$/);
  assert.not.ok(existsSync(calls[4]!.args[4]!), 'the temp file is removed after define');
});

test('list parses names and domstate trims', async () => {
  const { calls, exec } = recorder((args) => (args.includes('list') ? 'a\nb c\n\n' : 'shut off\n'));
  const v = new Virsh({ uri: 'test:///default', exec });
  assert.equal(await v.list({ all: true }), ['a', 'b c']);
  assert.equal(calls[0]!.args, ['-c', 'test:///default', 'list', '--name', '--all']);
  assert.is(await v.domstate('a'), 'shut off');
});

test('failures become VirshError with the stderr and a kind; timeouts say so', async () => {
  const fail = (stderr: string, extra: object = {}) => Object.assign(new Error('Command failed'), { code: 1, stderr, stdout: '', ...extra });
  const v1 = new Virsh({ exec: recorder(() => fail("error: failed to get domain 'x'\n")).exec });
  const e1 = await v1.domstate('x').then(() => null, (e) => e);
  assert.instance(e1, VirshError);
  assert.is(e1.kind, 'no-domain');
  assert.is(e1.stderr, "error: failed to get domain 'x'");
  assert.match(e1.message, /virsh domstate \(qemu:\/\/\/system\) failed \(exit 1\): error: failed to get domain 'x'/);
  const v2 = new Virsh({ exec: recorder(() => fail('error: Failed to connect socket')).exec });
  assert.is((await v2.list().then(() => null, (e) => e)).kind, 'other');
  const v3 = new Virsh({ exec: recorder(() => fail('', { killed: true, code: null, signal: 'SIGTERM' })).exec, timeoutMs: 50 });
  assert.match((await v3.start('g').then(() => null, (e) => e)).message, /virsh start .* timed out after 50 ms/);
});

test('VirshMonitor sends QMP JSON and decodes return values and errors', async () => {
  const replies: Record<string, string> = {
    'human-monitor-command': '{\n  "return": "",\n  "id": "libvirt-7"\n}\n',
    'query-block': '{"return": [{"device": "drive0"}], "id": "libvirt-8"}',
    'bad': '{"error": {"class": "CommandNotFound", "desc": "The command bad has not been found"}, "id": "libvirt-9"}',
    'garbage': 'error: something\n',
  };
  const { calls, exec } = recorder((args) => replies[JSON.parse(args.at(-1)!).execute]!);
  const mon = new VirshMonitor('g1', new Virsh({ exec }));
  assert.is(await mon.execute('human-monitor-command', { 'command-line': 'info status' }), '');
  assert.equal(calls[0]!.args.at(-1), '{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}');
  assert.equal(await mon.execute('query-block'), [{ device: 'drive0' }]);
  const err = await mon.execute('bad').then(() => null, (e) => e);
  assert.instance(err, QmpError);
  assert.is(err.errorClass, 'CommandNotFound');
  assert.is(err.command, 'bad');
  const g = await mon.execute('garbage').then(() => null, (e) => e);
  assert.instance(g, QmpConnectionError);
  assert.is(g.kind, 'protocol');
});

test('real virsh on the test driver: list, domstate, dumpxml, define, and a missing domain', async () => {
  const v = new Virsh({ uri: 'test:///default' });
  assert.ok((await v.list({ all: true })).includes('test'));
  assert.is(await v.domstate('test'), 'running');
  const xml = await v.dumpxml('test');
  assert.match(xml, /<name>test<\/name>/);
  // The test driver forgets it when this virsh process exits.
  await v.define(xml.replace('<name>test</name>', '<name>vmshift-t2</name>').replace(/<uuid>.*<\/uuid>/, ''));
  const err = await v.domstate('no-such-domain').then(() => null, (e) => e);
  assert.instance(err, VirshError);
  assert.is(err.kind, 'no-domain');
  assert.match(err.stderr, /no-such-domain/);
});

test.run();
