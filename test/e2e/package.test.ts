// The Debian package (`npm run package`, scripts/build-deb.sh) installed with dpkg as on a
// host, inside a private mount namespace whose /usr, /etc, /var and /run are overlays on the
// machine's own (upper layers in this test's temp dir): dpkg, its database, the maintainer
// scripts, vmshiftd, its shims and the guest's QEMU all run in there, and the machine's real
// / is never written (other helpers run tests in parallel; nothing is left when the
// namespace's last process exits). A chroot would need a whole Debian tree; this takes none.
//   install: owners and modes of every file, conffiles, the libvirt hook in qemu.d/, the
//     state dir; `systemd-analyze verify` of the unit; vmshiftd run exactly as its ExecStart
//   a guest writing on a live-attached shim; a newer build installed over the running one:
//     the maintainer script restarts the shim (a stall), the daemon is restarted as systemd
//     would; the operator's conffile is kept; no I/O error, every acknowledged record on disk
//   dpkg -r: the guest keeps its disk and the script says which shim it left running.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cleanupAll, onCleanup, run, runStatus, startDaemon, tempDir, type Daemon } from '../helpers/proc.ts';
import { bootGuest, ensureGuest, verifyWriterLog, type Guest } from '../helpers/guest.ts';
import { sleep } from '../../src/daemon/processes.ts';
import type { ShimRecord } from '../../src/daemon/registry.ts';

test.after(cleanupAll);

const root = new URL('../..', import.meta.url).pathname;
const dir = tempDir('vpk-');
const SLOTS = 64;
const SHIM = 'pk-vd0';
const ds = join(dir, 'ds'), disk = join(ds, 'disk.raw'), qmp = join(dir, 'qmp.sock');
let holder: Daemon, daemon: Daemon, guest: Guest;
const debs: string[] = [];

/** argv that runs a command inside the test's mount namespace (nsenter execs it: same PID). */
const inNs = (cmd: string, ...args: string[]) => ['nsenter', '-t', String(holder.pid), '-m', '--', cmd, ...args];
const ns = (cmd: string, ...args: string[]) => {
  const [c, ...a] = inNs(cmd, ...args);
  return runStatus(c!, a);
};
/** A file of the namespace's /var, read through the overlay's upper layer. */
const upperVar = (path: string) => join(dir, 'var-up', path.replace(/^\/var\//, ''));

function shims(): ShimRecord[] {
  const f = upperVar('/var/lib/vmshift/vmshiftd.json');
  return existsSync(f) ? JSON.parse(readFileSync(f, 'utf8')).shims : [];
}
/** A live `vmshift serve` of the installed package on this socket (isShimProcess knows only this checkout's). */
function installedShim(pid: number, socket: string): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    const at = argv.indexOf('serve');
    return at > 0 && argv[at - 1] === '/usr/lib/vmshift/bin/../dist/vmshift.mjs' && argv[argv.indexOf('--socket') + 1] === socket;
  } catch {
    return false;
  }
}
// Shims outlive the daemon (and dpkg -r): kill every PID the registry named, at cleanup.
const seen = new Map<number, string>();
const remember = () => { for (const r of shims()) if (r.pid) seen.set(r.pid, r.socket); };
onCleanup(() => {
  remember();
  for (const [pid, socket] of seen) if (installedShim(pid, socket)) process.kill(pid, 'SIGKILL');
});

async function startVmshiftd(): Promise<Daemon> {
  // Exactly what the installed unit runs.
  const unit = (await ns('cat', '/lib/systemd/system/vmshiftd.service')).stdout;
  const exec = /^ExecStart=(.+)$/m.exec(unit)![1]!.trim().split(/\s+/);
  const [c, ...a] = inNs(exec[0]!, ...exec.slice(1));
  const d = startDaemon(c!, a);
  for (let i = 0; (await ns('vmshift', 'list')).code !== 0; i++) {
    if (i > 300) throw new Error(`vmshiftd did not answer:\n${d.output()}`);
    await sleep(100);
  }
  return d;
}

async function writesMore(n: number, timeoutMs = 60_000): Promise<number> {
  const target = guest.lastSeq() + n;
  await guest.waitFor(new RegExp(`^VMSHIFT-SEQ ${target}$`), timeoutMs);
  return target;
}

