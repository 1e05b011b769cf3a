// The TCP+TLS network carrier: x509 certificates verified on both sides (the dialer checks
// the server's certificate and name against the CA; the listener demands a client
// certificate signed by the same CA). A certificate either side refuses is fatal (AUTH):
// redialling would fail the same way.
import { connect as tlsConnect, createServer, type TLSSocket, type Server } from 'node:tls';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { Duplex } from 'node:stream';
import { LinkError, classify } from './errors.ts';

export interface TlsFiles {
  /** PEM CA bundle both sides trust. */
  ca: string;
  /** This side's certificate chain and key (PEM). */
  cert: string;
  key: string;
}

const CERT_CODES = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER|ALTNAME|ALERT_UNKNOWN_CA|ALERT_BAD_CERTIFICATE|ALERT_CERTIFICATE|HANDSHAKE_FAILURE|ALERT_DECRYPT/i;

/** A TLS error that means "this certificate is refused", as an AUTH LinkError; others unchanged. */
export function tlsError(e: Error & { code?: string }, where: string): Error {
  const code = e.code ?? '';
  if (CERT_CODES.test(code) || /certificate/i.test(e.message)) {
    return new LinkError('AUTH', `tls: ${where}: certificate refused (${code || e.message}${code && !e.message.includes(code) ? `: ${e.message}` : ''})`);
  }
  return e;
}

function read(files: TlsFiles) {
  return { ca: readFileSync(files.ca), cert: readFileSync(files.cert), key: readFileSync(files.key) };
}

export function tlsDialer(target: { host: string; port: number; servername?: string } & TlsFiles): () => Promise<Duplex> {
  const where = `${target.host}:${target.port}`;
  return () => new Promise((resolve, reject) => {
    let pem;
    try { pem = read(target); } catch (e) { reject(new LinkError('AUTH', `tls: cannot read certificates: ${(e as Error).message}`)); return; }
    const s: TLSSocket = tlsConnect({
      host: target.host, port: target.port, servername: target.servername ?? (isIP(target.host) ? undefined : target.host), ...pem,
      minVersion: 'TLSv1.2', rejectUnauthorized: true,
    }, () => {
      s.off('error', failed);
      // TLS 1.3: the server judges our certificate after we think we are connected; its
      // refusal arrives later as a socket error, which this (first) listener classifies.
      s.on('error', (e) => classify(e, tlsError(e, where)));
      const wrapped = s as unknown as Duplex;
      resolve(wrapped);
    });
    const failed = (e: Error) => { s.destroy(); reject(tlsError(e, where)); };
    s.once('error', failed);
    s.setTimeout(10_000, () => failed(new Error(`tls: ${where}: connect timed out`)));
    s.once('secureConnect', () => s.setTimeout(0));
  });
}

/** Listen for the dialer; each verified connection goes to `onSocket` (a Link's `attach`). */
export function listenTls(opts: { host: string; port: number } & TlsFiles, onSocket: (s: Duplex) => void, onRefused?: (msg: string) => void): Promise<Server> {
  const server = createServer({ ...read(opts), requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (s) => onSocket(s));
  server.on('tlsClientError', (e, s) => onRefused?.(tlsError(e, `${s.remoteAddress}:${s.remotePort}`).message));
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => { server.off('error', reject); resolve(server); });
  });
}
