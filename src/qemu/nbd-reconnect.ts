// How long QEMU holds a guest's requests while the shim behind its NBD node is away.
//
// QEMU's NBD client (reconnect-delay, QEMU >= 4.2) treats a lost connection as a pause: it
// keeps reconnecting and, for the first N seconds, holds the guest's requests and re-sends
// them on the new connection (in-flight ones included); after N seconds held and new
// requests fail with EIO until a connection comes back. Without it (QEMU's default, 0) the
// first request after a shim dies fails at once and the guest's filesystem goes read-only.
//
// QEMU 7.2 retries the connection 1, 2, 4, 8, 16 s apart (measured: a shim back 1.8 s after
// a kill -9 was reconnected at 3.5 s, one back at 3.8 s at 7.6 s). vmshiftd notices a dead
// shim within a second and has it serving in about another; 30 s covers that, a first
// restart that fails (vmshiftd retries 1 s later) and QEMU's attempts at 1, 3, 7 and 15 s,
// and is still well short of the 120 s after which Linux guests report hung tasks, so a
// shim that never returns surfaces as an I/O error rather than a hang.
export const DEFAULT_RECONNECT_DELAY_S = 30;
/** QEMU takes a uint32; more than an hour of held I/O is a hang by another name. */
export const MAX_RECONNECT_DELAY_S = 3600;

/** A delay in whole seconds from an option or a config value; 0 turns reconnecting off. */
export function checkReconnectDelay(value: unknown, what = 'reconnect delay'): number {
  const n = typeof value === 'string' && /^\d+$/.test(value.trim()) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0 || n > MAX_RECONNECT_DELAY_S) {
    throw new Error(`${what}: ${typeof value === 'string' ? JSON.stringify(value) : String(value)} is not a whole number of seconds from 0 to ${MAX_RECONNECT_DELAY_S}`);
  }
  return n;
}
