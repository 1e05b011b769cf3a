// Range helpers for the copier's work lists: the union of several dirty sets walked in
// order without building a merged set (a Bloom set stays small), clipping to a window, and
// splitting at heat-map region boundaries.
import type { DirtyRange, DirtySet } from '../tracking/dirty-set.ts';

/** Ascending, merged union of ascending range streams, clipped to [from, to). */
export function* unionRanges(sources: Array<Iterable<DirtyRange>>, from = 0, to = Infinity): Generator<DirtyRange> {
  const its = sources.map((s) => s[Symbol.iterator]());
  const heads: Array<DirtyRange | null> = its.map((it) => nextClipped(it, from, to));
  let cur: DirtyRange | null = null;
  for (;;) {
    let best = -1;
    for (let i = 0; i < heads.length; i++) if (heads[i] && (best < 0 || heads[i]!.offset < heads[best]!.offset)) best = i;
    if (best < 0) break;
    const r = heads[best]!;
    heads[best] = nextClipped(its[best]!, from, to);
    if (cur && r.offset <= cur.offset + cur.length) {
      cur.length = Math.max(cur.length, r.offset + r.length - cur.offset);
    } else {
      if (cur) yield cur;
      cur = { offset: r.offset, length: r.length };
    }
  }
  if (cur) yield cur;
}

function nextClipped(it: Iterator<DirtyRange>, from: number, to: number): DirtyRange | null {
  for (;;) {
    const n = it.next();
    if (n.done) return null;
    const s = Math.max(n.value.offset, from), e = Math.min(n.value.offset + n.value.length, to);
    if (e > s) return { offset: s, length: e - s };
    if (n.value.offset >= to) return null;
  }
}

/** Ranges of a dirty set from `from` on (DirtySet.ranges may start inside the block before). */
export function setRanges(set: DirtySet, from = 0, to = Infinity): Generator<DirtyRange> {
  return unionRanges([set.ranges(from)], from, to);
}

/** The first dirty offset at or after `from` in any of the sets, or -1. */
export function firstDirty(sets: DirtySet[], from: number): number {
  const first = unionRanges(sets.map((s) => s.ranges(from)), from).next();
  return first.done ? -1 : first.value.offset;
}

/** Split ranges at multiples of `unit` (heat regions), so each piece lies in one region. */
export function* splitAt(ranges: Iterable<DirtyRange>, unit: number): Generator<DirtyRange> {
  for (const r of ranges) {
    const end = r.offset + r.length;
    for (let pos = r.offset; pos < end; ) {
      const next = Math.min(end, (Math.floor(pos / unit) + 1) * unit);
      yield { offset: pos, length: next - pos };
      pos = next;
    }
  }
}

export function totalBytes(ranges: Iterable<DirtyRange>): number {
  let n = 0;
  for (const r of ranges) n += r.length;
  return n;
}
