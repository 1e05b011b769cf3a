// Who may make vmshift serve what (issue 10, section 2), each attack replayed against real
// processes: a real vmshiftd, its shims, the libvirt hook called as libvirt calls it, `vmshift
// serve` run by root, and an unprivileged local user (nobody, through setpriv) planting files
// and decoy processes. Each test asserts the attack's effect did not happen (the file not
// served, the victim not changed or deleted, the other domain's shim still running).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { cleanupAll, onCleanup, run, runStatus, startDaemon, tempDir, waitForSocket, type Daemon } from '../helpers/proc.ts';
import { controlCall } from '../../src/control/client.ts';
import { isShimProcess, processAlive, sleep } from '../../src/daemon/processes.ts';
import { enableShim } from '../../src/libvirt/domain-xml.ts';
import { shimName, shimSocket } from '../../src/libvirt/shim-plan.ts';
import { controlSocketFor } from '../../src/shim/shim.ts';
import { LIBVIRT_HOOK, VMSHIFT, VMSHIFTD, vmshiftHost } from '../e2e/libvirt-host.ts';

test.after(cleanupAll);

const NOBODY = ['--reuid=65534', '--regid=65534', '--clear-groups'];
const MiB = 1024 * 1024;
const vm = vmshiftHost('vdt-'); // its dir is the daemon's only datastore
const outside = tempDir('vdo-');
let daemon: Daemon;

const disk = (name: string) => {
  const p = join(vm.dir, name);
  if (!existsSync(p)) writeFileSync(p, Buffer.alloc(MiB));
  return p;
};
const refusal = (params: Record<string, unknown>) => controlCall(vm.api, 'shim.start', params).then(() => null, (e: { code: string; message: string }) => e);

/** Run `vmshift serve` and wait for it to exit (or to serve, which these attacks must not make it do). */
async function serveOutcome(args: string[], socket: string): Promise<{ exited: boolean; code: number | null; output: string; proc: Daemon }> {
  const proc = startDaemon(VMSHIFT, ['serve', ...args, '--socket', socket]);
  const served = waitForSocket(controlSocketFor(socket), proc, 60_000).then(() => true, () => false);
  const r = await Promise.race([proc.exited.then(() => 'exited' as const), served.then((ok) => (ok ? ('served' as const) : ('exited' as const)))]);
  return { exited: r === 'exited', code: proc.proc.exitCode, output: proc.output(), proc };
}

function domainXml(name: string, uuid: string, disks: Array<[string, string]>): string {
  const devs = disks.map(([dev, file]) => `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${file}'/><target dev='${dev}' bus='virtio'/></disk>`).join('\n');
  const xml = `<domain type='qemu'><name>${name}</name><uuid>${uuid}</uuid><devices>${devs}</devices></domain>`;
  return enableShim(xml, { disks: disks.map(([dev]) => dev), socketFor: (dev) => shimSocket(vm.runDir, shimName(name, uuid, dev)), exportName: (dev) => dev });
}

function hook(domain: string, op: string, xml: string, cfgMode = 0o644) {
  const cfg = join(vm.dir, 'hooks.json');
  writeFileSync(cfg, JSON.stringify({ daemonSocket: vm.api, group: null }));
  chmodSync(cfg, cfgMode);
  return runStatus(LIBVIRT_HOOK, [domain, op, op === 'release' ? 'end' : 'begin', '-'], { input: xml, env: { PATH: process.env.PATH, HOME: '/root', LC_ALL: 'C', VMSHIFT_HOOK_CONFIG: cfg } });
}

test('setup: vmshiftd whose only datastore is the test dir', async () => {
  daemon = await vm.start();
});

test('sources outside the datastores are refused: /etc/shadow, a symlink to it, .., an NBD URI, and through the hook', async () => {
  writeFileSync(join(outside, 'outside.raw'), Buffer.alloc(MiB));
  symlinkSync('/etc/shadow', join(vm.dir, 'shadow.raw'));
  for (const [source, why] of [
    ['/etc/shadow', /source \/etc\/shadow is outside the allowed datastores \(.*vdt-.*\): allow its datastore/],
    [join(vm.dir, 'shadow.raw'), /shadow\.raw \(which is \/etc\/shadow\) is outside/],
    [`${vm.dir}/../${basename(outside)}/outside.raw`, /outside\.raw \(which is .*vdo-.*\/outside\.raw\) is outside/],
    ['nbd+unix:///disk?socket=/run/vmshift/other-vda/nbd.sock', /NBD sources are not allowed/],
  ] as const) {
    const r = await refusal({ name: 'evil', source });
    assert.is(r?.code, 'forbidden', source);
    assert.match(r!.message, why);
  }
  // The domain's metadata (for an incoming migration, written on another host) is just a caller.
  const xml = domainXml('evil', '6f1c2b3a-0000-4000-8000-00000000e411', [['vda', '/etc/shadow']]);
  const r = await hook('evil', 'prepare', xml);
  assert.is(r.code, 1);
  assert.match(r.stderr, /refused: source \/etc\/shadow is outside the allowed datastores/);
  assert.equal(vm.shims(), []);
  // The hook's config says which daemon to trust: one anybody may write is refused.
  const ok = domainXml('fine', '6f1c2b3a-0000-4000-8000-00000000f1e0', [['vda', disk('fine.raw')]]);
  const w = await hook('fine', 'prepare', ok, 0o666);
  assert.is(w.code, 1);
  assert.match(w.stderr, /hooks\.json is writable by everyone \(mode 0666\)/);
  assert.equal(vm.shims(), []);
});

