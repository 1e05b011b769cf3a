// The vmshift command: virsh-style verbs, human output on a terminal, --json for scripts.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { serveCommand } from './serve.ts';
import { statusCommand } from './status.ts';
import { migrateStorageCommand } from './migrate-storage.ts';
import { abortCommand } from './abort.ts';
import { attachCommand, detachCommand } from './attach.ts';
import { daemonCommand } from './vmshiftd.ts';
import { shimStartCommand, shimStopCommand, listCommand } from './shim-verbs.ts';
import { enableCommand, disableCommand } from './libvirt-verbs.ts';
import { fail, EXIT_USAGE } from './output.ts';

const argv = hideBin(process.argv);
const json = argv.includes('--json');

await yargs(argv)
  .scriptName('vmshift')
  .option('json', { type: 'boolean', default: false, global: true, describe: 'machine-readable output' })
  .command(serveCommand as never)
  .command(statusCommand as never)
  .command(migrateStorageCommand as never)
  .command(abortCommand as never)
  .command(attachCommand as never)
  .command(detachCommand as never)
  .command(daemonCommand as never)
  .command(shimStartCommand as never)
  .command(shimStopCommand as never)
  .command(listCommand as never)
  .command(enableCommand as never)
  .command(disableCommand as never)
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
