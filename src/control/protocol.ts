// The control protocol spoken on a shim's control socket (and later vmshiftd's API socket):
// newline-delimited JSON. A request is {id, method, params}; the answer is {id, result} or
// {id, error: {code, message}}. A connection that called a streaming method also receives
// {event, data} lines until it closes. One line is at most MAX_LINE bytes: a peer that sends
// more is cut off, so a confused or hostile client cannot make us buffer without bound.
import { StringDecoder } from 'node:string_decoder';

export const MAX_LINE = 1024 * 1024;

export interface ControlRequest {
  id: number | string;
  method: string;
  params?: Record<string, unknown>;
}

export interface ControlErrorBody {
  code: string;
  message: string;
}

export type ControlReply =
  | { id: number | string; result: unknown }
  | { id: number | string; error: ControlErrorBody }
  | { event: string; data: unknown };

/** An error with a stable code that travels to the client unchanged. */
export class ControlError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

/** Splits a byte stream into lines, refusing lines longer than MAX_LINE. */
export class LineSplitter {
  private buf = '';
  // A multi-byte character split across two chunks must not turn into two U+FFFDs.
  private readonly decoder = new StringDecoder('utf8');
  constructor(private readonly onLine: (line: string) => void) {}
  push(chunk: Buffer | string): void {
    this.buf += typeof chunk === 'string' ? chunk : this.decoder.write(chunk);
    let start = 0;
    let nl: number;
    while ((nl = this.buf.indexOf('\n', start)) >= 0) {
      if (nl - start > MAX_LINE) throw tooLong();
      const line = this.buf.slice(start, nl);
      start = nl + 1;
      if (line.trim()) this.onLine(line);
    }
    this.buf = this.buf.slice(start);
    if (this.buf.length > MAX_LINE) throw tooLong();
  }
}

const tooLong = () => new ControlError('too-long', `line longer than ${MAX_LINE} bytes`);
