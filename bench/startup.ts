// `npm run bench -- startup [--rounds N]`: what `vmshift migrate --peer ssh://` spends before
// its first byte, piece by piece, interleaved in each round:
//   cli migrate  `vmshift migrate` up to its first error (no QEMU): node, yargs, the verb's modules
//   cli tsx      `vmshift --help` through tsx (what bin/vmshift runs while dist/ is older than src/)
//   agent load   `vmshift link-agent` with no arguments (the agent's modules, then a usage error)
//   ssh login    `ssh root@B true` from namespace A (OpenSSH: the login alone)
//   agent start  `ssh root@B vmshift link-agent --start ...`: the login plus starting the agent
//                (the --start process, and the detached agent it waits for)
// `--compare DIR`: the same steps also with DIR/bin/vmshift (another checkout, built), interleaved.
// Medians in ms. Root only (namespaces, sshd); everything started is stopped.
import { join } from 'node:path';
import { cleanupAll, run, runStatus } from '../test/helpers/proc.ts';
import { inNsStatus, startSshd, twoHosts } from '../test/helpers/hosts.ts';
import { table } from './lib.ts';

const root = new URL('..', import.meta.url).pathname;
const vmshift = join(root, 'bin/vmshift');

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

export async function main(argv: string[]): Promise<void> {
  const i = argv.indexOf('--rounds');
  const rounds = i >= 0 ? Number(argv[i + 1]) : 5;
  const c = argv.indexOf('--compare');
  const bins: Array<[string, string]> = [['', vmshift], ...(c >= 0 ? [[' [other]', join(argv[c + 1], 'bin/vmshift')] as [string, string]] : [])];
  console.log(`load before: ${(await run('uptime', [])).stdout.trim()}`);
  try {
    const hosts = await twoHosts();
    const sshd = await startSshd(hosts.b, hosts.dir);
    const ssh = (cmd: string) => inNsStatus(hosts.a, 'ssh', ['-T', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=yes', '-o', `UserKnownHostsFile=${sshd.knownHosts}`,
      '-o', 'GlobalKnownHostsFile=/dev/null', '-i', sshd.identity, '-o', 'IdentitiesOnly=yes', '-p', String(sshd.port), `root@${hosts.b.addr}`, cmd]);
    const tsx = ['--import', join(root, 'node_modules/tsx/dist/loader.mjs'), join(root, 'src/cli/main.ts')];
    let n = 0;
    const cases: Array<[string, () => Promise<unknown>]> = [['ssh login', () => ssh('true')]];
    for (const [tag, bin] of bins) {
      cases.push(
        [`cli migrate (dist)${tag}`, () => runStatus(bin, ['migrate', '--qmp', '/nonexistent', '--peer', 'ssh://root@127.0.0.1:1', '--dest-qmp', '/x'])],
        [`agent load (dist)${tag}`, () => runStatus(bin, ['link-agent'])],
        [`ssh + agent start${tag}`, async () => {
          // --hold-ms: the agent gives up on its own shortly after (no carrier ever comes).
          const sock = join(hosts.dir, 'agent', `s${++n}.sock`);
          const r = await ssh(`${bin} link-agent --start --echo --link st${n} --migration m --socket ${sock} --hold-ms 1000`);
          if (r.code !== 0 || !r.stdout.includes('ready')) throw new Error(`agent start failed: ${r.stdout}${r.stderr}`);
        }],
      );
    }
    cases.push(['cli help (tsx)', () => runStatus('node', [...tsx, '--help'])]);
    const ms = new Map<string, number[]>(cases.map(([k]) => [k, []]));
    for (let r = 0; r < rounds; r++) {
      for (let c = 0; c < cases.length; c++) {
        const [k, fn] = cases[(c + r) % cases.length];
        ms.get(k)!.push(await timed(fn));
      }
    }
    console.log(`load after: ${(await run('uptime', [])).stdout.trim()}`);
    const med = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
    console.log(table(['step', 'median ms', 'runs ms'], [...ms].map(([k, v]) => [k, Math.round(med(v)), v.map(Math.round).join(' ')])));
  } finally {
    await cleanupAll();
  }
}
