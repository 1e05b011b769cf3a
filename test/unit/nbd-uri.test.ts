import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { formatNbdUri, parseNbdUri } from '../../src/nbd/uri.ts';

test('nbd+unix URI gives socket and export name', () => {
  assert.equal(parseNbdUri('nbd+unix:///disk?socket=/run/x/d.sock'), { transport: 'unix', socket: '/run/x/d.sock', exportName: 'disk', tls: false });
  assert.equal(parseNbdUri('nbds+unix:///?socket=/s'), { transport: 'unix', socket: '/s', exportName: '', tls: true });
});

test('nbd:// URI gives host, default or explicit port, decoded export name', () => {
  assert.equal(parseNbdUri('nbd://127.0.0.1/disk'), { transport: 'tcp', host: '127.0.0.1', port: 10809, exportName: 'disk', tls: false });
  assert.equal(parseNbdUri('nbds://example.org:10900/a%20b/c'), { transport: 'tcp', host: 'example.org', port: 10900, exportName: 'a b/c', tls: true });
  assert.equal(parseNbdUri('nbd://[::1]:99'), { transport: 'tcp', host: '::1', port: 99, exportName: '', tls: false });
});

test('formatNbdUri round-trips what parseNbdUri reads', () => {
  for (const uri of ['nbd+unix:///disk?socket=/tmp/a/s', 'nbds://h.example:10900/x', 'nbd://127.0.0.1/a%20b', 'nbd://[::1]:99/']) {
    assert.is(formatNbdUri(parseNbdUri(uri)), uri);
  }
});

test('bad URIs are refused with an error quoting the URI and the reason', () => {
  const cases: Array<[string, RegExp]> = [
    ['/var/disk.raw', /invalid NBD URI "\/var\/disk.raw": not a URI/],
    ['http://h/disk', /unsupported scheme "http"/],
    ['nbd+unix:///disk', /missing \?socket=PATH/],
    ['nbd+unix://host/disk?socket=/s', /has no host/],
    ['nbd:///disk', /missing host/],
    ['nbd://h/disk?socket=/s', /socket= is only valid with nbd\+unix/],
    ['nbd://h/disk?tls-certificates=/etc/pki', /unsupported query parameter "tls-certificates"/],
    ['nbd://user:pw@h/disk', /user names and passwords/],
    ['nbd://h:0/disk', /bad port/],
    ['nbd://h/%zz', /not valid percent-encoding/],
    ['nbd+unix:///d?socket=/a&socket=/b', /given twice/],
  ];
  for (const [uri, re] of cases) {
    assert.throws(() => parseNbdUri(uri), re, uri);
  }
});

test.run();
