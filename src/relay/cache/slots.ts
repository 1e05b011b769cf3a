// The page copies one side of the memory cache keeps, by slot number: carved out of 1 MiB
// blocks allocated as the cache fills (the budget is a ceiling, not an up-front allocation).
// Every slot is 4 KiB aligned within its block, so it can be read as 32-bit words.
import { PAGE_SIZE } from '../../memstream/reader.ts';

const BLOCK_PAGES = 256;

export class Slots {
  private mem: Buffer[] = [];

  get(slot: number): Buffer {
    const b = Math.floor(slot / BLOCK_PAGES);
    let m = this.mem[b];
    if (!m) { m = Buffer.alloc(BLOCK_PAGES * PAGE_SIZE); this.mem[b] = m; }
    const at = (slot % BLOCK_PAGES) * PAGE_SIZE;
    return m.subarray(at, at + PAGE_SIZE);
  }
}
