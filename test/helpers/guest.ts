// The tiny real guest (scripts/build-guest.sh, guest/init): boot it under QEMU/TCG on a disk
// served over NBD or from a file, follow its serial console, and check on the host what it
// wrote. The block contents here must stay byte-identical to guest/blocks.awk.
import { closeSync, existsSync, openSync, readSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { run, startDaemon, type Daemon } from './proc.ts';

const root = fileURLToPath(new URL('../..', import.meta.url));
export const GUEST_DIR = join(root, '.cache/guest');
export const GUEST_KERNEL = join(GUEST_DIR, 'vmlinuz');
export const GUEST_INITRD = join(GUEST_DIR, 'initramfs.cpio.gz');

/**
 * The guest's memory size in KiB for `mib` MiB: 8 KiB more. QEMU 7.2 under TCG loses guest
 * writes during a live migration: the destination's RAM differed from the source's, both
 * frozen at the switch-over, in 3 of 31 plain QEMU-to-QEMU migrations here (no vmshift
 * involved; the guest kernel then panicked), and in 0 of 20 with this size. As we understand
 * QEMU's code (not checked in 7.2's source), the dirty-bitmap sync of a RAM block that is a
 * multiple of 64 pages clears the bits a word at a time without re-arming TCG's TLB dirty
 * tracking, so stores through a cached TLB entry go unmarked; other sizes go page by page,
 * which re-arms it. KVM tracks dirty pages in the kernel and is not affected.
 */
export function guestMemoryKiB(mib: number): number {
  return mib * 1024 + 8;
}

/** Node and device names the guest's disk gets in QEMU (for QMP commands in tests). */
export const GUEST_DISK_NODE = 'd0';
export const GUEST_DISK_DEVICE = 'vd0';

export type GuestMode = 'pattern' | 'verify' | 'writer' | 'idle' | 'dirty' | 'fillfree' | 'redirty';
/** `reconnectDelay`: seconds QEMU holds the guest's requests while the NBD server is gone (default 0: they fail). */
export type GuestDisk = { nbdSocket: string; exportName: string; reconnectDelay?: number } | { file: string; format?: 'raw' | 'qcow2' };

export interface GuestParams {
  /** Blocks written/verified, or the writer's slot count (default 256). */
  blocks?: number;
  /** Block size in bytes, a multiple of 64 (default 4096). */
  bs?: number;
  /** Pattern seed (default 1). */
  seed?: number;
  /** First disk block the guest uses (default 0). */
  start?: number;
  /** Writer: stop after this many records (default 0 = run until stopped). */
  count?: number;
  /** Writer or dirty: milliseconds between records or passes (default 0). */
  delay?: number;
  /** Dirty: MiB of guest RAM rewritten each pass; fillfree: MiB filled and freed (default 32). */
  mib?: number;
  /** 0: the guest does not load virtio_balloon (default 1). */
  balloon?: number;
}

export interface BootOptions {
  disk?: GuestDisk;
  mode: GuestMode;
  params?: GuestParams;
  qmpSocket?: string;
  memoryMiB?: number;
  extraArgs?: string[];
  /** Run QEMU through this command prefix (e.g. nsenter into a test's mount namespace); it must exec QEMU. */
  wrap?: string[];
  /** Keep QEMU's stdin open: `send` writes lines to the guest's serial console (fillfree's commands). */
  console?: boolean;
}

export interface Guest {
  pid: number;
  daemon: Daemon;
  /** Resolves with the first complete console line matching `re`; rejects when the guest
   *  exits first, reports VMSHIFT-ERROR, or the timeout passes (message has the console). */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  /** Complete console lines so far (a line still being printed is left out). */
  lines(): string[];
  /** Highest k of a complete `VMSHIFT-SEQ k` line: the last write the guest knows is durable. */
  lastSeq(): number;
  /** Resolves with QEMU's exit code once the guest powered itself off. */
  waitExit(timeoutMs?: number): Promise<number | null>;
  /** Stop QEMU (SIGTERM, then SIGKILL) unless it already exited. */
  stop(): Promise<void>;
  /** Type a line on the guest's console (only when booted with `console: true`). */
  send(line: string): void;
}

/** Whether scripts/build-guest.sh has produced a kernel and an initramfs. */
export function guestAvailable(): boolean {
  return existsSync(GUEST_KERNEL) && existsSync(GUEST_INITRD);
}

/** Build the guest if needed (fast when it is current; takes a lock against parallel runs). */
export async function ensureGuest(): Promise<void> {
  await run('bash', [join(root, 'scripts/build-guest.sh')], { cwd: root });
}

/** QEMU's option syntax doubles commas inside values. */
const q = (s: string) => s.replaceAll(',', ',,');

function diskArgs(disk: GuestDisk): string[] {
  const node = 'nbdSocket' in disk
    ? { driver: 'nbd', 'node-name': GUEST_DISK_NODE, server: { type: 'unix', path: disk.nbdSocket }, export: disk.exportName, ...(disk.reconnectDelay ? { 'reconnect-delay': disk.reconnectDelay } : {}) }
    : { driver: disk.format ?? 'raw', 'node-name': GUEST_DISK_NODE, file: { driver: 'file', filename: disk.file, 'node-name': `${GUEST_DISK_NODE}-file` } };
  // JSON -blockdev needs no escaping; the device id lets tests address it over QMP.
  return ['-blockdev', JSON.stringify(node), '-device', `virtio-blk-pci,drive=${GUEST_DISK_NODE},id=${GUEST_DISK_DEVICE}`];
}

/** The QEMU command line for a guest (exported for tests and tools that start QEMU themselves). */
export function guestArgs(opts: BootOptions): string[] {
  // no_timer_check: on a loaded host TCG can miss the kernel's early timer-IRQ check window,
  // and the guest panics at boot ("IO-APIC + timer doesn't work!"; seen at load average 25).
  const append = ['console=ttyS0', 'quiet', 'panic=-1', 'no_timer_check', `mode=${opts.mode}`];
  for (const [k, v] of Object.entries(opts.params ?? {})) {
    if (v === undefined) continue;
    if (!Number.isSafeInteger(v) || v < 0) throw new Error(`guest param ${k}=${v}: must be a non-negative integer`);
    append.push(`${k}=${v}`);
  }
  const args = [
    '-accel', 'tcg', '-m', `${guestMemoryKiB(opts.memoryMiB ?? 256)}K`, '-nodefaults', '-display', 'none',
    '-no-reboot', '-serial', 'stdio',
    '-kernel', GUEST_KERNEL, '-initrd', GUEST_INITRD, '-append', append.join(' '),
  ];
  if (opts.disk) args.push(...diskArgs(opts.disk));
  if (opts.qmpSocket) args.push('-qmp', `unix:${q(opts.qmpSocket)},server=on,wait=off`);
  args.push(...(opts.extraArgs ?? []));
  return args;
}

/** Start QEMU with the tiny guest; it is stopped by PID at cleanupAll like every daemon. */
export function bootGuest(opts: BootOptions): Guest {
  if (!guestAvailable()) throw new Error(`guest not built: run scripts/build-guest.sh (expected ${GUEST_KERNEL})`);
  const [cmd, ...pre] = [...(opts.wrap ?? []), 'qemu-system-x86_64'];
  const daemon = startDaemon(cmd!, [...pre, ...guestArgs(opts)], opts.console ? { stdio: ['pipe', 'pipe', 'pipe'] } : {});
  const send = (line: string) => {
    if (!daemon.proc.stdin) throw new Error('the guest was booted without console: true');
    daemon.proc.stdin.write(`${line}\r`);
  };
  const exited = () => daemon.proc.exitCode !== null || daemon.proc.signalCode !== null;
  const lines = () => {
    const all = daemon.output().split('\n');
    all.pop(); // unterminated: the guest may still be printing it
    return all.map((l) => l.replace(/\r$/, ''));
  };
  const describe = () => `guest pid ${daemon.pid} (mode=${opts.mode}) console:\n${lines().slice(-40).join('\n')}`;

  const waitFor = async (re: RegExp, timeoutMs = 60000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // Check output before exit: the line we want may be the last one before poweroff.
      const done = exited();
      for (const l of lines()) {
        const m = l.match(re);
        if (m) return m;
        if (l.startsWith('VMSHIFT-ERROR')) throw new Error(`guest reported an error while waiting for ${re}: ${l}\n${describe()}`);
      }
      if (done) throw new Error(`guest exited (code ${daemon.proc.exitCode}) before printing ${re}\n${describe()}`);
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${re}\n${describe()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  const lastSeq = () => {
    let last = 0;
    for (const l of lines()) {
      const m = /^VMSHIFT-SEQ (\d+)$/.exec(l);
      if (m) last = Math.max(last, Number(m[1]));
    }
    return last;
  };

  const waitExit = async (timeoutMs = 60000) => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`guest did not power off within ${timeoutMs} ms\n${describe()}`)), timeoutMs);
    });
    try { return await Promise.race([daemon.exited, timeout]); } finally { clearTimeout(timer); }
  };

  return { pid: daemon.pid, daemon, waitFor, lines, lastSeq, waitExit, stop: () => daemon.stop(), send };
}

