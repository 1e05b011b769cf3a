// The CLI's verb table (src/cli/verbs.ts): `vmshift VERB` loads only VERB's module, so the
// table must name every command yargs knows, under the name it is typed as.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { VERBS } from '../../src/cli/verbs.ts';

test('each entry loads a command whose first word is the verb', async () => {
  for (const [name, load, key] of VERBS) {
    const c = (await load())[key] as { command?: string } | undefined;
    assert.ok(c?.command, `${name}: ${key} is not a command`);
    assert.is(c!.command!.split(' ')[0], name);
  }
  assert.is(new Set(VERBS.map(([n]) => n)).size, VERBS.length, 'a verb is listed twice');
});

test('help without a verb lists every verb', () => {
  const help = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', '--help'], { encoding: 'utf8' }).stdout;
  for (const [name] of VERBS) assert.ok(help.includes(`vmshift ${name}`), `--help lacks ${name}`);
});

test('--version prints the package version, --json as an object', () => {
  const run = (...a: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...a], { encoding: 'utf8' });
  const { version } = JSON.parse(readFileSync('package.json', 'utf8')) as { version: string };
  const plain = run('--version');
  assert.is(plain.status, 0);
  assert.is(plain.stdout, `vmshift ${version}\n`);
  assert.equal(JSON.parse(run('--version', '--json').stdout), { version });
});

test.run();
