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
import { lstatSync, statSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';

/** Bind `server` to `path` with `mode` from creation (see above); resolves once listening. */
export function listenUnixPrivate(server: Server, path: string, mode: number): Promise<void> {
  return startListening(server, () => {
    const old = process.umask(0o777 & ~mode);
    try {
      server.listen(path);
    } finally {
      process.umask(old);
    }
  });
}

/** Run `start` (some server.listen call); resolves once listening, rejects on its error. */
export function startListening(server: Server, start: () => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const fail = (err: Error) => reject(err);
    server.once('error', fail);
    server.once('listening', () => {
      server.off('error', fail);
      resolve();
    });
    start();
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

/**
 * Refuse to serve a socket from a directory another user controls: they could remove or
 * replace it (callers would then talk to them), or have put it there. Node does not expose
 * SO_PEERCRED, so who may connect is decided by the socket's mode and its directory: the
 * directory must belong to root or to us and be writable by no one else (a sticky directory
 * such as /tmp is fine: others cannot remove or rename what we created in it).
 */
export function checkSocketDir(path: string, what = 'server'): void {
  const dir = dirname(path);
  const st = statSync(dir);
  const me = process.geteuid?.() ?? 0;
  if (st.uid !== 0 && st.uid !== me) throw new Error(`${what}: ${dir} belongs to uid ${st.uid}: a socket there could be replaced by its owner; use a directory of root's`);
  if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0) {
    throw new Error(`${what}: ${dir} is writable by group or others (mode ${(st.mode & 0o7777).toString(8)}): a socket there could be replaced; chmod go-w it`);
  }
}
