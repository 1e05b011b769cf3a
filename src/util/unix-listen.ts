// Listening unix sockets that are private from the moment they exist.
//
// bind(2) creates the socket file with mode 0777 & ~umask; a chmod() afterwards leaves a
// window in which anyone the umask lets in can connect, and a connection made then stays open
// after the chmod (vmshiftd under `umask 000` served /etc/shadow to a user who got in).
// So the umask is set to exactly the wanted mode around the bind. process.umask is
// process-wide, but Node binds a unix socket synchronously inside server.listen(path) (it has
// returned with the file in place), so no other JavaScript runs while it is narrowed; a file
// that a libuv pool thread creates in that instant can only come out more private, never
// less. Binding in a private directory and renaming the socket into place would also work,
// but libuv unlinks the path it bound when the server closes, which would then be the wrong
// one.
import { connect, type Server } from 'node:net';
import { lstatSync, unlinkSync } from 'node:fs';

/** Bind `server` to `path` with `mode` from creation (see above); resolves once listening. */
export function listenUnixPrivate(server: Server, path: string, mode: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const fail = (err: Error) => reject(err);
    server.once('error', fail);
    server.once('listening', () => {
      server.off('error', fail);
      resolve();
    });
    const old = process.umask(0o777 & ~mode);
    try {
      server.listen(path);
    } finally {
      process.umask(old);
    }
  });
}

/** Remove `path` if it is a socket nobody listens on; refuse to touch anything else. */
export async function removeStaleSocket(path: string, what = 'server'): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return; // does not exist
  }
  if (!isSocket) throw new Error(`${what}: ${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = connect(path, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
  if (live) throw new Error(`${what}: another server is listening on ${path}`);
  unlinkSync(path);
}
