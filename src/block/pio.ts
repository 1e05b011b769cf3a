// Positional reads and writes on a raw fd with Node's callback API: one thread-pool request
// and one promise per call. FileHandle's promise API costs measurably more per request
// (its own wrapper objects and an extra promise); on the NBD request path 4k I/O pays that
// tens of thousands of times a second.
import { read, write } from 'node:fs';

/** Read exactly buf.length bytes at `pos`; a short file is an error (EOF). */
export function preadFull(fd: number, buf: Buffer, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number) => {
      read(fd, buf, done, buf.length - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return reject(Object.assign(new Error(`unexpected end of file at ${pos + done}`), { code: 'EIO' }));
        if (done + n < buf.length) step(done + n);
        else resolve();
      });
    };
    if (buf.length === 0) resolve();
    else step(0);
  });
}

/** Write all of `buf` at `pos`. */
export function pwriteFull(fd: number, buf: Buffer, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number) => {
      write(fd, buf, done, buf.length - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (done + n < buf.length) step(done + n);
        else resolve();
      });
    };
    if (buf.length === 0) resolve();
    else step(0);
  });
}