// ---- Block contents (same bytes as guest/blocks.awk) ----

const LINE = 64;
const PAD = '-'.repeat(25);
const pad10 = (n: number) => String(n).padStart(10, '0');

function block(tag: 'PAT' | 'SEQ', a: number, b: number, bs: number): Buffer {
  if (bs % LINE !== 0 || bs < LINE || bs / LINE > 999) throw new Error(`block size ${bs}: must be a multiple of 64 up to 63936`);
  let s = '';
  for (let j = 0; j < bs / LINE; j++) s += `VMSHIFT-${tag} ${pad10(a)} ${pad10(b)} ${String(j).padStart(3, '0')} ${PAD}\n`;
  return Buffer.from(s, 'latin1');
}

/** The pattern block the guest writes at disk block `i` (absolute) for `seed`. */
export function expectedBlock(i: number, seed: number, bs = 4096): Buffer {
  return block('PAT', i, seed, bs);
}

/** Writer record `k`; it lives at slot k mod `slots`. */
export function expectedRecord(k: number, slots: number, bs = 4096): Buffer {
  return block('SEQ', k, k % slots, bs);
}

export interface LayoutOptions {
  /** First disk block the guest used (its `start=` param). */
  start?: number;
  bs?: number;
}

/** Read `count` blocks starting at disk block `first` from a buffer (whole disk) or file. */
function readBlocks(disk: Buffer | string, first: number, count: number, bs: number): Buffer {
  const len = count * bs, off = first * bs;
  if (Buffer.isBuffer(disk)) return disk.subarray(off, off + len);
  const out = Buffer.alloc(len);
  const fd = openSync(disk, 'r');
  try {
    let got = 0;
    while (got < len) {
      const n = readSync(fd, out, got, len - got, off + got);
      if (n === 0) break; // short file: the missing blocks compare as bad
      got += n;
    }
    return out.subarray(0, got);
  } finally { closeSync(fd); }
}