test('build: two versions of the package, in seconds, from this checkout alone', async () => {
  for (const v of ['0.1.0+t1', '0.1.0+t2']) {
    const t0 = Date.now();
    const r = await run('bash', [join(root, 'scripts/build-deb.sh'), join(dir, 'out')], { env: { ...process.env, VMSHIFT_PKG_VERSION: v } });
    debs.push(r.stdout.trim().split('\n').pop()!);
    console.log(`  built ${debs.at(-1)} in ${Date.now() - t0} ms`);
  }
  const info = (await run('dpkg-deb', ['-f', debs[0]!, 'Package', 'Version', 'Depends'])).stdout;
  assert.match(info, /^Package: vmshift\nVersion: 0\.1\.0\+t1\nDepends: nodejs \(>= 20\.19\)\n$/);
});

test('install with dpkg: owners and modes, conffiles, the libvirt hook in qemu.d/, the state dir; the unit verifies', async () => {
  await ensureGuest();
  const mounts = ['usr', 'etc', 'var', 'run'].map((d) => {
    for (const s of ['up', 'work']) mkdirSync(join(dir, `${d}-${s}`));
    return `mount -t overlay vmshift-pkgtest -o lowerdir=/${d},upperdir=${dir}/${d}-up,workdir=${dir}/${d}-work /${d}`;
  });
  holder = startDaemon('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', `set -e; ${mounts.join('; ')}; echo ready; exec sleep 3600`]);
  for (let i = 0; !holder.output().includes('ready'); i++) {
    assert.ok(i < 100 && holder.proc.exitCode === null, `namespace not ready: ${holder.output()}`);
    await sleep(50);
  }
  const r = await ns('dpkg', '-i', debs[0]!);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /vmshift: installed the libvirt hook as \/etc\/libvirt\/hooks\/qemu\.d\/vmshift; libvirt reads hooks when it starts/);
  assert.match(r.stdout, /vmshift: systemd is not running here: start vmshiftd yourself/);
  assert.not.ok(existsSync('/usr/lib/vmshift'), 'the real /usr is untouched');

  const list = (await ns('find', '/usr/lib/vmshift', '/usr/bin/vmshift', '/usr/bin/vmshiftd', '/lib/systemd/system/vmshiftd.service', '/etc/vmshift', '/usr/share/doc/vmshift', '/var/lib/vmshift', '/etc/libvirt/hooks/qemu.d/vmshift', '-printf', '%u:%g %m %y %p -> %l\n')).stdout.trim().split('\n');
  assert.ok(list.length > 300, `${list.length} entries`);
  const entry = (p: string) => list.find((l) => l.split(' ')[3] === p) ?? `(no ${p})`;
  for (const l of list) {
    assert.ok(l.startsWith('root:root '), l);
    const [, mode, type] = l.split(' ');
    if (type === 'd') assert.ok(mode === '755' || l.includes(' /var/lib/vmshift '), l);
    else if (type === 'f') assert.ok(mode === '644' || mode === '755', l);
  }
  assert.match(entry('/var/lib/vmshift'), /^root:root 700 d /);
  for (const p of ['/usr/lib/vmshift/bin/vmshift', '/usr/lib/vmshift/bin/vmshiftd', '/usr/lib/vmshift/hooks/libvirt-qemu', '/usr/lib/vmshift/hooks/proxmox-hookscript', '/usr/lib/vmshift/hooks/vdsm/before_vm_start']) {
    assert.match(entry(p), /^root:root 755 f /);
  }
  for (const p of ['/etc/vmshift/vmshiftd.json', '/etc/vmshift/hooks.json', '/lib/systemd/system/vmshiftd.service', '/usr/lib/vmshift/native/build/vmshift_native.node', '/usr/lib/vmshift/dist/vmshift.mjs']) {
    assert.match(entry(p), /^root:root 644 f /);
  }
  assert.match(entry('/usr/bin/vmshift'), / l \/usr\/bin\/vmshift -> \.\.\/lib\/vmshift\/bin\/vmshift$/);
  assert.match(entry('/etc/libvirt/hooks/qemu.d/vmshift'), / l \S+ -> \/usr\/lib\/vmshift\/hooks\/libvirt-qemu$/);
  assert.equal((await ns('dpkg-query', '-W', '-f=${Conffiles}', 'vmshift')).stdout.trim().split('\n').map((l) => l.trim().split(' ')[0]), ['/etc/vmshift/vmshiftd.json', '/etc/vmshift/hooks.json']);
  // No tsx and no sources: the bundle runs on the modules shipped with it.
  assert.not.ok(list.some((l) => /\/node_modules\/(tsx|esbuild)\//.test(l) || l.includes('/usr/lib/vmshift/src/')));
  const v = await ns('systemd-analyze', 'verify', '/lib/systemd/system/vmshiftd.service');
  assert.is(v.code, 0, v.stdout + v.stderr);
  assert.is(v.stdout + v.stderr, '');
});

