// Opening and checking a migration's destination, and undoing what the job created there.
// A destination is a raw file (created sparse when it does not exist) or an NBD export.
// Checks before any byte is copied: reachable, writable, not the disk itself, exactly the
// disk's size, and able to do everything the shim advertises to its clients (the gate's
// capabilities must not shrink at the swap). Only a file this job created is ever removed.
import { realpath, stat, access, unlink, constants as fsc } from 'node:fs/promises';
import { dirname, isAbsolute } from 'node:path';
import type { BlockDevice, DeviceCaps } from '../block/device.ts';
import { openDevice, isNbdUri } from '../block/open.ts';
import { ControlError } from '../control/protocol.ts';
import { parseNbdUri } from '../nbd/uri.ts';
import { DiskBusyError, lockDisk } from '../shim/disk-lock.ts';

export interface Destination {
  device: BlockDevice;
  /** What the shim records as its backing after the switch-over (absolute path or URI). */
  spec: string;
  /** The job created this file: remove it if the job fails before the switch-over. */
  created: boolean;
  /** Reads as zeroes everywhere at the start (a file just created). */
  initiallyZero: boolean;
}

export interface DiskFacts {
  /** The shim's current backing spec. */
  backing: string;
  /** The disk's own NBD sockets (a destination served by this disk would be itself). */
  sockets: readonly string[];
  size: number;
  caps: DeviceCaps;
}

const fail = (code: string, msg: string): never => {
  throw new ControlError(code, msg);
};

export async function openDestination(spec: string, disk: DiskFacts, beforeCreate: (path: string) => Promise<void>): Promise<Destination> {
  const dest = isNbdUri(spec) ? await openNbd(spec, disk) : await openFile(spec, disk, beforeCreate);
  try {
    checkFits(dest.device, disk);
  } catch (e) {
    await discard(dest);
    throw e;
  }
  return dest;
}

async function openNbd(uri: string, disk: DiskFacts): Promise<Destination> {
  let target;
  try {
    target = parseNbdUri(uri);
  } catch (e) {
    return fail('bad-destination', `destination ${uri}: ${(e as Error).message}`);
  }
  const socket = target.transport === 'unix' ? target.socket : undefined;
  if (socket && (await isOneOf(socket, disk.sockets))) fail('same-disk', `destination ${uri} is this shim's own export: choose another destination`);
  if (uri === disk.backing) fail('same-disk', `destination ${uri} is the disk's current backing`);
  let device: BlockDevice;
  try {
    device = await openDevice(uri, { connections: 1 });
  } catch (e) {
    return fail('unreachable', `destination ${uri} is unreachable: ${(e as Error).message}`);
  }
  return { device, spec: uri, created: false, initiallyZero: false };
}

async function openFile(path: string, disk: DiskFacts, beforeCreate: (path: string) => Promise<void>): Promise<Destination> {
  if (!isAbsolute(path)) fail('bad-destination', `destination path "${path}" must be absolute`);
  const existing = await stat(path).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? null : fail('unwritable', `destination ${path}: ${e.message}`)));
  if (existing) {
    if (!isNbdUri(disk.backing) && (await samePath(path, disk.backing))) fail('same-disk', `destination ${path} is the disk's current backing`);
    if (!existing.isFile() && !existing.isBlockDevice()) fail('bad-destination', `destination ${path} is not a regular file or block device`);
    await access(path, fsc.W_OK).catch(() => fail('unwritable', `destination ${path} is not writable`));
    await checkNotServed(path);
  } else {
    const dir = dirname(path);
    const d = await stat(dir).catch(() => fail('unwritable', `destination directory ${dir} does not exist`));
    if (!d.isDirectory()) fail('unwritable', `destination directory ${dir} is not a directory`);
    await access(dir, fsc.W_OK).catch(() => fail('unwritable', `destination ${path} is not writable: cannot create files in ${dir}`));
    await beforeCreate(path);
  }
  let device: BlockDevice;
  try {
    device = await openDevice(path, existing ? {} : { create: { size: disk.size } });
  } catch (e) {
    if (!existing) await unlink(path).catch(() => {});
    return fail('unwritable', `destination ${path} cannot be opened for writing: ${(e as Error).message}`);
  }
  return { device, spec: path, created: !existing, initiallyZero: !existing };
}

/**
 * An existing file another shim serves would be overwritten under its guest: refuse before
 * copying anything. (The switch-over takes the lock for good, so one that starts meanwhile
 * fails the job there, before the commit.)
 */
async function checkNotServed(path: string): Promise<void> {
  const lock = await lockDisk(await realpath(path), false).catch((e) =>
    e instanceof DiskBusyError ? fail('in-use', `destination ${path} is served by another vmshift shim: moving this disk onto it would overwrite that guest's disk`) : fail('unwritable', `destination ${path}: ${(e as Error).message}`),
  );
  await lock.release();
}

/** Size and capabilities: the swap must not change what the shim's clients were promised. */
function checkFits(dev: BlockDevice, disk: DiskFacts): void {
  if (dev.caps.readOnly) fail('unwritable', `destination ${dev.name} is read-only`);
  if (dev.size < disk.size) fail('too-small', `destination ${dev.name} is too small: ${dev.size} bytes, the disk is ${disk.size} bytes`);
  if (dev.size > disk.size) fail('size-mismatch', `destination ${dev.name} is ${dev.size} bytes, larger than the disk (${disk.size} bytes): sizes must match`);
  const missing = (Object.keys(disk.caps) as Array<keyof DeviceCaps>).filter((k) => k !== 'readOnly' && disk.caps[k] && !dev.caps[k]);
  if (missing.length) fail('unsuitable', `destination ${dev.name} lacks ${missing.join(', ')}, which the shim's clients rely on`);
}

/** Close the destination and remove it if (and only if) the job created it. */
export async function discard(dest: Destination): Promise<void> {
  await dest.device.close().catch(() => {});
  if (dest.created) await unlink(dest.spec).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw new Error(`could not remove the destination file ${dest.spec} the job created: ${e.message}`);
  });
}

async function isOneOf(path: string, paths: readonly string[]): Promise<boolean> {
  for (const p of paths) if (path === p || (await samePath(path, p))) return true;
  return false;
}

async function samePath(a: string, b: string): Promise<boolean> {
  try {
    return (await realpath(a)) === (await realpath(b));
  } catch {
    return false;
  }
}
