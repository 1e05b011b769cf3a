// The vmshift command: virsh-style verbs, human output on a terminal, --json for scripts.
import { fail, EXIT_USAGE } from './output.ts';
import { VERBS } from './verbs.ts';

const argv = process.argv.slice(2);
const json = argv.includes('--json');


if (argv[0] === 'serve' && !argv.includes('--help') && !argv.includes('-h')) {
  // `serve` is the long-lived process, one per disk: it loads only its own verb, without
  // yargs (see serve.ts), so it does not carry the libvirt, progress-bar and daemon code,
  // their packages, or yargs's help formatting in its memory.
  const { runServe } = await import('./serve.ts');
  await runServe(argv.slice(1)).catch((e) => fail(e, json));
} else if (argv[0] === '--version' || argv[0] === 'version') {
  // What an operator checks first after an upgrade; the package's version (build-deb.sh writes it).
  const { projectRoot } = await import('../util/paths.ts');
  const { readFileSync } = await import('node:fs');
  const version = (JSON.parse(readFileSync(`${projectRoot}/package.json`, 'utf8')) as { version: string }).version;
  process.stdout.write(json ? JSON.stringify({ version }) + '\n' : `vmshift ${version}\n`);
} else if (argv[0] === 'link-agent') {
  // The peer end of a host-to-host link, started over SSH: no yargs either (src/link/agent.ts).
  const { runLinkAgent } = await import('./link-agent.ts');
  await runLinkAgent(argv.slice(1)).catch((e) => fail(e, json));
} else {
  await runYargs();
}

async function runYargs(): Promise<void> {
  const named = VERBS.filter(([name]) => name === argv[0]);
  const chosen = named.length ? named : VERBS;
  const [{ default: yargs }, ...modules] = await Promise.all([import('yargs'), ...chosen.map(([, load]) => load())]);
  const commands = chosen.map(([, , key], i) => modules[i][key] as object);
  let cli = yargs(argv)
    .scriptName('vmshift')
    .option('json', { type: 'boolean', default: false, global: true, describe: 'machine-readable output' });
  for (const c of commands) cli = cli.command(c as never);
  await cli
    .demandCommand(1, 'name a command')
    .strict()
    .fail((msg, err) => {
      if (err) fail(err, json);
      if (json) process.stdout.write(JSON.stringify({ error: { code: 'usage', message: msg } }) + '\n');
      else process.stderr.write(`vmshift: ${msg}\nTry 'vmshift --help'.\n`);
      process.exit(EXIT_USAGE);
    })
    .help()
    .version(false)
    .parseAsync()
    .catch((e) => fail(e, json));
}
