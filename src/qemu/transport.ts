// What every way of talking to a QEMU monitor offers: our own socket client (QmpClient) and
// libvirt's monitor passthrough (VirshMonitor). Callers depend on this, not on either one.

export interface ExecuteOpts {
  /** Reject with a QmpConnectionError of kind 'timeout' after this long. */
  timeoutMs?: number;
}

export interface QmpTransport {
  /** Run one QMP command; resolves with its `return` value, whatever its JSON type. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: ExecuteOpts): Promise<T>;
  close(): Promise<void>;
}

/** QEMU answered a command with `{"error": {"class", "desc"}}`. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
    readonly peer: string,
  ) {
    super(`${peer}: ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

export type QmpConnectionErrorKind = 'connect' | 'closed' | 'timeout' | 'protocol';

/** The monitor itself failed: could not connect, went away, timed out or spoke nonsense. */
export class QmpConnectionError extends Error {
  constructor(
    readonly kind: QmpConnectionErrorKind,
    readonly peer: string,
    /** The message without the peer prefix. */
    readonly detail: string,
    options?: { cause?: unknown },
  ) {
    super(`${peer}: ${detail}`, options);
    this.name = 'QmpConnectionError';
  }
}

/** Decode one parsed QMP reply (`return` or `error`) for `command`. */
export function replyValue<T>(reply: Record<string, unknown>, command: string, peer: string): T {
  if ('return' in reply) return reply.return as T;
  const err = reply.error as { class?: unknown; desc?: unknown } | undefined;
  if (err && typeof err === 'object') {
    throw new QmpError(command, String(err.class ?? 'unknown'), String(err.desc ?? ''), peer);
  }
  throw new QmpConnectionError('protocol', peer, `reply to ${command} has neither return nor error: ${JSON.stringify(reply).slice(0, 200)}`);
}
