// Which SSH client carries one bulk stream faster on this machine: the OpenSSH client
// (`ssh HOST 'cat > /dev/null'`, as Proxmox's and libvirt's tunnels use it) or ssh2 in
// process (bench/ssh2-sink.ts), interleaved, against one sshd in a second network namespace;
// then the link itself over the same sshd, against ssh2 alone on the same work: one way
// (`vmshift link-agent --sink` vs `cat > /dev/null`) and echoed (`--echo` vs `cat`), and
// the link over TLS. Every path is timed in each round, interleaved.
// Run: node --import tsx bench/link-carriers.ts [rounds]   (root; creates and removes namespaces)
import { join } from 'node:path';
import { twoHosts, startSshd, inNs, nsArgv, makeCerts, daemonInNs } from '../test/helpers/hosts.ts';
import { cleanupAll, run } from '../test/helpers/proc.ts';

const root = new URL('..', import.meta.url).pathname;
const rounds = Number(process.argv[2] ?? 3);
const MiB = 128;
const ECHO_MIB = 32;

async function client(hosts: Awaited<ReturnType<typeof twoHosts>>, args: object): Promise<{ ms: number; cpuMs: number; childCpuMs: number }> {
  const [cmd, argv] = nsArgv(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'test/fixtures/link-echo-client.ts'), JSON.stringify(args)]);
  const r = await run(cmd, argv, { cwd: root });
  const done = r.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l)).find((e) => e.event === 'done');
  if (!done) throw new Error(r.stdout);
  return done;
}

try {
  console.log(`load before: ${(await run('uptime', [])).stdout.trim()}`);
  const hosts = await twoHosts();
  const sshd = await startSshd(hosts.b, hosts.dir);
  const certs = await makeCerts(join(hosts.dir, 'certs'), hosts.b.addr);
  const base = ['-T', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=yes', '-o', `UserKnownHostsFile=${sshd.knownHosts}`, '-o', 'GlobalKnownHostsFile=/dev/null',
    '-i', sshd.identity, '-o', 'IdentitiesOnly=yes', '-p', String(sshd.port), `root@${hosts.b.addr}`];
  const rows: Record<string, number[]> = {};
  const add = (k: string, v: number) => (rows[k] ??= []).push(v);
  for (let i = 0; i < rounds; i++) {
    for (const cipher of ['chacha20-poly1305@openssh.com', 'aes128-gcm@openssh.com']) {
      const t = performance.now();
      // bash's `time` of the pipeline: the ssh client's CPU (and head's, ~0.03 s per 128 MiB of zeros).
      const o = await inNs(hosts.a, 'bash', ['-c', `TIMEFORMAT='%U %S'; { time (head -c ${MiB}M /dev/zero | ssh -c ${cipher} ${base.join(' ')} 'cat > /dev/null') ; } 2>&1`]);
      add(`openssh ${cipher}`, MiB / ((performance.now() - t) / 1000));
      const [u, sy] = o.stdout.trim().split(/\s+/).slice(-2).map(Number);
      add(`openssh ${cipher}: sending client's CPU s/GiB`, ((u + sy) * 1024) / MiB);
      const r = await inNs(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'bench/ssh2-sink.ts'), hosts.b.addr, String(sshd.port), sshd.identity, String(MiB), cipher], { cwd: root });
      add(`ssh2 ${cipher}`, JSON.parse(r.stdout).mibps);
      add(`ssh2 ${cipher}: sending process's CPU s/GiB`, (JSON.parse(r.stdout).cpuMs * 1024) / 1000 / MiB);
    }
    const sshArgs = { host: hosts.b.addr, port: sshd.port, user: 'root', identity: sshd.identity, knownHosts: sshd.knownHosts, vmshift: join(root, 'bin/vmshift'), socketDir: join(hosts.dir, 'agent') };
    // The link over each SSH client (src/link/ssh-carrier.ts, VMSHIFT_SSH_CLIENT), interleaved.
    for (const ssh of ['ssh2', 'openssh']) {
      process.env.VMSHIFT_SSH_CLIENT = ssh;
      const sink = await client(hosts, { mib: MiB, oneWay: true, ssh: sshArgs });
      add(`link over ${ssh}, ${MiB} MiB one way`, MiB / (sink.ms / 1000));
      add(`link over ${ssh}, one way: sending end CPU s/GiB (node + ssh)`, ((sink.cpuMs + sink.childCpuMs) * 1024) / 1000 / MiB);
      add(`link over ${ssh}, one way: of it, the ssh client's`, (sink.childCpuMs * 1024) / 1000 / MiB);
      const echo = await client(hosts, { mib: ECHO_MIB, ssh: sshArgs });
      add(`link over ${ssh}, ${ECHO_MIB} MiB each way (echo)`, (2 * ECHO_MIB) / (echo.ms / 1000));
    }
    delete process.env.VMSHIFT_SSH_CLIENT;
    const echo = await inNs(hosts.a, process.execPath, ['--import', 'tsx', join(root, 'bench/ssh2-sink.ts'), hosts.b.addr, String(sshd.port), sshd.identity, String(ECHO_MIB), 'aes128-gcm@openssh.com', 'echo'], { cwd: root });
    add(`ssh2 aes128-gcm, ${ECHO_MIB} MiB each way (cat)`, JSON.parse(echo.stdout).mibps);
    const port = 30000 + Math.floor(Math.random() * 20000);
    const link = `bench${i}`;
    const agent = daemonInNs(hosts.b, join(root, 'bin/vmshift'), ['link-agent', '--echo', '--link', link, '--migration', 'm1', '--socket', join(hosts.dir, `agent/${link}.sock`),
      '--tls-listen', `${hosts.b.addr}:${port}`, '--tls-ca', join(certs, 'ca-cert.pem'), '--tls-cert', join(certs, 'server-cert.pem'), '--tls-key', join(certs, 'server-key.pem')]);
    while (!agent.output().includes('waiting on')) await new Promise((r) => setTimeout(r, 50));
    const tls = await client(hosts, { link, mib: ECHO_MIB, tls: { host: hosts.b.addr, port, ca: join(certs, 'ca-cert.pem'), cert: join(certs, 'client-cert.pem'), key: join(certs, 'client-key.pem') } });
    add(`link over tls, ${ECHO_MIB} MiB each way (echo)`, (2 * ECHO_MIB) / (tls.ms / 1000));
    await agent.exited;
  }
  const med = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
  console.log('| path | MiB/s, or CPU s/GiB (median) | runs |\n|---|---|---|');
  const fmt = (x: number) => (x < 20 ? x.toFixed(2) : String(Math.round(x)));
  for (const [k, v] of Object.entries(rows)) console.log(`| ${k} | ${fmt(med(v))} | ${v.map(fmt).join(', ')} |`);
  console.log(`load after: ${(await run('uptime', [])).stdout.trim()}`);
} finally {
  await cleanupAll();
}
