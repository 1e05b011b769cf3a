// Two libvirt hosts on this machine for host-to-host migration tests. Each host is a network
// namespace (test/helpers/hosts.ts: unique names, a veth /30, NO default route) plus a mount
// and UTS namespace of its own in which libvirtd, virtlogd and sshd run: private bind mounts
// over /run, /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, its own
// host_uuid and hostname. So the same path (/run/libvirt/libvirt-sock, /run/vmshift/...) is a
// different file on each host, as on two machines, and qemu+ssh to a host's sshd reaches that
// host's libvirt. What is not bind-mounted (the test's temp dirs, the worktree) both hosts see
// at the same path: the "shared storage". Every process is killed by PID at cleanup, also when
// a test fails; nothing of the machine's own libvirt, /run or /etc is touched.
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { onCleanup, run, runStatus, startDaemon, tempDir, waitForSocket, type Daemon } from './proc.ts';
import { startSshd, twoHosts, type Host, type Sshd } from './hosts.ts';
import { Virsh } from '../../src/libvirt/virsh.ts';
import { isShimProcess } from '../../src/daemon/processes.ts';
import type { ShimRecord } from '../../src/daemon/registry.ts';

const root = new URL('../..', import.meta.url).pathname;
export const VMSHIFT = join(root, 'bin/vmshift');
const VMSHIFTD = join(root, 'bin/vmshiftd');
const LIBVIRT_HOOK = join(root, 'hooks/libvirt-qemu');

export interface LibvirtTestHost extends Host {
  name: 'a' | 'b';
  /** The host's private tree (DIR/run is its /run, DIR/log its /var/log/libvirt ...). */
  dir: string;
  /** libvirtd's PID: the process whose namespaces are the host's. */
  pid: number;
  daemon: Daemon;
  /** libvirt from the test process (a unix socket path: no network involved). */
  virsh: Virsh;
  sshd: Sshd;
  /** argv that runs `cmd args` inside the host (network, mount and UTS namespaces). */
  argv(cmd: string, args: string[]): [string, string[]];
  run(cmd: string, args: string[]): Promise<{ stdout: string; stderr: string; code: number }>;
  /** The vmshift hook's calls on this host, `DOMAIN OP SUBOP` each, in order. */
  hookCalls(): string[];
  /** `qemu+ssh://root@ADDR:PORT/system?keyfile=...&known_hosts=...` for migrations to this host. */
  sshUri: string;
}

export interface LibvirtHosts {
  a: LibvirtTestHost;
  b: LibvirtTestHost;
  /** A directory both hosts see at the same path (disks, consoles). */
  shared: string;
}

function inode(path: string): string {
  const s = statSync(path);
  return `${s.dev}:${s.ino}`;
}

/**
 * Refuse to run anything unless `pid` is inside the test's network namespace `ns`: the root
 * namespace routes off the machine, and a client started there could reach it.
 */
function checkInside(host: Host, pid: number): void {
  if (!/^vs[ab][0-9a-f]{6}$/.test(host.ns)) throw new Error(`libvirt-hosts: ${host.ns} is not a test namespace; refusing`);
  if (inode(`/proc/${pid}/ns/net`) !== inode(`/run/netns/${host.ns}`)) throw new Error(`libvirt-hosts: process ${pid} is not in namespace ${host.ns}; refusing to start a client there (the root namespace routes off the machine)`);
}

