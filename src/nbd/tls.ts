// TLS for NBD: the server upgrades a connection in place after acknowledging
// NBD_OPT_STARTTLS (x509 certificates).
//
// Secure by default, as QEMU's tls-creds-x509 with verify-peer=on: with a CA, every client
// must present a certificate that CA signed and that is within its dates (OpenSSL checks the
// chain and the validity period; a connection whose client certificate is missing,
// self-signed, foreign or expired is closed as the handshake ends, before any NBD option is
// read: clientCertificateError below). Serving without client certificates is an explicit choice (`verifyClient:
// false`, `vmshift serve --tls-no-client-auth`). Only TLS 1.3, or TLS 1.2 with ECDHE key
// exchange and an AEAD cipher: no static-RSA key exchange (no forward secrecy), no CBC.
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import type { Duplex } from 'node:stream';

/** TLS 1.2 suites we accept (TLS 1.3's own suites are all ECDHE/DHE + AEAD and stay enabled). */
export const TLS12_CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305', 'ECDHE-RSA-CHACHA20-POLY1305',
].join(':');

/** The protocol floor and cipher policy shared by our TLS server and client ends. */
export const TLS_POLICY = { minVersion: 'TLSv1.2', ciphers: TLS12_CIPHERS } as const;

export interface TlsServerConfig {
  /** PEM certificate chain and private key of the server. */
  cert: string | Buffer;
  key: string | Buffer;
  /** PEM CA bundle that signs client certificates. */
  ca?: string | Buffer;
  /** FORCEDTLS: every option but STARTTLS and ABORT is refused with ERR_TLS_REQD until TLS is up. */
  required: boolean;
  /**
   * Demand a client certificate signed by `ca` (the default whenever `ca` is given). Without
   * a `ca`, it must be set to false explicitly: anyone who reaches the port is then served.
   */
  verifyClient?: boolean;
}

export interface ServerTls {
  config: TlsServerConfig;
  verifyClient: boolean;
  context: SecureContext;
}

export function serverTls(config: TlsServerConfig): ServerTls {
  const verifyClient = config.verifyClient ?? true;
  if (verifyClient && !config.ca) throw new Error('tls: no CA to verify client certificates with (give one, or turn client verification off explicitly)');
  const context = createSecureContext({ cert: config.cert, key: config.key, ca: config.ca, ...TLS_POLICY });
  return { config, verifyClient, context };
}

/**
 * Wrap an established stream (TCP socket, unix socket, SSH channel) as the TLS server end and
 * resolve once the handshake completed; reject (and destroy it) when the handshake fails.
 */
export function acceptTls(raw: Duplex, tls: ServerTls, timeoutMs = 30_000): { socket: TLSSocket; secured: Promise<void> } {
  const socket = new TLSSocket(raw, {
    isServer: true,
    secureContext: tls.context,
    requestCert: tls.verifyClient,
    rejectUnauthorized: tls.verifyClient,
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
      const refused = tls.verifyClient ? clientCertificateError(socket) : undefined;
      if (refused) return fail(new Error(`tls: client certificate refused: ${refused}`));
      resolve();
    };
    const closed = () => fail(new Error('tls: peer closed the connection during the handshake'));
    socket.once('secure', ok);
    socket.once('error', fail);
    socket.once('close', closed);
  });
  return { socket, secured };
}

/**
 * Why the client's certificate is not acceptable, or undefined when it is. On a bare
 * server-side TLSSocket, rejectUnauthorized only makes OpenSSL refuse a client that sends no
 * certificate: Node's verify callback accepts every chain and leaves the verdict to
 * `_handle.verifyError()`, which it consults only for sockets a listening tls.Server made
 * (onServerSocketSecure in Node's lib/_tls_wrap.js). We consult it the same way, and fail
 * closed should a Node version lack it.
 */
function clientCertificateError(socket: TLSSocket): string | undefined {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'this Node.js cannot report certificate verification';
  const err = handle.verifyError();
  if (err) return err.code ? `${err.code} (${err.message})` : err.message;
  if (!socket.getPeerCertificate()?.raw) return 'no certificate';
  return undefined;
}
