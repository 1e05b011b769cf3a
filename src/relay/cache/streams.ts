// The cache's two halves as Node streams for the relays: the encoder between the source
// QEMU's socket and the link, the decoder between the link and the destination QEMU's socket.
// One write per input chunk (the frames of a chunk are joined): the link frames each write.
import { Transform } from 'node:stream';
import { CacheDecoder } from './decoder.ts';
import { CacheEncoder, type EncoderOptions } from './encoder.ts';

export function encoderStream(o: EncoderOptions): { stream: Transform; encoder: CacheEncoder } {
  const encoder = new CacheEncoder(o);
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      try {
        const t0 = performance.now();
        const f = encoder.encode(chunk);
        const b = f.length === 1 ? f[0] : f.length ? Buffer.concat(f) : null;
        encoder.ms += performance.now() - t0;
        if (b) this.push(b);
        cb();
      } catch (e) { cb(e as Error); }
    },
    flush(cb) {
      try {
        const f = encoder.finish();
        if (f.length) this.push(Buffer.concat(f));
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
      const out = decoder.push(chunk);
      const b = out.length === 1 ? out[0] : out.length ? Buffer.concat(out) : null;
      decoder.ms += performance.now() - t0;
      if (b) this.push(b);
      cb(decoder.error ?? undefined);
    },
    flush(cb) {
      cb(decoder.end() ?? undefined);
    },
  });
  return { stream, decoder };
}
