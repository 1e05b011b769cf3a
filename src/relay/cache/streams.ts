// The cache's two halves as Node streams for the relays: the encoder between the source
// QEMU's socket and the link, the decoder between the link and the destination QEMU's socket.
// Small pieces are joined (the link frames each write; QEMU's socket takes each as a write),
// large ones (QEMU's bytes passed through, views into the chunk they came in) go on as they are.
import { Transform } from 'node:stream';
import { CacheDecoder } from './decoder.ts';
import { CacheEncoder, type EncoderOptions } from './encoder.ts';

/** Pieces at least this long are pushed on their own, not copied into a join. */
const OWN = 8 * 1024;

/** Pushes `pieces` in order, joining runs of small ones. */
function pushPieces(t: Transform, pieces: Buffer[]): void {
  let from = 0;
  const flush = (to: number) => {
    if (to - from === 1) t.push(pieces[from]);
    else if (to > from) t.push(Buffer.concat(pieces.slice(from, to)));
  };
  for (let i = 0; i < pieces.length; i++) {
    if (pieces[i]!.length < OWN) continue;
    flush(i);
    t.push(pieces[i]);
    from = i + 1;
  }
  flush(pieces.length);
}

export function encoderStream(o: EncoderOptions): { stream: Transform; encoder: CacheEncoder } {
  const encoder = new CacheEncoder(o);
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      try {
        const t0 = performance.now();
        pushPieces(this, encoder.encode(chunk));
        encoder.ms += performance.now() - t0;
        cb();
      } catch (e) { cb(e as Error); }
    },
    flush(cb) {
      try {
        pushPieces(this, encoder.finish());
        cb();
      } catch (e) { cb(e as Error); }
    },
  });
  return { stream, encoder };
}

export function decoderStream(): { stream: Transform; decoder: CacheDecoder } {
  const decoder = new CacheDecoder();
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      const t0 = performance.now();
      pushPieces(this, decoder.push(chunk));
      decoder.ms += performance.now() - t0;
      cb(decoder.error ?? undefined);
    },
    flush(cb) {
      cb(decoder.end() ?? undefined);
    },
  });
  return { stream, decoder };
}
