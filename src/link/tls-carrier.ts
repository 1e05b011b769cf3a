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

/** Connections in a row the peer closed before sending a byte, after which we call it a refusal. */
const SILENT_CLOSES = 3;

export function tlsDialer(target: { host: string; port: number; servername?: string } & TlsFiles): () => Promise<Duplex> {
  const where = `${target.host}:${target.port}`;
  // Under TLS 1.3 a server that refuses our certificate just closes the connection after
  // the handshake we saw succeed: no alert reaches us. A peer that does so several times
  // in a row, before its first byte, refuses us.
  let silentCloses = 0;
  return () => new Promise((resolve, reject) => {
    if (silentCloses >= SILENT_CLOSES) {
      reject(new LinkError('AUTH', `tls: ${where} closed ${silentCloses} connections in a row right after the handshake: it refuses our certificate ${target.cert} (or is not a vmshift link agent)`));
      return;
    }
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
      let heard = false; // (the Link attaches its own 'data' listener in the same tick: nothing is lost)
      s.once('data', () => { heard = true; silentCloses = 0; });
      s.once('close', () => { if (!heard) silentCloses++; });
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
  // Verified here rather than by rejectUnauthorized, so that the refusal is logged with its reason.
  const server = createServer({ ...read(opts), requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' }, (s) => {
    if (!s.authorized) {
      onRefused?.(`tls: ${s.remoteAddress}:${s.remotePort}: client certificate refused (${String(s.authorizationError ?? 'none sent')})`);
      s.destroy();
      return;
    }
    onSocket(s);
  });
  server.on('tlsClientError', (e, s) => onRefused?.(tlsError(e, `${s.remoteAddress}:${s.remotePort}`).message));
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => { server.off('error', reject); resolve(server); });
  });
}