/** Disk blocks (absolute) among the `n` pattern blocks that differ from what the guest writes. */
export function verifyPattern(disk: Buffer | string, n: number, seed: number, opts: LayoutOptions = {}): number[] {
  const bs = opts.bs ?? 4096, start = opts.start ?? 0;
  const data = readBlocks(disk, start, n, bs);
  const bad: number[] = [];
  for (let i = 0; i < n; i++) {
    const got = data.subarray(i * bs, (i + 1) * bs);
    if (!got.equals(expectedBlock(start + i, seed, bs))) bad.push(start + i);
  }
  return bad;
}

export interface BadSlot {
  slot: number;
  /** The oldest record the slot may hold: the newest acknowledged one that maps to it. */
  expected: number;
  /** What is there, e.g. `record 12`, `torn record 44`, `no record: "\0\0..."`. */
  found: string;
}

/**
 * Check the writer's slots against the last acknowledged record `lastSeq`: every slot must
 * hold, intact, the newest acknowledged record that maps to it, or a newer one (the guest may
 * have written records the host had not seen acknowledged yet). Slots no acknowledged record
 * maps to are not checked. Returns the bad slots; empty means no acknowledged write was lost.
 */
export function verifyWriterLog(disk: Buffer | string, lastSeq: number, slots: number, opts: LayoutOptions = {}): BadSlot[] {
  const bs = opts.bs ?? 4096, start = opts.start ?? 0;
  const data = readBlocks(disk, start, slots, bs);
  const bad: BadSlot[] = [];
  for (let slot = 0; slot < slots; slot++) {
    // Newest j <= lastSeq with j % slots == slot (records start at 1).
    const expected = lastSeq - ((lastSeq - slot) % slots + slots) % slots;
    if (expected < 1) continue;
    const got = data.subarray(slot * bs, (slot + 1) * bs);
    const head = /^VMSHIFT-SEQ (\d{10}) (\d{10}) 000 /.exec(got.subarray(0, LINE).toString('latin1'));
    let found: string;
    if (!head) found = `no record: ${JSON.stringify(got.subarray(0, 24).toString('latin1'))}`;
    else {
      const k = Number(head[1]);
      if (k % slots !== slot) found = `record ${k} (belongs in slot ${k % slots})`;
      else if (!got.equals(expectedRecord(k, slots, bs))) found = `torn record ${k}`;
      else if (k < expected) found = `record ${k}`;
      else continue;
    }
    bad.push({ slot, expected, found });
  }
  return bad;
}
