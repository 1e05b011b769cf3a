// `vmshift serve`'s arguments, parsed without yargs (src/cli/serve.ts): the same options,
// defaults and refusals as the yargs command it shares its table with.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseServeArgs } from '../../src/cli/serve.ts';
import { UsageError } from '../../src/cli/output.ts';

function usageError(args: string[]): string {
  try {
    parseServeArgs(args);
  } catch (e) {
    if (e instanceof UsageError) return e.message;
    throw e;
  }
  throw new Error(`accepted: ${args.join(' ')}`);
}

test('defaults, camelCase names, options before or after the source', () => {
  assert.equal(parseServeArgs(['/d.raw', '--socket', '/s']), {
    source: '/d.raw', socket: '/s', json: false, export: 'disk', readOnly: false, track: 'bitmap', granularity: '64K', socketMode: '0600',
    maxConnections: '16', maxInflight: '64M', maxInflightPerConnection: '8M',
  });
  const a = parseServeArgs(['--socket=/s', '--read-only', '--track', 'bloom', '--tls-cert', 'c', '--tls-key', 'k', '--tcp', 'h:1', '--state', '/st', '--socket-mode', '0660', '--json', 'nbd+unix:///x?socket=/u']);
  assert.is(a.source, 'nbd+unix:///x?socket=/u');
  assert.is(a.readOnly, true);
  assert.is(a.track, 'bloom');
  assert.is(a.tlsCert, 'c');
  assert.is(a.tlsKey, 'k');
  assert.is(a.tcp, 'h:1');
  assert.is(a.state, '/st');
  assert.is(a.socketMode, '0660');
  assert.is(a.json, true);
  assert.is(parseServeArgs(['/d', '--socket', '/s', '--read-only', '--no-read-only']).readOnly, false);
});

test('usage errors: missing source or socket, extra arguments, unknown options, bad choices', () => {
  assert.match(usageError(['--socket', '/s']), /non-option arguments/);
  assert.match(usageError(['/d']), /Missing required argument: socket/);
  assert.match(usageError(['/d', '/e', '--socket', '/s']), /Unknown argument: \/e/);
  assert.match(usageError(['/d', '--socket', '/s', '--bogus']), /--bogus/);
  assert.match(usageError(['/d', '--socket']), /--socket/);
  assert.match(usageError(['/d', '--socket', '/s', '--track', 'all']), /track.*"all".*"bitmap", "bloom", "none"/s);
});

test.run();
