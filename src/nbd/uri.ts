// NBD URIs (the NBD project's doc/uri.md, as libnbd and qemu read them):
//   nbd+unix:///NAME?socket=PATH     unix socket
//   nbd://HOST[:PORT]/NAME           TCP, port 10809 by default
//   nbds://... and nbds+unix://...   the same with TLS (STARTTLS)
// NAME is the export name, percent-decoded; an empty NAME is the server's default export.

export const DEFAULT_NBD_PORT = 10809;

export type NbdTarget =
  | { transport: 'unix'; socket: string; exportName: string; tls: boolean }
  | { transport: 'tcp'; host: string; port: number; exportName: string; tls: boolean };

const SCHEMES: Record<string, { transport: 'unix' | 'tcp'; tls: boolean }> = {
  'nbd:': { transport: 'tcp', tls: false },
  'nbds:': { transport: 'tcp', tls: true },
  'nbd+tcp:': { transport: 'tcp', tls: false },
  'nbds+tcp:': { transport: 'tcp', tls: true },
  'nbd+unix:': { transport: 'unix', tls: false },
  'nbds+unix:': { transport: 'unix', tls: true },
};

function bad(uri: string, why: string): Error {
  return new Error(`invalid NBD URI "${uri}": ${why}`);
}

/** Parse an NBD URI into a target; throws an error that quotes the URI and says what is wrong. */
export function parseNbdUri(uri: string): NbdTarget {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw bad(uri, 'not a URI (expected nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)');
  }
  const scheme = SCHEMES[u.protocol];
  if (!scheme) {
    throw bad(uri, `unsupported scheme "${u.protocol.slice(0, -1)}" (expected nbd, nbds, nbd+unix or nbds+unix)`);
  }
  if (u.username || u.password) throw bad(uri, 'user names and passwords are not supported');
  if (u.hash) throw bad(uri, 'fragments are not allowed');
  const exportName = decodeName(uri, u.pathname);
  const params = new Map<string, string>();
  for (const [k, v] of u.searchParams) {
    if (params.has(k)) throw bad(uri, `query parameter "${k}" given twice`);
    params.set(k, v);
  }

  if (scheme.transport === 'unix') {
    if (u.host) throw bad(uri, `a unix socket URI has no host (got "${u.host}"); write nbd+unix:///NAME?socket=PATH`);
    const socket = params.get('socket');
    if (!socket) throw bad(uri, 'missing ?socket=PATH');
    params.delete('socket');
    rejectUnknownParams(uri, params);
    return { transport: 'unix', socket, exportName, tls: scheme.tls };
  }

  if (!u.hostname) throw bad(uri, 'missing host');
  if (params.has('socket')) throw bad(uri, 'socket= is only valid with nbd+unix:// or nbds+unix://');
  rejectUnknownParams(uri, params);
  // URL strips the port when it equals the scheme's default, and nbd has none: any port stays.
  const port = u.port === '' ? DEFAULT_NBD_PORT : Number(u.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw bad(uri, `bad port "${u.port}"`);
  const host = u.hostname.startsWith('[') ? u.hostname.slice(1, -1) : u.hostname;
  return { transport: 'tcp', host, port, exportName, tls: scheme.tls };
}

function decodeName(uri: string, pathname: string): string {
  // "nbd://h" has an empty path, "nbd://h/" an empty name, "nbd://h/a/b" the name "a/b".
  const raw = pathname.startsWith('/') ? pathname.slice(1) : pathname;
  try {
    return decodeURIComponent(raw);
  } catch {
    throw bad(uri, `export name "${raw}" is not valid percent-encoding`);
  }
}

function rejectUnknownParams(uri: string, params: Map<string, string>): void {
  // tls-certificates and friends exist in libnbd; vmshift takes TLS settings as options instead,
  // and silently ignoring a security setting would be worse than refusing it.
  const left = [...params.keys()];
  if (left.length) throw bad(uri, `unsupported query parameter${left.length > 1 ? 's' : ''} ${left.map((k) => `"${k}"`).join(', ')}`);
}

/** The canonical URI of a target: used as the peer's name in errors and as a device name. */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeURI(t.exportName).replace(/[?#]/g, encodeURIComponent);
  if (t.transport === 'unix') return `${t.tls ? 'nbds' : 'nbd'}+unix:///${name}?socket=${t.socket}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  const port = t.port === DEFAULT_NBD_PORT ? '' : `:${t.port}`;
  return `${t.tls ? 'nbds' : 'nbd'}://${host}${port}/${name}`;
}