test('one disk, one shim: other spellings of the path and a second `vmshift serve` are refused', async () => {
  const d = disk('d.raw');
  symlinkSync(d, join(vm.dir, 'alias.raw'));
  await controlCall(vm.api, 'shim.start', { name: 'one', source: d });
  for (const spelled of [`${vm.dir}//d.raw`, `${vm.dir}/./d.raw`, join(vm.dir, 'alias.raw')]) {
    const r = await refusal({ name: 'two', source: spelled });
    assert.is(r?.code, 'conflict', spelled);
    assert.match(r!.message, /is already served by shim "one": two shims on one disk would corrupt it/);
  }
  // The same disk under the same name is the same shim.
  const again = await controlCall<{ already: boolean }>(vm.api, 'shim.start', { name: 'one', source: `${vm.dir}/./d.raw` });
  assert.ok(again.already);
  // Outside vmshiftd too: the shim holds the disk's lock.
  const second = await serveOutcome([`${vm.dir}//d.raw`], join(vm.dir, 'second.sock'));
  assert.ok(second.exited, `a second serve of the same disk must not serve:\n${second.output}`);
  assert.is.not(second.code, 0);
  assert.match(second.output, /d\.raw is already served by another vmshift shim: two writers on one disk would corrupt it/);
  // QEMU's own locks are other bytes: QEMU still opens the file (detach hands it back to QEMU).
  await run('qemu-img', ['info', '-f', 'raw', d]);
  // A job's destination is served afterwards: it must lie in a datastore too.
  const job = await controlCall(vm.api, 'job.start', { name: 'one', to: join(outside, 'dest.raw') }).then(() => null, (e: { code: string; message: string }) => e);
  assert.is(job?.code, 'forbidden');
  assert.match(job!.message, /destination .*dest\.raw is outside the allowed datastores/);
  assert.not.ok(existsSync(join(outside, 'dest.raw')));
  // Nor may a job move another disk onto the one this shim serves.
  const e = disk('e.raw');
  writeFileSync(e, Buffer.alloc(MiB, 'E'));
  await controlCall(vm.api, 'shim.start', { name: 'three', source: e });
  const onto = await controlCall(vm.api, 'job.start', { name: 'three', to: d }).then(() => null, (err: { code: string; message: string }) => err);
  assert.is(onto?.code, 'in-use');
  assert.match(onto!.message, /d\.raw is (served by another vmshift shim: moving this disk onto it would overwrite that guest's disk|open in )/);
  assert.ok(readFileSync(d).equals(Buffer.alloc(MiB)), 'the served disk is untouched');
  await controlCall(vm.api, 'shim.stop', { name: 'three' });
  await controlCall(vm.api, 'shim.stop', { name: 'one' });
});

test("a domain's failed start or release never stops another domain's shim of the same name", async () => {
  const a = domainXml('web', '6f1c2b3a-0000-4000-8000-0000000000aa', [['vda', disk('a.raw')]]);
  let r = await hook('web', 'prepare', a);
  assert.is(r.code, 0, r.stderr);
  const pid = vm.shims().find((s) => s.name === 'web-vda')!.pid!;
  // Another domain called "web" (say, arriving from another host): its vdb starts, its vda
  // collides with the running guest's shim.
  const b = domainXml('web', '6f1c2b3a-0000-4000-8000-0000000000bb', [['vdb', disk('b2.raw')], ['vda', disk('b.raw')]]);
  r = await hook('web', 'prepare', b);
  assert.is(r.code, 1);
  assert.match(r.stderr, /refused: shim "web-vda" already serves .*a\.raw, not .*b\.raw/);
  assert.ok(await isShimProcess(pid, shimSocket(vm.runDir, 'web-vda')), "the first domain's shim still runs");
  assert.equal(vm.shims().map((s) => s.name), ['web-vda'], 'only what the failed start started was undone');
  r = await hook('web', 'release', b);
  assert.is(r.code, 0);
  assert.match(r.stderr, /warning: shim "web-vda" of .*a\.raw belongs to libvirt:6f1c2b3a-0000-4000-8000-0000000000aa, not libvirt:.*bb: left running/);
  assert.ok(await isShimProcess(pid, shimSocket(vm.runDir, 'web-vda')));
  r = await hook('web', 'release', a);
  assert.is(r.code, 0, r.stderr);
  assert.equal(vm.shims(), []);
});

test('a decoy with a shim-like command line is not adopted: the real shim is restarted', async () => {
  const source = disk('dec.raw');
  const { shim } = await controlCall<{ shim: { pid: number; socket: string } }>(vm.api, 'shim.start', { name: 'dec', source });
  await daemon.stop();
  process.kill(shim.pid, 'SIGKILL');
  for (let i = 0; i < 100 && (await processAlive(shim.pid)); i++) await sleep(50);
  const idle = ['-e', 'setInterval(() => {}, 1000)', 'serve', source, '--socket', shim.socket];
  // One as another user, one as root but not our script: neither is a shim of ours.
  const decoys = [startDaemon('setpriv', [...NOBODY, process.execPath, ...idle], { cwd: '/' }), startDaemon(process.execPath, idle, { cwd: '/' })];
  await sleep(300);
  for (const d of decoys) assert.ok(await processAlive(d.pid));
  daemon = await vm.start();
  let rec;
  for (let i = 0; i < 300; i++) {
    rec = vm.shims().find((s) => s.name === 'dec');
    if (rec?.pid && rec.pid !== shim.pid && (await controlCall(controlSocketFor(rec.socket), 'status', {}, { timeoutMs: 2000 }).then(() => true, () => false))) break;
    await sleep(100);
  }
  const decoyPids = decoys.map((d) => d.pid);
  assert.ok(rec?.pid && !decoyPids.includes(rec.pid), `adopted a decoy: ${rec?.pid} in ${decoyPids}\n${daemon.output()}`);
  const status = await controlCall<{ backing: string }>(controlSocketFor(rec!.socket), 'status', {});
  assert.is(status.backing, source);
  for (const d of decoys) await d.stop('SIGKILL');
  await controlCall(vm.api, 'shim.stop', { name: 'dec' });
});

test("a run dir someone else owns, with a symlink in it, is refused: root never chmods the link's target", async () => {
  const victim = join(outside, 'victim-dir');
  mkdirSync(victim, { mode: 0o755 });
  chmodSync(victim, 0o755);
  const evilRun = join(outside, 'evil-run');
  mkdirSync(evilRun);
  symlinkSync(victim, join(evilRun, 'vmx'));
  chownSync(evilRun, 65534, 65534);
  const api = join(outside, 'api2.sock');
  const d = startDaemon(VMSHIFTD, ['--socket', api, '--state-dir', join(outside, 'state2'), '--run-dir', evilRun, '--config', join(outside, 'none.json'), '--datastore', vm.dir]);
  const up = await waitForSocket(api, d, 60_000).then(() => true, () => false);
  // Had it started, this is what the attacker would ask it for.
  if (up) {
    const r = await controlCall<{ shim: { pid: number; socket: string } }>(api, 'shim.start', { name: 'vmx', source: disk('x.raw') }).catch(() => undefined);
    if (r && (await isShimProcess(r.shim.pid, r.shim.socket))) process.kill(r.shim.pid, 'SIGKILL');
  }
  await d.stop();
  assert.is(statSync(victim).mode & 0o7777, 0o755, 'the symlink target kept its mode');
  assert.not.ok(up, `vmshiftd started on a run dir owned by nobody:\n${d.output()}`);
  assert.match(d.output(), /evil-run is owned by uid 65534, not root: refusing to use it for shim sockets/);
});

const shared = join(outside, 'shared');
const image = join(outside, 'image.raw');
const plant = (path: string, content: unknown) => run('setpriv', [...NOBODY, 'sh', '-c', 'umask 022; cat > "$0"', path], { input: JSON.stringify(content) });

test('a state file planted beside a socket by another user is refused: its backing is not served', async () => {
  chmodSync(outside, 0o755); // nobody may reach the shared dir, not write outside it
  mkdirSync(shared);
  chmodSync(shared, 0o1777);
  const secret = join(outside, 'secret.raw');
  writeFileSync(secret, Buffer.alloc(MiB, 'S'), { mode: 0o600 });
  writeFileSync(image, Buffer.alloc(MiB));

  // A state file naming the secret as where the disk "lives now".
  await plant(join(shared, 'vm.sock.state.json'), { version: 1, origin: image, backing: secret, updatedAt: new Date().toISOString(), history: [] });
  const s = await serveOutcome([image], join(shared, 'vm.sock'));
  assert.ok(s.exited, `served a planted state file:\n${s.output}`);
  assert.match(s.output, /vm\.sock\.state\.json is owned by uid 65534, not root: someone else could change/);
});

test('a migration journal planted by another user deletes nothing', async () => {
  // A migration journal saying the job "created" a file it did not.
  const victim = join(outside, 'victim.raw');
  writeFileSync(victim, 'precious');
  await plant(join(shared, 'vm2.sock.state.json.migrate.json'), { version: 1, dest: victim, created: true, startedAt: new Date().toISOString() });
  const j = await serveOutcome([image], join(shared, 'vm2.sock'));
  assert.not.ok(j.exited, j.output);
  await j.proc.stop();
  assert.is(readFileSync(victim, 'utf8'), 'precious');
  // And what the shim wrote itself is private from creation.
  assert.is(statSync(join(shared, 'vm2.sock.state.json')).mode & 0o777, 0o600);
  assert.is(statSync(join(shared, 'vm2.sock.state.json')).uid, 0);
});

onCleanup(() => daemon?.stop());
test.run();
