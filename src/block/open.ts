// Opens a device from what an operator types: a file path or an NBD URI
// (nbd+unix:///NAME?socket=PATH, nbd://HOST:PORT/NAME, nbds://... with TLS).
import type { BlockDevice } from './device.ts';
import { FileDevice } from './file.ts';
import { NbdClientDevice } from './nbd-device.ts';

export interface OpenOptions {
  readOnly?: boolean;
  /** Create a raw file of this size when the path does not exist yet (files only). */
  create?: { size: number };
  /** NBD connections to use when the server allows several. */
  connections?: number;
}

export function isNbdUri(spec: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(spec);
}

export async function openDevice(spec: string, opts: OpenOptions = {}): Promise<BlockDevice> {
  if (isNbdUri(spec)) return NbdClientDevice.open(spec, { connections: opts.connections ?? 1 });
  return FileDevice.open(spec, { readOnly: opts.readOnly, create: opts.create });
}
