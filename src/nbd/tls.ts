// TLS for NBD: the server upgrades a connection in place after acknowledging
// NBD_OPT_STARTTLS (x509 certificates, TLS 1.2 or later as the protocol requires).
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import type { Duplex } from 'node:stream';

export interface TlsServerConfig {
  /** PEM certificate chain and private key of the server. */
  cert: string | Buffer;
  key: string | Buffer;
  /** PEM CA bundle used to verify client certificates (only when `verifyClient`). */
  ca?: string | Buffer;
  /** FORCEDTLS: every option but STARTTLS and ABORT is refused with ERR_TLS_REQD until TLS is up. */
  required: boolean;
  /** Demand a client certificate signed by `ca`. */
  verifyClient?: boolean;
}

export interface ServerTls {
  config: TlsServerConfig;
  context: SecureContext;
}

export function serverTls(config: TlsServerConfig): ServerTls {
  if (config.verifyClient && !config.ca) throw new Error('tls: verifyClient needs a ca');
  const context = createSecureContext({ cert: config.cert, key: config.key, ca: config.ca, minVersion: 'TLSv1.2' });
  return { config, context };
}

/**
 * Wrap an established stream (TCP socket, unix socket, SSH channel) as the TLS server end and
 * resolve once the handshake completed; reject (and destroy it) when the handshake fails.
 */
export function acceptTls(raw: Duplex, tls: ServerTls, timeoutMs = 30_000): { socket: TLSSocket; secured: Promise<void> } {
  const verify = tls.config.verifyClient === true;
  const socket = new TLSSocket(raw, {
    isServer: true,
    secureContext: tls.context,
    requestCert: verify,
    rejectUnauthorized: verify,
  });
  const secured = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`tls: handshake did not finish within ${timeoutMs} ms`)), timeoutMs);
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.off('secure', ok);
      reject(err);
      socket.destroy();
    };
    const ok = () => {
      clearTimeout(timer);
      socket.off('error', fail);
      socket.off('close', closed);
      resolve();
    };
    const closed = () => fail(new Error('tls: peer closed the connection during the handshake'));
    socket.once('secure', ok);
    socket.once('error', fail);
    socket.once('close', closed);
  });
  return { socket, secured };
}
