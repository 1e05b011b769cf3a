// The vmshift command: virsh-style verbs, human output on a terminal, --json for scripts.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { fail, EXIT_USAGE } from './output.ts';

const argv = hideBin(process.argv);
const json = argv.includes('--json');

/**
 * `serve` is the long-lived process, one per disk: it loads only its own verb, so it does
 * not carry the libvirt, progress-bar and daemon code (and their packages) in its memory.
 */
async function commands(): Promise<object[]> {
  if (argv[0] === 'serve') return [(await import('./serve.ts')).serveCommand];
  const [serve, status, migrate, abort, attach, daemon, shims, libvirt] = await Promise.all([
    import('./serve.ts'), import('./status.ts'), import('./migrate-storage.ts'), import('./abort.ts'),
    import('./attach.ts'), import('./vmshiftd.ts'), import('./shim-verbs.ts'), import('./libvirt-verbs.ts'),
  ]);
  return [
    serve.serveCommand, status.statusCommand, migrate.migrateStorageCommand, abort.abortCommand,
    attach.attachCommand, attach.detachCommand, daemon.daemonCommand,
    shims.shimStartCommand, shims.shimStopCommand, shims.listCommand,
    libvirt.enableCommand, libvirt.disableCommand,
  ];
}

let cli = yargs(argv)
  .scriptName('vmshift')
  .option('json', { type: 'boolean', default: false, global: true, describe: 'machine-readable output' });
for (const c of await commands()) cli = cli.command(c as never);
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
