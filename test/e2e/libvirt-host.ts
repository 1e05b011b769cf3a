// Test hosts for the libvirt and VDSM tests: a vmshiftd with private state/run dirs (its
// detached shims are killed by PID at cleanup), and a real libvirtd in a private mount
// namespace (its own /run, /etc/libvirt, /var/lib/libvirt, ...; nothing of the machine's
// libvirt is touched) with vmshift's hook installed before it starts.
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { onCleanup, startDaemon, tempDir, waitForSocket, type Daemon } from '../helpers/proc.ts';
import { killShimsAtCleanup, registryShims } from '../helpers/libvirt-hosts.ts';
import type { ShimRecord } from '../../src/daemon/registry.ts';
import { Virsh } from '../../src/libvirt/virsh.ts';
import { GUEST_INITRD, GUEST_KERNEL } from '../helpers/guest.ts';
import { randomUUID } from 'node:crypto';

const root = new URL('../..', import.meta.url).pathname;
export const VMSHIFT = join(root, 'bin/vmshift');
export const VMSHIFTD = join(root, 'bin/vmshiftd');
export const LIBVIRT_HOOK = join(root, 'hooks/libvirt-qemu');

export interface VmshiftHost {
  dir: string;
  api: string;
  stateDir: string;
  runDir: string;
  /** Environment for CLI calls and hooks run by the test. */
  env: NodeJS.ProcessEnv;
  start(): Promise<Daemon>;
  shims(): ShimRecord[];
}

export function vmshiftHost(prefix = 'vlh-'): VmshiftHost {
  const dir = tempDir(prefix);
  const api = join(dir, 'api.sock'), stateDir = join(dir, 'state'), runDir = join(dir, 'run');
  const shims = () => registryShims(stateDir);
  killShimsAtCleanup(shims);
  return {
    dir, api, stateDir, runDir, shims,
    env: { ...process.env, VMSHIFT_SOCKET: api, VMSHIFT_RUN_DIR: runDir, VMSHIFT_HOOK_CONFIG: join(dir, 'no-hooks.json') },
    async start() {
      // The test's own dir is its only datastore (and no host config file is read).
      const d = startDaemon(VMSHIFTD, ['--socket', api, '--state-dir', stateDir, '--run-dir', runDir, '--config', join(dir, 'no-vmshiftd.json'), '--datastore', dir]);
      await waitForSocket(api, d, 60_000);
      return d;
    },
  };
}

export interface LibvirtHost {
  uri: string;
  virsh: Virsh;
  dir: string;
  /** The hook's calls, one `DOMAIN OP SUBOP` line each, in order. */
  hookCalls(): string[];
  start(): Promise<void>;
  /** Kill libvirtd by PID (guests keep running) and wait for it to exit. */
  stop(): Promise<void>;
  output(): string;
}

/**
 * A libvirtd whose hook is a wrapper that logs the call, passes vmshift's settings (libvirt
 * gives hooks no environment) and runs hooks/libvirt-qemu. QEMU runs as root, without
 * virtlogd (stdio_handler=file) and without security drivers: the test needs no users.
 */
export function libvirtHost(vm: VmshiftHost): LibvirtHost {
  const dir = tempDir('vlv-');
  const mounts: Record<string, string> = { run: '/run', etc: '/etc/libvirt', lib: '/var/lib/libvirt', cache: '/var/cache/libvirt', log: '/var/log/libvirt' };
  for (const d of Object.keys(mounts)) mkdirSync(join(dir, d), { recursive: true });
  mkdirSync(join(dir, 'run/libvirt'));
  mkdirSync(join(dir, 'etc/hooks'));
  writeFileSync(join(dir, 'etc/qemu.conf'), 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\nstdio_handler = "file"\n');
  writeFileSync(join(dir, 'etc/libvirtd.conf'), 'unix_sock_group = "root"\n');
  const hookConfig = join(dir, 'hooks.json');
  const uri = `qemu+unix:///system?socket=${join(dir, 'run/libvirt/libvirt-sock')}`;
  // libvirtUri: vmshiftd records moved disk paths in this libvirtd's domain XML.
  writeFileSync(hookConfig, JSON.stringify({ daemonSocket: vm.api, group: null, libvirtUri: uri }));
  const hook = join(dir, 'etc/hooks/qemu');
  writeFileSync(hook, [
    '#!/bin/sh',
    `echo "$1 $2 $3" >> ${dir}/hook-calls`,
    `export VMSHIFT_HOOK_CONFIG=${hookConfig}`,
    `exec ${LIBVIRT_HOOK} "$@"`,
    '',
  ].join('\n'));
  chmodSync(hook, 0o755);
  const script = join(dir, 'start.sh');
  writeFileSync(script, [
    'set -e',
    ...Object.entries(mounts).map(([d, m]) => `mount --bind ${join(dir, d)} ${m}`),
    'exec libvirtd',
    '',
  ].join('\n'));
  let daemon: Daemon | undefined;
  // libvirtd leaves guests running when it stops: kill their QEMUs by the PIDs it recorded.
  onCleanup(() => {
    const pids = join(dir, 'run/libvirt/qemu');
    if (!existsSync(pids)) return;
    for (const f of readdirSync(pids).filter((n) => n.endsWith('.pid'))) {
      const pid = Number(readFileSync(join(pids, f), 'utf8').trim());
      const cmd = pid > 0 && existsSync(`/proc/${pid}/cmdline`) ? readFileSync(`/proc/${pid}/cmdline`, 'utf8') : '';
      if (cmd.includes('qemu-system')) process.kill(pid, 'SIGKILL');
    }
  });
  return {
    uri, dir,
    virsh: new Virsh({ uri, timeoutMs: 120_000 }),
    hookCalls: () => (existsSync(join(dir, 'hook-calls')) ? readFileSync(join(dir, 'hook-calls'), 'utf8').trim().split('\n') : []),
    async start() {
      // unshare execs sh which execs libvirtd: the PID we hold is libvirtd's.
      daemon = startDaemon('unshare', ['--mount', '--propagation', 'private', 'sh', script]);
      await waitForSocket(join(dir, 'run/libvirt/libvirt-sock'), daemon, 30_000);
    },
    async stop() {
      await daemon?.stop();
    },
    output: () => daemon?.output() ?? '',
  };
}

/** A TCG domain running the tiny guest's sequence writer over `slots` blocks of one raw disk. */
export function writerDomainXml(name: string, diskPath: string, consolePath: string, slots: number): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <uuid>${randomUUID()}</uuid>
  <memory unit='MiB'>256</memory>
  <features><acpi/></features>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>${GUEST_KERNEL}</kernel>
    <initrd>${GUEST_INITRD}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 mode=writer blocks=${slots} delay=10</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='${diskPath}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='${consolePath}'/></serial>
  </devices>
</domain>
`;
}
