// `vmshift balloon --qmp PATH [--set SIZE]`: a running guest's balloon as the policy sees it:
// its size, and the guest's own memory statistics (polling is switched on for the moment it
// takes and put back as it was). --set changes the target. --json for scripts.
import type { Argv, ArgumentsCamelCase } from 'yargs';
import { resolve } from 'node:path';
import { QmpClient } from '../qemu/qmp.ts';
import { GuestBalloon } from '../balloon/device.ts';
import { formatBytes, parseSize } from '../util/size.ts';
import { printJson } from './output.ts';

interface Args { qmp: string; set?: string; json: boolean }

export const balloonCommand = {
  command: 'balloon',
  describe: "Show a guest's balloon and memory statistics (what `migrate --balloon` decides from), or set its target",
  builder: (y: Argv) =>
    y
      .option('qmp', { type: 'string', demandOption: true, describe: "the guest's QMP socket" })
      .option('set', { type: 'string', describe: 'set the balloon target: the memory the guest keeps (e.g. 1G)' }),
  handler: async (argv: ArgumentsCamelCase<Args>) => {
    const target = argv.set !== undefined ? parseSize(argv.set, '--set') : undefined;
    const qmp = await QmpClient.connect(resolve(argv.qmp), { connectTimeoutMs: 5000 });
    try {
      const { balloon: b } = await GuestBalloon.find(qmp, `the guest at ${argv.qmp}`);
      if (target !== undefined) await b.setTarget(target);
      const memory = (await qmp.execute<{ 'base-memory': number }>('query-memory-size-summary'))['base-memory'];
      await b.enableStats(1);
      let error: string | null = null;
      try {
        await b.freshStats(Math.floor(Date.now() / 1000) - 1, 3000);
      } catch (e) {
        error = (e as Error).message;
      } finally {
        await b.restoreInterval();
      }
      const { stats } = await b.rawStats();
      const actual = await b.actual();
      if (argv.json) return printJson({ device: b.path, memory, actual, ...(target !== undefined ? { target } : {}), stats, ...(error ? { error } : {}) });
      const lines = [`device:  ${b.path}`, `memory:  ${formatBytes(actual)} of ${formatBytes(memory)}${target !== undefined ? ` (target set to ${formatBytes(target)})` : ''}`];
      for (const [k, v] of Object.entries(stats)) lines.push(`  ${k.replace(/^stat-/, '').padEnd(16)} ${v < 0 ? 'not reported' : /memory|caches|swap-in|swap-out/.test(k) ? formatBytes(v) : v}`);
      if (error) lines.push(`stats:   ${error}`);
      process.stdout.write(lines.join('\n') + '\n');
    } finally {
      await qmp.close();
    }
  },
};
