// Client side of the control protocol: one call per connection keeps it simple for a CLI;
// `call` resolves with the result and passes event lines to `onEvent` while it waits.
import { connect } from 'node:net';
import { ControlError, LineSplitter, type ControlReply } from './protocol.ts';

export interface CallOptions {
  onEvent?: (event: string, data: unknown) => void;
  timeoutMs?: number;
  /** Aborting closes the connection; the server sees the caller vanish. */
  signal?: AbortSignal;
}

export function controlCall<T = unknown>(socketPath: string, method: string, params: Record<string, unknown> = {}, opts: CallOptions = {}): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const sock = connect(socketPath);
    let done = false;
    const finish = (err: Error | null, value?: T) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value as T);
    };
    const timer = opts.timeoutMs ? setTimeout(() => finish(new ControlError('timeout', `${socketPath}: no answer to ${method} within ${opts.timeoutMs} ms`)), opts.timeoutMs) : undefined;
    opts.signal?.addEventListener('abort', () => finish(new ControlError('aborted', `${method}: aborted`)));
    const splitter = new LineSplitter((line) => {
      let msg: ControlReply;
      try {
        msg = JSON.parse(line);
      } catch {
        return finish(new ControlError('protocol', `${socketPath}: not JSON: ${line.slice(0, 80)}`));
      }
      if ('event' in msg) opts.onEvent?.(msg.event, msg.data);
      else if ('error' in msg) finish(new ControlError(msg.error.code, msg.error.message));
      else finish(null, msg.result as T);
    });
    sock.on('connect', () => sock.write(JSON.stringify({ id: 1, method, params }) + '\n'));
    sock.on('data', (chunk) => {
      try {
        splitter.push(chunk);
      } catch (e) {
        finish(e as Error);
      }
    });
    sock.on('error', (e: NodeJS.ErrnoException) => {
      const why = e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? 'nothing is listening (is the shim running?)' : e.message;
      finish(new ControlError('unreachable', `${socketPath}: ${why}`));
    });
    sock.on('close', () => finish(new ControlError('closed', `${socketPath}: connection closed before an answer to ${method}`)));
  });
}