test('vmshiftd as the unit runs it; a guest writing on a live-attached shim', async () => {
  // The operator's datastore, in the conffile (an upgrade must keep it).
  mkdirSync(ds);
  writeFileSync(disk, Buffer.alloc(16 * 1024 * 1024));
  const conf = `{ "datastores": ["${ds}"] }\n`;
  assert.is((await ns('sh', '-c', `printf '%s' '${conf}' > /etc/vmshift/vmshiftd.json`)).code, 0);
  daemon = await startVmshiftd();
  guest = bootGuest({ mode: 'writer', params: { blocks: SLOTS }, disk: { file: disk }, qmpSocket: qmp, wrap: ['nsenter', '-t', String(holder.pid), '-m', '--'] });
  await guest.waitFor(/^VMSHIFT-SEQ 20$/, 120_000);
  const a = await ns('vmshift', 'attach', 'pk', '--qmp', qmp, '--json');
  assert.is(a.code, 0, a.stderr);
  assert.is(JSON.parse(a.stdout).disks[0].status, 'attached', a.stdout);
  remember();
  await writesMore(20);
});

let oldPid = 0;
test('a newer build installed under the writing guest: the shim is restarted as a stall, no I/O error, conffile kept', async () => {
  oldPid = shims().find((s) => s.name === SHIM)!.pid!;
  const r = await ns('dpkg', '-i', debs[1]!);
  assert.is(r.code, 0, r.stdout + r.stderr);
  remember();
  assert.match(r.stdout, new RegExp(`shim ${SHIM} restarted: pid ${oldPid} stopped cleanly in \\d+ ms, pid \\d+ serving after \\d+ ms; the guest's I/O stalled \\d+ ms \\(1 client reconnected\\)`));
  assert.match(r.stdout, /restart vmshiftd the way you started it/);
  console.log(`  upgrade: ${/shim \S+ restarted: .*/.exec(r.stdout)?.[0]}`);
  const now = shims().find((s) => s.name === SHIM)!;
  assert.is.not(now.pid, oldPid);
  assert.match((await ns('dpkg-query', '-W', '-f=${Version}', 'vmshift')).stdout, /^0\.1\.0\+t2$/);
  assert.is((await ns('cat', '/etc/vmshift/vmshiftd.json')).stdout, `{ "datastores": ["${ds}"] }\n`);
  await writesMore(20);
  // As systemd's `restart` in the postinst would: the daemon goes, its shims stay, the new one adopts them.
  await daemon.stop();
  daemon = await startVmshiftd();
  assert.is(shims().find((s) => s.name === SHIM)!.pid, now.pid);
  await writesMore(20);
});

test('dpkg -r leaves the running guest on its shim and says so; every acknowledged record is on disk', async () => {
  const pid = shims().find((s) => s.name === SHIM)!.pid!;
  const r = await ns('dpkg', '-r', 'vmshift');
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, new RegExp(`vmshift: left running, serving their guests' disks: ${SHIM} \\(pid ${pid}, ${disk}\\)\\.`));
  assert.is((await ns('test', '-e', '/usr/lib/vmshift')).code, 1);
  assert.is((await ns('test', '-L', '/etc/libvirt/hooks/qemu.d/vmshift')).code, 1, 'the hook link is gone');
  const acked = await writesMore(20);
  assert.ok(installedShim(pid, shims().find((s) => s.name === SHIM)!.socket), 'the shim still serves');
  assert.equal(verifyWriterLog(disk, acked, SLOTS), []);
  await guest.stop();
});

test.run();