async function startHost(name: 'a' | 'b', host: Host): Promise<Omit<LibvirtTestHost, 'sshd' | 'sshUri'>> {
  const dir = tempDir(`vlh${name}-`);
  const mounts: Record<string, string> = { run: '/run', etc: '/etc/libvirt', lib: '/var/lib/libvirt', cache: '/var/cache/libvirt', log: '/var/log/libvirt' };
  for (const d of Object.keys(mounts)) mkdirSync(join(dir, d), { recursive: true });
  for (const d of ['run/libvirt', 'run/sshd', 'etc/hooks', 'etc/qemu', 'log/qemu']) mkdirSync(join(dir, d), { recursive: true });
  writeFileSync(join(dir, 'etc/qemu.conf'), 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n');
  writeFileSync(join(dir, 'etc/libvirtd.conf'), `unix_sock_group = "root"\nhost_uuid = "${randomUUID()}"\n`);
  // vmshift's hook behind a wrapper that logs each call (libvirt gives hooks no environment).
  const hook = join(dir, 'etc/hooks/qemu');
  writeFileSync(hook, `#!/bin/sh\necho "$1 $2 $3" >> ${dir}/hook-calls\nexport VMSHIFT_HOOK_CONFIG=${dir}/hooks.json\nexec ${LIBVIRT_HOOK} "$@"\n`);
  chmodSync(hook, 0o755);
  const script = join(dir, 'start.sh');
  writeFileSync(script, [
    'set -e',
    'mount --make-rprivate /',
    ...Object.entries(mounts).map(([d, m]) => `mount --bind ${join(dir, d)} ${m}`),
    `hostname vmshift-test-${name}`,
    'virtlogd -d',
    'exec libvirtd',
    '',
  ].join('\n'));
  // ip netns exec -> unshare -> sh -> libvirtd, each an exec: the PID held is libvirtd's.
  const daemon = startDaemon('ip', ['netns', 'exec', host.ns, 'unshare', '--mount', '--uts', 'sh', script]);
  onCleanup(() => {
    // libvirtd leaves guests and virtlogd running when it stops: kill them by recorded PID.
    const pidFiles = [join(dir, 'run/virtlogd.pid')];
    const qemuRun = join(dir, 'run/libvirt/qemu');
    if (existsSync(qemuRun)) for (const f of readdirSync(qemuRun)) if (f.endsWith('.pid')) pidFiles.push(join(qemuRun, f));
    for (const f of pidFiles) {
      const pid = existsSync(f) ? Number(readFileSync(f, 'utf8').trim()) : 0;
      const cmd = pid > 0 && existsSync(`/proc/${pid}/cmdline`) ? readFileSync(`/proc/${pid}/cmdline`, 'utf8') : '';
      if (/qemu-system|virtlogd/.test(cmd)) process.kill(pid, 'SIGKILL');
    }
  });
  const socket = join(dir, 'run/libvirt/libvirt-sock');
  await waitForSocket(socket, daemon, 30_000);
  const pid = daemon.pid;
  const argv = (cmd: string, args: string[]): [string, string[]] => {
    checkInside(host, pid);
    return ['nsenter', ['--target', String(pid), '--mount', '--net', '--uts', '--', cmd, ...args]];
  };
  return {
    ...host, name, dir, pid, daemon, argv,
    virsh: new Virsh({ uri: `qemu+unix:///system?socket=${socket}`, timeoutMs: 120_000 }),
    run: (cmd, args) => run(...argv(cmd, args)),
    hookCalls: () => (existsSync(join(dir, 'hook-calls')) ? readFileSync(join(dir, 'hook-calls'), 'utf8').trim().split('\n') : []),
  };
}

/** Start both hosts (libvirtd, virtlogd, sshd each); about a second or two. */
export async function libvirtHosts(): Promise<LibvirtHosts> {
  const net = await twoHosts();
  const shared = tempDir('vlhs-');
  const [a0, b0] = await Promise.all([startHost('a', net.a), startHost('b', net.b)]);
  const withSshd = async (h: typeof a0): Promise<LibvirtTestHost> => {
    const sshd = await startSshd(h, h.dir, h.argv);
    const q = new URLSearchParams({ keyfile: sshd.identity, known_hosts: sshd.knownHosts });
    return { ...h, sshd, sshUri: `qemu+ssh://root@${h.addr}:${sshd.port}/system?${q}` };
  };
  const [a, b] = await Promise.all([withSshd(a0), withSshd(b0)]);
  return { a, b, shared };
}

/** The domain's state on a host, or null when it is not defined there. */
export async function domState(h: LibvirtTestHost, domain: string): Promise<string | null> {
  const r = await runStatus('virsh', ['-c', h.virsh.uri, 'domstate', domain]);
  return r.code === 0 ? r.stdout.trim() : null;
}

/** The shim records of the vmshiftd whose --state-dir is `stateDir` (none while it has no registry). */
export function registryShims(stateDir: string): ShimRecord[] {
  try {
    const file = join(stateDir, 'vmshiftd.json');
    return existsSync(file) ? JSON.parse(readFileSync(file, 'utf8')).shims : [];
  } catch {
    return [];
  }
}

/** Shims outlive their vmshiftd by design: remember every PID the registry names, kill them at cleanup. */
export function killShimsAtCleanup(shims: () => ShimRecord[]): void {
  const seen = new Map<number, string>();
  const remember = () => { for (const r of shims()) if (r.pid) seen.set(r.pid, r.socket); };
  const timer = setInterval(remember, 200);
  timer.unref();
  onCleanup(async () => {
    clearInterval(timer);
    remember();
    for (const [pid, socket] of seen) if (await isShimProcess(pid, socket)) process.kill(pid, 'SIGKILL');
  });
}

export interface HostVmshiftd {
  daemon: Daemon;
  /** vmshiftd's config (its datastores): what the peer's agent checks new files against. */
  config: string;
  /** The libvirt hook's config on this host (it names this vmshiftd). */
  hookConfig: string;
  /** The registry's shim records. */
  shims(): ShimRecord[];
}

/**
 * A vmshiftd inside the host (its /run/vmshift, state in the host's tree, `datastore` its only
 * datastore) and the hook config naming it, as on a host where vmshift is installed. Its
 * detached shims are killed by PID at cleanup.
 */
export async function startVmshiftd(h: LibvirtTestHost, datastore: string): Promise<HostVmshiftd> {
  const stateDir = join(h.dir, 'vmshiftd-state');
  const config = join(h.dir, 'vmshiftd.json');
  const hookConfig = join(h.dir, 'hooks.json');
  writeFileSync(config, JSON.stringify({ datastores: [datastore] }), { mode: 0o600 });
  writeFileSync(hookConfig, JSON.stringify({ daemonSocket: '/run/vmshift/vmshiftd.sock', runDir: '/run/vmshift', group: null, libvirtUri: 'qemu:///system' }), { mode: 0o600 });
  const shims = () => registryShims(stateDir);
  killShimsAtCleanup(shims);
  const daemon = startDaemon(...h.argv(VMSHIFTD, ['--socket', '/run/vmshift/vmshiftd.sock', '--state-dir', stateDir, '--run-dir', '/run/vmshift', '--config', config]));
  await waitForSocket(join(h.dir, 'run/vmshift/vmshiftd.sock'), daemon, 60_000);
  return { daemon, config, hookConfig, shims };
}
