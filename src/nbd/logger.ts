// The logging the NBD server needs: pino's shape, so a pino logger can be passed in, and a
// silent default that does not load pino at all (a `vmshift serve` process per disk is
// long-lived, and every MiB of its resident memory counts on a host with many disks).
export interface NbdLogger {
  debug(obj: object | string, msg?: string): void;
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
  child(bindings: object): NbdLogger;
}

const noop = () => {};
export const silentLogger: NbdLogger = { debug: noop, info: noop, warn: noop, error: noop, child: () => silentLogger };
