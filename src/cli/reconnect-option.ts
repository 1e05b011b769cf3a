// `--reconnect-delay SECONDS`, for every verb that puts a guest on a shim (attach, enable).
import { checkReconnectDelay, DEFAULT_RECONNECT_DELAY_S } from '../qemu/nbd-reconnect.ts';
import { UsageError } from './output.ts';

export const reconnectDelayOption = {
  type: 'number',
  default: DEFAULT_RECONNECT_DELAY_S,
  describe: "seconds QEMU holds the guest's I/O while a shim restarts (0: fail it at once)",
} as const;

/** The option's value, checked (yargs turns a coerce error into a plain one: exit 1, not 2). */
export function reconnectDelayArg(value: unknown): number {
  try {
    return checkReconnectDelay(value, '--reconnect-delay');
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}
